"""Property tests (hypothesis) of mu-guided attention: float64 equations, implementation equivalence, cache == recompute
for every attention class (and `mice.blocks.Attention`), gradients to every parameter, bad input, torch.compile."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mice.attention import (ConcatMuAttention, LegacyMuAttention, MuAttentionBase, MuConfig, MuGuidedAttention,
                            SeparateMuAttention)
from mice.blocks import Attention, causal_mask
from mice.utils import dead_parameters

SMALL = settings(max_examples=25, deadline=None)


IMPLS = {"fused": MuGuidedAttention, "separate": SeparateMuAttention, "concat": ConcatMuAttention}


def make(kind: str, d: int, H: int, G: int) -> nn.Module:
    "Every attention configuration in the library, by name: `impl[+learned0]`, `bound`, `nonorm` or one below."
    if kind == "attention": return Attention(d, H, G)
    if kind == "legacy": return LegacyMuAttention(d, H, G)
    if kind == "legacy0": return LegacyMuAttention(d, H, G, first_layer=True)
    if kind == "none0": return MuGuidedAttention(d, H, G, first_layer=True, initial_mu="none")
    if kind == "bound": return MuGuidedAttention(d, H, G, mu_norm="bound")
    if kind == "nonorm": return MuGuidedAttention(d, H, G, mu_norm="none")
    impl, _, layer0 = kind.partition("+")
    return IMPLS[impl](d, H, G, first_layer=bool(layer0))


KINDS = ["attention", "legacy", "legacy0", "none0", "bound", "nonorm", *IMPLS, *(f"{i}+learned0" for i in IMPLS)]


def call(layer, x, mu, *args):
    if not isinstance(layer, MuAttentionBase): return layer(x, *args)
    return layer(x, None if layer.first_layer else mu, *args)


@st.composite
def gqa_shapes(draw):
    g = draw(st.sampled_from([1, 2, 4]))
    return g * draw(st.sampled_from([1, 2, 3])), g, draw(st.integers(1, 3)), draw(st.integers(2, 10))


# ---------------------------------------------------------------- float64 equations, written from the study
def rms(t, g, eps=1e-6): return t / (t.pow(2).mean(-1, keepdim=True) + eps).sqrt() * g


def rope(t, theta=10_000.0):
    T, D = t.shape[-2:]
    ang = torch.arange(T, dtype=t.dtype)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=t.dtype) / D)
    a, b = t[..., :D // 2], t[..., D // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)


def equations(layer: MuAttentionBase, x, mu):
    """q = W_q x + U_q mu~ (mu~ = mu in legacy and for mu_norm="none", RMSNorm(mu) or bound(mu) otherwise; no mu term at
    a legacy layer 0), QK-norm, RoPE, causal GQA."""
    sd = {k: v.double() for k, v in layer.state_dict().items()}
    d, H, G, D = layer.dim, layer.n_heads, layer.n_kv_heads, layer.head_dim
    legacy = isinstance(layer, LegacyMuAttention)
    if legacy: W, U = sd["qkv.weight"], sd["mu_qkv.weight"]
    else: W, U = sd["qkv.weight"][:, :d], sd["qkv.weight"][:, d:]
    if layer.first_layer and not legacy: mu = sd["mu_init"].expand_as(x)
    if layer.first_layer and legacy: mu = None
    if mu is not None and "mu_norm.weight" in sd: mu = rms(mu, sd["mu_norm.weight"])
    elif mu is not None and not legacy and layer.mu_norm_kind == "bound":
        mu = mu / mu.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1)
    B, T, _ = x.shape
    y = x @ W.T + (0 if mu is None else mu @ U.T)
    q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in y.split([H * D, G * D, G * D], -1))
    q, k = rope(rms(q, sd["q_norm.weight"])), rope(rms(k, sd["k_norm.weight"]))
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ sd["out.weight"].T


@SMALL
@given(gqa_shapes(), st.sampled_from([k for k in KINDS if k not in ("attention", "none0")]), st.integers(0, 2**16))
def test_matches_equations(shape, kind, seed):
    H, G, B, T = shape
    torch.manual_seed(seed)
    layer = make(kind, 8 * H, H, G).double()
    for p in layer.parameters(): p.data.normal_(1.0 if p.ndim == 1 else 0.0, 0.3 if p.ndim == 1 else 0.2)
    x, mu = torch.randn(B, T, 8 * H, dtype=torch.float64), 3 * torch.randn(B, T, 8 * H, dtype=torch.float64)
    got = call(layer, x, mu, torch.arange(T))
    assert (got - equations(layer, x, mu)).abs().max() <= 1e-5  # norms and RoPE run in float32 by design


@SMALL
@given(gqa_shapes(), st.integers(0, 2**16))
def test_impls_agree(shape, seed):
    "The benchmark variants compute the default layer's function with its parameters (a state dict moves between them)."
    H, G, B, T = shape
    torch.manual_seed(seed)
    layer = MuGuidedAttention(8 * H, H, G)
    x, mu = torch.randn(B, T, 8 * H), 5 * torch.randn(B, T, 8 * H)
    outs = []
    for cls in IMPLS.values():
        other = cls(8 * H, H, G)
        other.load_state_dict(layer.state_dict())
        outs.append(other(x, mu, torch.arange(T)))
    assert max((o - outs[0]).abs().max().item() for o in outs) <= 1e-5


@SMALL
@given(gqa_shapes(), st.sampled_from(KINDS), st.data(), st.integers(0, 2**16))
def test_cache_equals_recompute(shape, kind, data, seed):
    H, G, B, T = shape
    torch.manual_seed(seed)
    layer = make(kind, 8 * H, H, G)
    prefix = data.draw(st.integers(1, T - 1))
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    valid = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]       # left padding
    x, mu = torch.randn(B, T, 8 * H), torch.randn(B, T, 8 * H)
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    full = call(layer, x, mu, pos, causal_mask(T, 0, valid))
    kb = torch.zeros(B, G, T, 8)
    vb = torch.zeros_like(kb)
    mask = causal_mask(prefix, 0, valid[:, :prefix])
    outs = [call(layer, x[:, :prefix], mu[:, :prefix], pos[:, :prefix], mask, (kb, vb), 0)]
    for t in range(prefix, T):
        mask = causal_mask(1, t, valid[:, :t + 1])
        outs.append(call(layer, x[:, t:t + 1], mu[:, t:t + 1], pos[:, t:t + 1], mask, (kb, vb), t))
    assert (torch.cat(outs, 1) - full)[valid].abs().max() <= 1e-5
    assert torch.isfinite(torch.cat(outs, 1)).all()


@SMALL
@given(st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_bound_norm(scale, seed):
    "mu_norm='bound' is the identity below RMS 1 and caps the RMS at 1 above it; its gradient at mu = 0 is finite."
    torch.manual_seed(seed)
    layer = MuGuidedAttention(32, 4, 2, mu_norm="bound")
    mu = scale * torch.randn(2, 5, 32, dtype=torch.float64)
    out = layer.mu_norm(mu)
    r = mu.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(out, torch.where(r > 1, mu / r, mu), rtol=1e-5, atol=1e-7)
    zero = torch.zeros(1, 3, 32, requires_grad=True)
    layer(torch.randn(1, 3, 32), zero, torch.arange(3)).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_top_left_decode_mask_is_wrong():
    "v0.13.0's decode mask (SDPA is_causal=True on a one-token step) sees position 0 only: cache != recompute."
    torch.manual_seed(0)
    layer = LegacyMuAttention(32, 4, 2)
    x, mu = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    full = layer(x, mu, torch.arange(6))
    kb = torch.zeros(1, 2, 6, 8)
    vb = torch.zeros_like(kb)
    layer(x[:, :5], mu[:, :5], torch.arange(5), None, (kb, vb), 0)
    top_left = torch.ones(1, 6, dtype=torch.bool).tril()[None, None]
    wrong = layer(x[:, 5:], mu[:, 5:], torch.arange(5, 6), top_left, (kb, vb), 5)
    right = layer(x[:, 5:], mu[:, 5:], torch.arange(5, 6), causal_mask(1, 5), (kb, vb), 5)
    assert (right - full[:, 5:]).abs().max() <= 1e-5
    assert (wrong - full[:, 5:]).abs().max() > 1e-2


# ---------------------------------------------------------------- every parameter learns
def stack_step(n_layers=3, cls=MuGuidedAttention, **kw):
    torch.manual_seed(0)
    layers = nn.ModuleList(cls(32, 4, 2, first_layer=i == 0, **kw) for i in range(n_layers))
    h, mu = torch.randn(2, 7, 32), None
    for layer in layers:
        a = layer(F.rms_norm(h, (32,)), mu, torch.arange(7))
        h, mu = h + a, a
    h.square().mean().backward()
    return dead_parameters(layers)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("initial_mu", ["learned", "none"])
@pytest.mark.parametrize("mu_norm", ["rms", "bound", "none"])
def test_no_dead_parameters(impl, initial_mu, mu_norm):
    assert stack_step(cls=IMPLS[impl], initial_mu=initial_mu, mu_norm=mu_norm) == []


def test_legacy_layer0_mu_weights_are_dead():
    assert stack_step(cls=LegacyMuAttention) == ["0.mu_qkv.weight"]


def test_dead_parameters_sees_zero_and_missing_grads():
    "`mice.utils.dead_parameters`, which the two tests above rely on."
    m = nn.Linear(3, 2)
    m.weight.grad = torch.zeros_like(m.weight)
    assert dead_parameters(m) == ["weight", "bias"]
    m.bias.grad = torch.ones_like(m.bias)
    assert dead_parameters(m) == ["weight"]


def test_parameter_layouts():
    d, out = 32, (4 + 2 * 2) * 8
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes(MuGuidedAttention(d, 4, 2))["qkv.weight"] == (out, 2 * d)
    assert "mu_init" in shapes(MuGuidedAttention(d, 4, 2, first_layer=True))
    none0 = shapes(MuGuidedAttention(d, 4, 2, first_layer=True, initial_mu="none"))
    assert none0 == shapes(Attention(d, 4, 2)), "initial_mu='none' has exactly Attention's parameters"
    legacy = shapes(LegacyMuAttention(d, 4, 2))
    assert legacy["qkv.weight"] == legacy["mu_qkv.weight"] == (out, d) and "mu_norm.weight" not in legacy
    assert list(LegacyMuAttention(d, 4, 2, first_layer=True).state_dict()) == list(legacy)
    assert shapes(MuGuidedAttention(d, 4, 2, mu_norm="bound")) == shapes(MuGuidedAttention(d, 4, 2, mu_norm="none"))
    for cls in IMPLS.values(): assert shapes(cls(d, 4, 2)) == shapes(MuGuidedAttention(d, 4, 2))


def test_fused_loads_a_legacy_state_dict():
    torch.manual_seed(0)
    legacy, fused = LegacyMuAttention(32, 4, 2), MuGuidedAttention(32, 4, 2, mu_norm="none")
    sd = legacy.state_dict()
    sd["qkv.weight"] = torch.cat([sd["qkv.weight"], sd.pop("mu_qkv.weight")], 1)
    fused.load_state_dict(sd)
    x, mu = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert (fused(x, mu, torch.arange(5)) - legacy(x, mu, torch.arange(5))).abs().max() <= 1e-5


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("mu, match", [
    (None, "need the previous layer's mu"),
    ([[0.0]], r"mu: expected a torch.Tensor"),
    (torch.randn(2, 5, 16), r"mu: expected shape \(2, 5, 32\)"),
    (torch.randn(1, 5, 32), "mu: expected shape"),
    (torch.randn(2, 4, 32), "mu: expected shape"),
    (torch.randn(2, 5, 32).double(), "dtype"),
    (torch.full((2, 5, 32), float("nan")), "NaN"),
    (torch.full((2, 5, 32), float("inf")), "inf"),
])
@pytest.mark.parametrize("cls", [MuGuidedAttention, LegacyMuAttention])
def test_bad_mu(cls, mu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(32, 4, 2)(torch.randn(2, 5, 32), mu, torch.arange(5))


def test_first_layer_refuses_mu():
    for layer in (MuGuidedAttention(32, 4, 2, first_layer=True),
                  MuGuidedAttention(32, 4, 2, first_layer=True, initial_mu="none"),
                  LegacyMuAttention(32, 4, 2, first_layer=True)):
        with pytest.raises(ValueError, match="takes no mu"):
            layer(torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.arange(3))


@pytest.mark.parametrize("kw, match", [
    (dict(initial_mu="zeros"), "initial_mu: expected one of"), (dict(mu_norm="layer"), "mu_norm: expected one of"),
    (dict(mu_norm=True), "mu_norm"), (dict(mu_norm=False), "mu_norm"), (dict(mu_norm=None), "mu_norm"),
    (dict(n_kv_heads=3), "n_kv_heads"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MuGuidedAttention(**dict(dim=32, n_heads=4, n_kv_heads=2) | kw)


@pytest.mark.parametrize("kw", [dict(mu_norm="rms"), dict(initial_mu="none"), dict(impl="concat"), dict(legacy=True)])
def test_legacy_and_variants_take_no_options(kw):
    "v0.13.0's layer has no norm and no layer-0 policy; no class takes `impl` or `legacy` any more."
    with pytest.raises(TypeError, match="unexpected keyword"):
        LegacyMuAttention(32, 4, 2, **kw)
    if "mu_norm" not in kw and "initial_mu" not in kw:
        with pytest.raises(TypeError, match="unexpected keyword"):
            MuGuidedAttention(32, 4, 2, **kw)


def test_mu_config():
    assert MuConfig() == MuConfig(norm="rms", highway=0.1)
    assert MuConfig(norm="none", highway=0).highway == 0
    for kw, match in ((dict(norm="layer"), "MuConfig.norm"), (dict(norm=False), "MuConfig.norm"),
                      (dict(highway=-1.0), "MuConfig.highway"), (dict(highway=float("nan")), "MuConfig.highway"),
                      (dict(highway="0.1"), "MuConfig.highway")):
        with pytest.raises(ValueError, match=match):
            MuConfig(**kw)


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kind", ["fused", "separate", "concat", "bound", "legacy", "fused+learned0", "none0"])
def test_compiles_fullgraph(kind):
    torch.manual_seed(0)
    layer = make(kind, 32, 4, 2)
    x, mu = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    args = (x, None if layer.first_layer else mu, torch.arange(6))
    y = compiled(*args)
    assert (y - layer(*args)).abs().max() <= 1e-6
    y.sum().backward()
    assert dead_parameters(layer) == []
    torch.compiler.reset()


@SMALL
@given(gqa_shapes(), st.sampled_from(KINDS), st.integers(0, 2**16))
def test_one_token_steps_need_no_mask(shape, kind, seed):
    "A one-token decode step may pass mask=None (its query sees every cached key); several tokens may not."
    H, G, B, T = shape
    torch.manual_seed(seed)
    layer = make(kind, 8 * H, H, G)
    x, mu = torch.randn(B, T, 8 * H), torch.randn(B, T, 8 * H)
    full = call(layer, x, mu, torch.arange(T))
    kb = torch.zeros(B, G, T + 2, 8)
    vb = torch.zeros_like(kb)
    steps = [call(layer, x[:, t:t + 1], mu[:, t:t + 1], torch.arange(t, t + 1), None, (kb, vb), t) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="needs the mask"):
        call(layer, x[:, :2], mu[:, :2], torch.arange(1, 3), None, (kb, vb), 1)
