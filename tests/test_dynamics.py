"""INL dynamics and the mechanism model kinds (mu, inl, mu_inl): math, effective inits, gradients to every parameter,
cache == recompute, configuration errors, checkpoints, the MLP extension point and the ablation runner."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mice.dynamics import INLDynamics, mu_highway
from mice import models
from mice.models import MLPS, ModelConfig, build_model, generate
from mice.attention import SwiGLU

SMALL = settings(max_examples=20, deadline=None)
KINDS = ["dense", "mu", "inl", "mu_inl"]
SHAPE = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)


def step(model, idx):
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()) + model.aux_loss
    loss.backward()


def zero_grad_params(model):
    return sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_gradient(kind):
    model = build_model(kind, None, **SHAPE)
    idx = torch.randint(0, 61, (2, 16))
    step(model, idx)
    # at init mu is exactly 0 (mu and W_mu zero-initialised), so the gains of RMSNorm(mu) get no gradient on the first
    # step only; nothing else may be silent
    assert all(n.endswith("attn.mu_norm.weight") for n in zero_grad_params(model)), zero_grad_params(model)
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    model.zero_grad(set_to_none=True)
    step(model, idx)
    assert zero_grad_params(model) == []


def test_legacy_reproduces_the_dead_layer0_mu_weights():
    model = build_model("mu_inl", None, legacy=True, **SHAPE)
    idx = torch.randint(0, 61, (2, 16))
    step(model, idx)
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    model.zero_grad(set_to_none=True)
    step(model, idx)
    assert zero_grad_params(model) == ["blocks.0.attn.mu_qkv.weight"]


@pytest.mark.parametrize("legacy, want", [(False, (0.9, 0.1, 0.5)), (True, (0.5, math.log(2), 0.5))])
@pytest.mark.parametrize("kind", ["inl", "mu_inl"])
def test_effective_init_after_model_init(kind, legacy, want):
    model = build_model(kind, None, legacy=legacy, **{**SHAPE, "dim": 64})
    h = torch.randn(3, 10, 64) * 0.5
    for b in model.blocks:
        for got, w in zip(b.dynamics.coefficients(h, h), want):
            assert abs(got.mean().item() - w) < 5e-3 and (got - w).abs().max() < 0.05
        W = b.dynamics.context.mu_proj.weight
        assert (W.abs().max() == 0) != legacy
        if legacy: assert abs(W.std().item() - 0.02) < 2e-3
        assert b.dynamics.context.mu.abs().max() == 0


@pytest.mark.parametrize("kind, extra", [("mu", {}), ("inl", {}), ("mu_inl", {}), ("mu_inl", dict(mu_norm="bound"))])
def test_cache_equals_recompute(kind, extra):
    torch.manual_seed(1)
    model = build_model(kind, None, **SHAPE, **extra)
    with torch.no_grad():                              # move off the init so mu and INL matter
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 61, (2, 12))
    full = model(idx)
    cache = model.new_cache(2, 12)
    outs = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, 12)]
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False
    padded = model(idx, valid=valid)
    assert (padded[1, 4:] - model(idx[1:, 4:])[0]).abs().max() <= 1e-5
    prompts = [[5, 6, 7, 8], [3, 4]]
    greedy = generate(model, prompts, 5, temperature=0)
    for p, g in zip(prompts, greedy):
        seq = list(p)
        for _ in range(5): seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert g == seq


@pytest.mark.parametrize("kwargs, message", [
    (dict(inl_bounds="clamp"), "inl=False"),
    (dict(inl_dt=0.2), "inl=False"),
    (dict(legacy=True), "needs mu_attention, inl or mlp='routed'"),
    (dict(mu_highway=0.5), "no layer makes a mu"),
    (dict(inl=True, inl_bounds="soft"), "inl_bounds must be"),
    (dict(inl=True, legacy=True, inl_bounds="smooth"), "contradicts"),
    (dict(inl=True, inl_dt=0.0), "inl_dt must be > 0"),
    (dict(mu_attention=True, mu_highway=-1.0), "mu_highway must be >= 0"),
    (dict(mlp="expert_choice"), "unknown MLP 'expert_choice'"),
    (dict(route="hash"), "need mlp='routed'"),
    (dict(mlp="routed", top_k=2), "need mlp='moe'"),
    (dict(mlp="moe", top_k=9), "top_k must be an int in"),
    (dict(mlp="routed", route="zipf"), "route must be one of"),
    (dict(mlp="routed", mu_override="argmax"), "mu_override must be one of"),
    (dict(mlp="routed", legacy=True, mu_override="soft"), "contradicts"),
    (dict(mu_norm="bound"), "mu_attention=False"),
    (dict(mu_attention=True, mu_norm="layer"), "mu_norm must be"),
])
def test_contradictory_mechanism_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_kind_flags_cannot_be_overridden():
    with pytest.raises(ValueError, match="pick the model kind"):
        build_model("dense", None, inl=True, **SHAPE)
    with pytest.raises(ValueError, match="pick the model kind"):
        build_model("mu_inl", None, mu_attention=False, **SHAPE)


@pytest.mark.parametrize("kind", ["mu_inl"])
def test_compiles_as_one_graph(kind):
    model = build_model(kind, None, **SHAPE)
    idx = torch.randint(0, 61, (2, 8))
    assert torch.allclose(torch.compile(model, backend="eager", fullgraph=True)(idx), model(idx), atol=1e-6)


@SMALL
@given(st.floats(-1e4, 1e4), st.integers(0, 2**16))
def test_smooth_bounds_hold_for_any_input(scale, seed):
    torch.manual_seed(seed)
    m = INLDynamics(8)
    h, v = torch.randn(3, 8) * scale, torch.randn(3, 8) * scale
    hn, vn, mu = m(h, v)
    _, beta, _ = m.coefficients(h, v)
    assert torch.isfinite(hn).all() and vn.abs().max() <= m.v_max and (beta >= 0).all() and (beta <= m.beta_max).all()


def test_mu_highway_is_the_running_sum():
    mus = [torch.randn(4) for _ in range(5)]
    total = None
    for l, m in enumerate(mus):
        nxt, total = mu_highway(m, total, 0.1)
        assert torch.allclose(nxt, m + 0.1 * sum(mus[:l + 1]))
    assert mu_highway(mus[0], None, 0.0)[0] is mus[0]


class ToyRouted(nn.Module):
    "An MLP that reads token ids and mu and reports an auxiliary loss (the shape of a token-routed MLP)."
    def __init__(self, c, layer=0):
        super().__init__()
        self.ffn, self.aux_loss, self.seen = SwiGLU(c.dim, c.hidden), 0.0, []

    def forward(self, x, token_ids=None, mu=None):
        self.seen.append((token_ids, mu))
        self.aux_loss = x.pow(2).mean() * 0.01
        return self.ffn(x)


def test_mlp_extension_point(monkeypatch):
    monkeypatch.setitem(MLPS, "toy", ToyRouted)
    model = build_model("mu_inl", None, mlp="toy", **SHAPE)
    assert model.aux_loss == 0.0
    idx = torch.randint(0, 61, (2, 8))
    model(idx)
    assert all(torch.equal(b.mlp.seen[-1][0], idx) and b.mlp.seen[-1][1].shape == (2, 8, 32) for b in model.blocks)
    assert torch.allclose(model.aux_loss, sum(b.mlp.aux_loss for b in model.blocks))
    dense = build_model("dense", None, mlp="toy", **SHAPE)
    dense(idx)                  # an MLP that reads mu gets the contextual mu of its own attention output, even in dense
    assert all(b.context is not None and b.mlp.seen[-1][1].shape == (2, 8, 32) for b in dense.blocks)
    plain = build_model("dense", None, **SHAPE)
    assert all(b.context is None and b.dynamics is None for b in plain.blocks), "no mu parameters where nothing reads mu"
    assert sorted(plain.state_dict()) == sorted(models.Transformer(ModelConfig(**SHAPE)).state_dict())


@pytest.mark.parametrize("kind", ["mu_inl"])
def test_checkpoint_resume_is_exact(kind, tmp_path):
    from mice.training import TrainConfig, train, load_checkpoint
    small = dict(model=kind, model_overrides=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1), batch_size=4, seq_len=32,
                 eval_every=2, eval_tokens=512, full_final_eval=False, sample_tokens=4, warmup=1, lr=1e-2)
    quiet = dict(progress=False, log=lambda *a: None)
    whole = train(TrainConfig(steps=4, out_dir=str(tmp_path / "a"), **small), **quiet)
    train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), **small), stop_at=2, **quiet)
    resumed = train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), **small), resume=tmp_path / "b" / "checkpoint.safetensors", **quiet)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors"), load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert a.step == b.step == 4 and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert whole["val_bpb"] == resumed["val_bpb"]
    assert any("dynamics" in k for k in a.model) and a.meta["model_config"]["inl"] is True
    with pytest.raises(ValueError, match="does not match"):
        train(TrainConfig(steps=6, out_dir=str(tmp_path / "b"), **{**small, "model": "mu"}),
              resume=tmp_path / "b" / "checkpoint.safetensors", **quiet)


def test_old_dense_checkpoint_still_resumes(tmp_path):
    "A checkpoint written before the mechanism fields existed (its meta lacks them) resumes as before."
    from mice.training import TrainConfig, train, save_checkpoint, load_checkpoint
    small = dict(model_overrides=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1), batch_size=4, seq_len=32,
                 eval_every=2, eval_tokens=512, full_final_eval=False, sample_tokens=0, warmup=1)
    quiet = dict(progress=False, log=lambda *a: None)
    train(TrainConfig(steps=2, out_dir=str(tmp_path), **small), **quiet)
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    old = {k: v for k, v in ck.meta["model_config"].items()
           if k not in ("mu_attention", "inl", "inl_bounds", "inl_dt", "inl_controller", "mu_highway", "legacy", "mlp")}
    model = build_model("dense", None, **old)
    model.load_state_dict(ck.model, strict=False)
    from mice.training import _optimizer
    opt = _optimizer(model, TrainConfig(**small), torch.device("cpu"))
    opt.load_state_dict(ck.optimizer)
    save_checkpoint(tmp_path / "old.safetensors", model, opt, 2, {**ck.meta, "model_config": old})
    r = train(TrainConfig(steps=3, out_dir=str(tmp_path), **small), resume=tmp_path / "old.safetensors", **quiet)
    assert r["history"][-1]["step"] == 3


def test_tokens_to_target():
    from mice.training import tokens_to_target
    assert tokens_to_target([10, 20, 30], [5.0, 4.0, 3.0], 3.5) == 25.0
    assert tokens_to_target([10, 20], [5.0, 4.0], 3.0) is None
    assert tokens_to_target([10, 20], [2.0, 1.0], 3.0) == 10.0


def test_compare_runs_small(tmp_path):
    "The ablation runner end to end on a very small model: matched parameters, the summary's fields and the JSON."
    import json
    from mice.training import TrainConfig, compare_runs
    base = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=2, eval_tokens=512, full_final_eval=False, warmup=1,
                       out_dir=str(tmp_path / "runs"), model_overrides=dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1))
    r = compare_runs(KINDS, [0, 1], base, out=tmp_path / "cmp.json", log=lambda *a: None)
    assert json.loads((tmp_path / "cmp.json").read_text())["summary"].keys() == set(KINDS)
    s = r["summary"]
    n0 = s["dense"]["params_no_embedding"]
    for k in KINDS:
        assert abs(s[k]["params_no_embedding"] / n0 - 1) <= 0.02
        assert s[k]["curve_tokens"] == [2 * 4 * 32, 4 * 4 * 32] and len(s[k]["seeds"]) == 2
        finals = [x["val_bpb"] for x in r["runs"] if x["model"] == k]
        assert abs(s[k]["val_bpb_mean"] - sum(finals) / 2) < 1e-12
    assert s["dense"]["delta_bpb_mean"] == 0 and s["dense"]["speedup_to_target"] == 1.0
    assert s["mu_inl"]["hidden"] < s["inl"]["hidden"] < s["dense"]["hidden"]
    with pytest.raises(ValueError, match="unknown model"):
        compare_runs(["dense", "nope"], [0], base)


def test_compare_runs_unmatched_keeps_the_width(tmp_path):
    from mice.training import TrainConfig, compare_runs
    base = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_tokens=256, full_final_eval=False, warmup=1,
                       out_dir=str(tmp_path), model_overrides=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    s = compare_runs(["dense", "inl"], [0], base, match_params=False, log=lambda *a: None)["summary"]
    assert s["dense"]["hidden"] == s["inl"]["hidden"] == ModelConfig(dim=32).hidden
    assert s["inl"]["params_no_embedding"] > s["dense"]["params_no_embedding"]
