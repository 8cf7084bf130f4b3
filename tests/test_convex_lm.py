"""The convex family (`convex`, `convex_picnn`, `convex_legacy`): the properties every model has, convexity where it is
claimed on a trained model, and the trainer, generation, checkpoints and the benchmark suite."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mice.data import load_tokenizer, token_bytes, token_ids
from mice.models import ConvexConfig, ConvexModel, DenseConfig, build_model, generate
from mice.petals import chord_test
from mice.training import TrainConfig, evaluate, load_model, train

NAMES = ("convex", "convex_picnn", "convex_legacy")
SHAPE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _model(name, seed=0, **kw):
    "A small model whose norms have seen a few training batches and whose weights are off their init."
    torch.manual_seed(seed)
    m = build_model(name, None, **{**SHAPE, **kw})
    for _ in range(3): m(torch.randint(0, m.config.vocab_size, (4, 12)))
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))
    return m


def _cached_logits(model, idx, prefix, valid=None):
    cache = model.new_cache(idx.shape[0], idx.shape[1])
    outs = [model(idx[:, :prefix], cache, None if valid is None else valid[:, :prefix])]
    for t in range(prefix, idx.shape[1]):
        outs.append(model(idx[:, t:t + 1], cache, None if valid is None else valid[:, t:t + 1]))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", NAMES)
def test_causality_probe(name):
    m = _model(name)
    idx = torch.randint(0, 97, (2, 16))
    for cut in (1, 7, 15):
        idx2 = idx.clone()
        idx2[:, cut:] = (idx2[:, cut:] + 1) % 97
        a, b = copy.deepcopy(m)(idx), copy.deepcopy(m)(idx2)      # training forwards from one saved state
        assert torch.equal(a[:, :cut], b[:, :cut]), (name, cut)
        assert not torch.allclose(a[:, cut:], b[:, cut:])
    m.eval()
    assert torch.equal(m(idx)[:, :7], m(idx2)[:, :7])


@pytest.mark.parametrize("name", NAMES)
def test_cache_equals_recompute(name):
    m = _model(name).eval()
    idx = torch.randint(0, 97, (2, 12))
    assert (_cached_logits(m, idx, 5) - m(idx)).abs().max() <= 1e-5
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False
    full = m(idx, valid=valid)
    assert (_cached_logits(m, idx, 6, valid) - full)[valid].abs().max() <= 1e-5
    assert (full[1, 4:] - m(idx[1:, 4:])[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    m = _model(name)
    idx = torch.randint(0, 97, (2, 12))
    F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("name", ("convex", "convex_picnn"))
def test_iid_tokens_cannot_be_predicted(name):
    """Trained on i.i.d. uniform tokens, a causal model cannot beat ln V on fresh ones (a model that sees the next
    token would learn to copy it)."""
    torch.manual_seed(0)
    V = 16
    m = build_model(name, None, **{**SHAPE, "vocab_size": V})
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, V, (16, 33), generator=g)
        loss = F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    idx = torch.randint(0, V, (128, 33), generator=g)
    ce = F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).item()   # training mode: stats update
    print(f"{name}: i.i.d.-token cross-entropy {ce:.4f} vs ln V = {math.log(V):.4f}")
    assert ce >= math.log(V) - 0.02


def test_clear_errors():
    m = _model("convex")
    with pytest.raises(ValueError, match=r"outside \[0, 97\)"): m(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="empty"): m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len\]"): m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"): m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ffn: expected one of"): ConvexConfig(ffn="mlp")
    with pytest.raises(ValueError, match="petals"): ConvexConfig(petals=0)
    with pytest.raises(ValueError, match="hidden"): ConvexConfig(hidden=0)
    with pytest.raises(ValueError, match="norm_momentum"): ConvexConfig(norm_momentum=1.5)
    with pytest.raises(ValueError, match="pick the model kind instead of overriding ffn"):
        build_model("convex", ffn="legacy")
    with pytest.raises(TypeError, match="config: expected a ConvexConfig"): ConvexModel(DenseConfig())
    with pytest.raises(ValueError, match="x: expected shape"): m.final_hidden(torch.randn(2, 32))


def test_matched_widths_and_flops():
    "The default widths give about the dense model's parameters; the FLOP count includes every FFN matmul."
    with torch.device("meta"):
        dense = build_model("dense", "tiny").num_params(embedding=False)
        for name in ("convex", "convex_picnn"):
            assert abs(build_model(name, "tiny").num_params(embedding=False) / dense - 1) < 0.05, name
        legacy = build_model("convex_legacy", "tiny")
        assert legacy.config.mlp_hidden == 2 * 192
    m = build_model("convex", None, **SHAPE)
    f = m.blocks[0].ffn
    assert f.flops_per_token() == f.net.petals.flops_per_token()
    assert m.flops_per_token(16) > 2 * m.head.weight.numel()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "Short CPU runs of the trainer on the corpus: {name: (model loaded from its checkpoint, run result, config)}."
    out = {}
    for name, steps in (("convex", 40), ("convex_picnn", 25)):
        d = tmp_path_factory.mktemp(name)
        c = TrainConfig(model=name, preset="tiny", steps=steps, batch_size=8, seq_len=64, warmup=5, eval_every=steps,
                        eval_tokens=4096, full_final_eval=False, sample_tokens=0, out_dir=str(d), device="cpu",
                        model_overrides=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
        r = train(c, progress=False, log=lambda *a: None)
        model, _ = load_model(d / "checkpoint.safetensors")
        out[name] = (model, r, c)
    return out


def test_trains_saves_loads_generates(trained):
    model, r, c = trained["convex"]
    assert r["val_bpb"] < r["history"][0]["val_bpb"] or len(r["history"]) == 1
    assert math.isfinite(r["val_bpb"]) and r["val_bpb"] < 8
    assert all(b.ffn.norm.count.item() == c.steps for b in model.blocks)      # the statistics were saved
    ev = evaluate(model, token_ids("val"), token_bytes(load_tokenizer()), c.batch_size, c.seq_len, c.eval_tokens)
    assert abs(ev["bpb"] - r["val_bpb"]) < 1e-4                                # the loaded model is the trained one
    model.eval()
    out = generate(model, [[5, 6, 7], [8]], 6, temperature=0)
    for p, o in zip([[5, 6, 7], [8]], out):
        seq = list(p)
        for _ in range(6): seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq


def _streams(model, idx):
    seen, final = [], []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, args: seen.append([t.flatten(0, 1) for t in args]))
             for b in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, args: final.append(args[0].flatten(0, 1))))
    with torch.no_grad(): model(idx)
    for h in hooks: h.remove()
    return seen, final[0]


def _pairs(n_rows, n=10_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_rows, (n,), generator=g), torch.randint(n_rows, (n,), generator=g)


@pytest.mark.parametrize("name", ("convex", "convex_picnn"))
def test_trained_model_is_convex_where_claimed(trained, name):
    m = copy.deepcopy(trained[name][0]).double().eval()
    val = torch.as_tensor(np.asarray(token_ids("val")[:8 * 64], dtype=np.int64)).view(8, 64)
    per_block, hL = _streams(m, val)
    for layer, (h, a) in enumerate(per_block):
        i, j = _pairs(len(h), seed=layer)
        ffn = m.blocks[layer].ffn
        r = chord_test(lambda z: ffn(z, a[i]), h.shape[1], points=(h[i], h[j]))
        print(name, layer, r)
        assert r.convex and r.chords >= 10_000
    i, j = _pairs(len(hL), seed=9)
    r = chord_test(m.log_partition, hL.shape[1], points=(hL[i], hL[j]))
    assert r.convex and r.chords >= 10_000


def test_trained_model_is_not_convex_in_an_embedding(trained):
    m = copy.deepcopy(trained["convex"][0]).double().eval()
    val = torch.as_tensor(np.asarray(token_ids("val")[:16], dtype=np.int64))[None]
    context, E = m.embed(val).detach(), m.embed.weight.detach()
    def f(e):
        x = context.expand(e.shape[0], -1, -1).clone()
        x[:, -1] = e
        return m.log_partition(m.final_hidden(x)[:, -1])
    i, j = _pairs(len(E), seed=3)
    r = chord_test(f, E.shape[1], points=(E[i], E[j]))
    print(r)
    assert r.violations > 0 and r.worst_ulps > 1e6


def test_model_bench_suite_runs_the_convex_family():
    from mice.bench import parse_args
    from mice.experiments import model_suite
    argv = ["model", "--device", "cpu", "--models", "dense", "convex", "--preset", "tiny", "--seq-len", "32",
            "--tokens", "64", "--repeat", "1", "--warmup", "1"]
    rows = model_suite(parse_args(argv, {"model": model_suite}))
    assert [r.name for r in rows[1:]] == ["dense", "convex"] and all(r.flops > 0 for r in rows[1:])
