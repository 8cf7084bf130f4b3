"""The mgm family: causality across segment boundaries, determinism, cache == recompute with the working memory,
gradients (router, curvatures, memory projections), generation, save/load, clear errors. The i.i.d.-token test of
every model name is in test_families.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from mice.models import MODELS, build_model, generate
from mice.utils import dead_parameters

SHAPE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
MEM = dict(slots=4, segment=4)
NAMES = ("mgm", "mgm_euclid", "mgm_nomem", "dense_mem", "dense_window")


def small(name, seed=0, **kw):
    torch.manual_seed(seed)
    fixed_slots = MODELS[name].memory is not None and MODELS[name].memory.slots == 0
    return build_model(name, None, **{**SHAPE, "memory": dict(segment=4) if fixed_slots else MEM, **kw})


def perturbed(model, idx, t):
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % model.config.vocab_size
    with torch.no_grad(): return model(idx), model(idx2)


@pytest.mark.parametrize("name", NAMES)
def test_causal_across_segment_boundaries(name):
    model, idx = small(name).eval(), torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(1))
    exact = model.config.experts is None                 # the mixture's grouped matmuls move the last bits
    for t in (0, 3, 4, 5, 7, 8, 12, 13):
        a, b = perturbed(model, idx, t)
        diff = (a[:, :t] - b[:, :t]).abs().max().item() if t else 0.0
        assert diff == 0.0 if exact else diff <= 1e-6, (t, diff)
        assert (a[:, t] - b[:, t]).abs().max() > 1e-4, t


@pytest.mark.parametrize("name,carries", [("dense_mem", True), ("dense_window", False), ("mgm", True),
                                          ("mgm_nomem", False)])
def test_memory_carries_what_the_window_cannot_see(name, carries):
    "A token of segment 0 reaches segment 2 only through the memory (the window is one segment)."
    model, idx = small(name).eval(), torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    a, b = perturbed(model, idx, 1)
    moved = (a[:, 8:] - b[:, 8:]).abs().max().item()
    assert moved > 1e-3 if carries else moved <= 1e-6, moved


def test_memory_wider_than_the_model():
    "The reference's memory is wider than the model (256 x 2048 at full size): slots of width 64 in a 32-wide model."
    model, idx = small("dense_mem", memory=dict(slots=8, segment=4, width=64)).eval(), torch.randint(0, 97, (2, 14))
    assert model.blocks[0].attn.memory.init.shape == (8, 64)
    with torch.no_grad():
        logits, _ = chunked_logits(model, idx, [5] + [1] * 9)
        assert (logits - model(idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["mgm", "dense_mem"])
def test_eval_is_deterministic(name):
    model, idx = small(name).eval(), torch.randint(0, 97, (2, 14))
    with torch.no_grad(): assert torch.equal(model(idx), model(idx))


def chunked_logits(model, idx, sizes):
    cache, start, outs = model.new_cache(idx.shape[0], idx.shape[1]), 0, []
    for n in sizes:
        outs.append(model(idx[:, start:start + n], cache))
        start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("name", NAMES)
def test_cache_equals_recompute_with_memory(name):
    model, idx = small(name).eval(), torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
        full, one = chunked_logits(model, idx, [14])
        assert (full - model(idx)).abs().max() <= 1e-5
        for sizes in ([5] + [1] * 9, [3, 6, 5], [4, 4, 4, 2], [1] * 14):
            logits, cache = chunked_logits(model, idx, sizes)
            assert (logits - full).abs().max() <= 1e-5, sizes
            for layer, state in one.state.items():       # the memory after the last chunk is the one-pass memory
                if state is not None:
                    assert (cache.state[layer].slots - state.slots).abs().max() <= 1e-5, sizes


@pytest.mark.parametrize("name", ["mgm", "mgm_euclid", "dense_mem"])
def test_gradient_reaches_router_curvatures_and_memory(name):
    model, idx = small(name), torch.randint(0, 97, (4, 16))
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    names = [n for n, _ in model.named_parameters()]
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()) + model.aux_loss
        loss.backward()
    assert dead_parameters(model) == []
    assert any(".memory.read." in n for n in names) and any(".memory.write_kv." in n for n in names)
    assert any(".memory.write_q." in n for n in names) and any(".memory.gate." in n for n in names)
    if model.config.experts is not None:
        assert any(".router" in n for n in names)
        if name == "mgm": assert any("curvature" in n for n in names), "the mixed-manifold experts have curvatures"


def greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n): seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("name", ["mgm", "dense_mem"])
def test_generate_with_memory(name):
    model = small(name).eval()
    prompts = [[5, 6, 7], [8, 9, 10]]
    assert generate(model, prompts, 9, temperature=0) == [greedy_by_recompute(model, p, 9) for p in prompts]
    assert generate(model, prompts, 6, seed=1) == generate(model, prompts, 6, seed=1)
    with pytest.raises(ValueError, match="left padding is not supported"):
        generate(model, [[5, 6, 7], [3]], 2)


def test_save_load_round_trip(tmp_path):
    from mice.training import load_model, model_meta, save_checkpoint
    model, idx = small("mgm").eval(), torch.randint(0, 97, (2, 14))
    save_checkpoint(tmp_path / "m.safetensors", model, meta=model_meta("mgm", model))
    loaded, ck = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config and type(loaded) is type(model)
    with torch.no_grad(): assert torch.equal(loaded.eval()(idx), model(idx))


def test_trains_with_the_trainer(tmp_path):
    from mice.training import TrainConfig, train
    c = TrainConfig(model="mgm", model_overrides=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                      memory=dict(slots=4, segment=8)),
                    batch_size=4, seq_len=32, steps=3, eval_every=3, eval_tokens=512, full_final_eval=False,
                    sample_tokens=8, warmup=1, out_dir=str(tmp_path))
    r = train(c, progress=False, log=lambda *a: None)
    assert math.isfinite(r["val_bpb"]) and (tmp_path / "checkpoint.safetensors").is_file()


def test_clear_errors():
    model = small("mgm")
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="overriding memory.slots"): build_model("mgm_nomem", memory=dict(slots=8))
    with pytest.raises(ValueError, match="switches on memory"): build_model("dense_mem", memory=None)
    with pytest.raises(ValueError, match="memory.segment"): build_model("mgm", memory=dict(segment=0))
    with pytest.raises(ValueError, match="memory.width"): build_model("mgm", memory=dict(width=0))
    model(torch.tensor([[1, 2, 3]]), cache)
    cache.state[0].slots = cache.state[0].slots[..., :16]        # a memory of another width
    with pytest.raises(ValueError, match=r"state.slots: expected shape \(1, 4, 32\)"):
        model(torch.tensor([[4]]), cache)
    with pytest.raises(ValueError, match="no left padding"):
        model(torch.tensor([[1, 2, 3]]), valid=torch.tensor([[False, True, True]]))
