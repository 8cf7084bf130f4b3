"""INL dynamics and the mechanism model kinds (mu, inl, mu_inl): math, effective inits, gradients to every parameter,
cache == recompute, configuration errors, checkpoints and the ablation runner."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mice.blocks import swiglu_hidden
from mice.dynamics import ContextualMu, INLConfig, INLDynamics, LegacyINLDynamics, mu_highway
from mice.models import build_model, generate

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
    assert all(isinstance(b.dynamics, LegacyINLDynamics) == legacy for b in model.blocks)
    h = torch.randn(3, 10, 64) * 0.5
    for b in model.blocks:
        first = b.dynamics.first_layer                  # layer 0 takes no velocity and (default) makes no alpha
        for got, w in zip(b.dynamics.coefficients(h, None if first else h), want):
            if got is None:
                assert first and not legacy
                continue
            assert abs(got.mean().item() - w) < 5e-3 and (got - w).abs().max() < 0.05
        W = b.dynamics.context.mu_proj.weight
        assert (W.abs().max() == 0) != legacy
        if legacy: assert abs(W.std().item() - 0.02) < 2e-3
        assert b.dynamics.context.mu.abs().max() == 0


@pytest.mark.parametrize("kind, extra", [
    ("mu", {}), ("inl", {}), ("mu_inl", {}),
    ("mu_inl", dict(mu=dict(norm="bound"))), ("inl", dict(inl=dict(bounds="clamp"))),
])
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


@pytest.mark.parametrize("overrides, message", [
    (dict(inl=dict(bounds="soft")), r"inl.bounds: expected one of \('smooth', 'clamp'\)"),
    (dict(inl=dict(dt=0.0)), "inl.dt: expected a number > 0"),
    (dict(inl=dict(controller_hidden=0)), "inl.controller_hidden"),
    (dict(mu=dict(highway=-1.0)), "mu.highway: expected a number >= 0"),
    (dict(mu=dict(norm="layer")), "mu.norm: expected one of"),
])
def test_bad_mechanism_options(overrides, message):
    "A model's mechanism options are checked by their configs, with the configs' messages, named by their path."
    with pytest.raises(ValueError, match=message):
        build_model("mu_inl", None, **SHAPE, **overrides)


def test_mechanisms_are_chosen_by_name():
    "Switching a mechanism on or off is choosing another model name: the dense family has no INL or mu options."
    with pytest.raises(ValueError, match="unknown field"):
        build_model("dense", None, inl=dict(dt=0.2), **SHAPE)
    with pytest.raises(ValueError, match="unknown field"):
        build_model("dense", None, mu=dict(norm="bound"), **SHAPE)


def test_inl_config():
    c = INLConfig()
    assert (c.controller_hidden, c.dt, c.bounds) == (64, 0.1, "smooth")
    m = INLDynamics(16, **vars(INLConfig(controller_hidden=8, dt=0.2, bounds="clamp")))
    assert (m.controller_in.out_features, m.dt, m.bounds) == (8, 0.2, "clamp")
    for kw, match in ((dict(bounds="soft"), "INLConfig.bounds"), (dict(dt=0), "INLConfig.dt"),
                      (dict(dt=float("nan")), "INLConfig.dt"), (dict(controller_hidden=2.0), "controller_hidden"),
                      (dict(controller_hidden=True), "INLConfig.controller_hidden")):
        with pytest.raises(ValueError, match=match):
            INLConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(bounds="soft"), r"bounds: expected one of \('smooth', 'clamp'\)"), (dict(beta=3.0), "beta_max"),
    (dict(dt=0), "dt: expected a number > 0"), (dict(alpha=1.0), "alpha"), (dict(gate=0.0), "gate"),
    (dict(controller_hidden=0), "controller_hidden"), (dict(v_max=-1.0), "v_max"),
])
def test_bad_dynamics_config(kw, match):
    with pytest.raises(ValueError, match=match):
        INLDynamics(8, **kw)


def test_bad_input():
    m = INLDynamics(8)
    with pytest.raises(ValueError, match=r"h: expected shape \[\.\.\., 8\]"):
        m(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"v: expected shape \(2, 3, 8\)"):
        m(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[0.0] * 8])


def test_legacy_dynamics():
    "v0.13.0's step: hard clamps, zero controller biases, W_mu ~ N(0, 0.02^2); INLDynamics' state-dict names."
    torch.manual_seed(0)
    m = LegacyINLDynamics(64)
    assert m.bounds == "clamp" and m.controller_out.bias.abs().max() == 0 and m.controller_in.bias.abs().max() == 0
    assert abs(m.context.mu_proj.weight.std().item() - 0.02) < 1e-3 and m.context.mu.abs().max() == 0
    assert list(m.state_dict()) == list(INLDynamics(64).state_dict())
    with pytest.raises(TypeError, match="unexpected keyword"):
        LegacyINLDynamics(8, bounds="smooth")
    with pytest.raises(TypeError, match="unexpected keyword"):
        INLDynamics(8, legacy=True)


def test_contextual_mu():
    h = torch.randn(2, 5, 16)
    assert ContextualMu(16)(h).abs().max() == 0, "zero at init"
    torch.manual_seed(0)
    c = ContextualMu(64, proj_std=0.02)
    assert abs(c.mu_proj.weight.std().item() - 0.02) < 1e-3
    with torch.no_grad():
        c.mu_proj.weight.normal_()
        c.init_weights()                          # what a model does after its global init: the same init again
    assert abs(c.mu_proj.weight.std().item() - 0.02) < 1e-3 and c.mu.abs().max() == 0
    with pytest.raises(ValueError, match="proj_std"):
        ContextualMu(8, proj_std=-1.0)


def test_init_weights_hooks_redo_the_init():
    "A model calls every module's `init_weights()` after its global init: that restores the documented values."
    for cls, std in ((INLDynamics, 0.0), (LegacyINLDynamics, 0.02)):
        m = cls(16)
        with torch.no_grad():
            for p in m.parameters(): p.normal_()
        for mod in m.modules():
            if hasattr(mod, "init_weights"): mod.init_weights()
        want = cls(16)
        assert torch.equal(m.controller_out.bias, want.controller_out.bias), cls.__name__
        assert torch.equal(m.controller_in.bias, want.controller_in.bias) and m.context.mu.abs().max() == 0
        assert (m.context.mu_proj.weight.abs().max() == 0) == (std == 0)


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


@pytest.mark.parametrize("kind", ["mu_inl"])
def test_checkpoint_resume_is_exact(kind, tmp_path):
    from mice.training import TrainConfig, train, load_checkpoint
    small = dict(model=kind, model_overrides=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1), batch_size=4,
                 seq_len=32, eval_every=2, eval_tokens=512, full_final_eval=False, sample_tokens=4, warmup=1, lr=1e-2)
    quiet = dict(progress=False, log=lambda *a: None)
    whole = train(TrainConfig(steps=4, out_dir=str(tmp_path / "a"), **small), **quiet)
    train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), **small), stop_at=2, **quiet)
    resume = tmp_path / "b" / "checkpoint.safetensors"
    resumed = train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), **small), resume=resume, **quiet)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors"), load_checkpoint(resume)
    assert a.step == b.step == 4 and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert whole["val_bpb"] == resumed["val_bpb"]
    assert any("dynamics" in k for k in a.model) and a.meta["model_config"]["inl"]
    with pytest.raises(ValueError, match="other settings: model='mu_inl' → 'mu'"):
        train(TrainConfig(steps=6, out_dir=str(tmp_path / "b"), **{**small, "model": "mu"}),
              resume=tmp_path / "b" / "checkpoint.safetensors", **quiet)
    with pytest.raises(ValueError, match="does not match"):
        train(TrainConfig(steps=6, out_dir=str(tmp_path / "b"), **{**small, "model": "mu"}),
              resume=tmp_path / "b" / "checkpoint.safetensors", allow_changes=True, **quiet)


def test_old_dense_checkpoint_still_resumes(tmp_path):
    "A checkpoint written before the mechanism fields existed (its meta lacks them) resumes as before."
    from mice.training import TrainConfig, train, save_checkpoint, load_checkpoint
    small = dict(model_overrides=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1), batch_size=4, seq_len=32,
                 eval_every=2, eval_tokens=512, full_final_eval=False, sample_tokens=0, warmup=1)
    quiet = dict(progress=False, log=lambda *a: None)
    train(TrainConfig(steps=2, out_dir=str(tmp_path), **small), **quiet)
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    from mice.training import make_optimizer
    old = {k: v for k, v in ck.meta["model_config"].items() if k not in ("moe",)}     # the mechanism fields
    model = build_model("dense", None, **old)
    model.load_state_dict(ck.model, strict=False)
    opt = make_optimizer(model, TrainConfig(**small), torch.device("cpu"))
    opt.load_state_dict(ck.optimizer)
    save_checkpoint(tmp_path / "old.safetensors", model, opt, 2, {**ck.meta, "model_config": old})
    r = train(TrainConfig(steps=3, out_dir=str(tmp_path), **small), resume=tmp_path / "old.safetensors", **quiet)
    assert r["history"][-1]["step"] == 3


def test_tokens_to_target():
    from mice.experiments import tokens_to_target
    assert tokens_to_target([10, 20, 30], [5.0, 4.0, 3.0], 3.5) == 25.0
    assert tokens_to_target([10, 20], [5.0, 4.0], 3.0) is None
    assert tokens_to_target([10, 20], [2.0, 1.0], 3.0) == 10.0


def test_compare_runs_small(tmp_path):
    "The ablation runner end to end on a very small model: matched parameters, the summary's fields and the JSON."
    import json
    from mice.experiments import compare_runs
    from mice.training import TrainConfig
    base = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=2, eval_tokens=512, full_final_eval=False,
                       warmup=1, out_dir=str(tmp_path / "runs"),
                       model_overrides=dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1))
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
    from mice.experiments import compare_runs
    from mice.training import TrainConfig
    base = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_tokens=256, full_final_eval=False,
                       warmup=1, out_dir=str(tmp_path),
                       model_overrides=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    s = compare_runs(["dense", "inl"], [0], base, match_params=False, log=lambda *a: None)["summary"]
    assert s["dense"]["hidden"] == s["inl"]["hidden"] == swiglu_hidden(32)
    assert s["inl"]["params_no_embedding"] > s["dense"]["params_no_embedding"]


@pytest.mark.parametrize("bounds", ["smooth", "clamp"])
def test_first_layer_is_the_full_step_at_zero_velocity_without_its_dead_weights(bounds):
    "A first layer (no velocity input, no alpha) computes what the full controller computes at v = 0."
    torch.manual_seed(0)
    H = 16
    full, first = INLDynamics(H, bounds=bounds).double(), INLDynamics(H, bounds=bounds, first_layer=True).double()
    with torch.no_grad():
        for p in full.parameters(): p.add_(torch.randn_like(p) * 0.3)
        first.controller_in.weight.copy_(full.controller_in.weight[:, :H])
        first.controller_in.bias.copy_(full.controller_in.bias)
        first.controller_out.weight.copy_(full.controller_out.weight[H:])
        first.controller_out.bias.copy_(full.controller_out.bias[H:])
        first.context.load_state_dict(full.context.state_dict())
    h = torch.randn(3, 5, H, dtype=torch.float64) * 3
    for a, b in zip(full(h), first(h)): assert torch.allclose(a, b, atol=1e-12)
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in first.parameters()) == 2 * H * 64 + H
    with pytest.raises(ValueError, match="takes no velocity"):
        first(h, h)


def test_model_layer0_and_the_legacy_layout():
    model = build_model("mu_inl", None, **SHAPE)
    assert [b.dynamics.first_layer for b in model.blocks] == [True, False, False]
    assert model.blocks[0].dynamics.controller_in.in_features == SHAPE["dim"]
    full = build_model("mu_inl", None, inl=dict(initial_v="zero"), **SHAPE)      # mice 0.1's layer 0
    assert full.blocks[0].dynamics.controller_in.in_features == 2 * SHAPE["dim"]
    legacy = build_model("mu_inl", None, legacy=True, **SHAPE)
    assert legacy.config.inl.initial_v == "zero" and legacy.blocks[0].dynamics.controller_in.in_features == 64


def test_compare_runs_matches_active_parameters(tmp_path):
    "`match_params='active'`: a mixture of experts gets the dense model's active parameters, not its total."
    from mice.experiments import compare_runs
    from mice.training import TrainConfig
    base = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_tokens=256, full_final_eval=False,
                       warmup=1, out_dir=str(tmp_path),
                       model_overrides=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    s = compare_runs(["dense", "top2"], [0], base, match_params="active", log=lambda *a: None)["summary"]
    dense, top2 = s["dense"]["active_params_no_embedding"], s["top2"]["active_params_no_embedding"]
    assert abs(top2 / dense - 1) <= 0.02 and s["top2"]["params_no_embedding"] > 1.5 * dense, (dense, top2)
    with pytest.raises(ValueError, match="match_params: expected one of"):
        compare_runs(["dense", "top2"], [0], base, match_params="activ")
