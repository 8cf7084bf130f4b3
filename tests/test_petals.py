"""Property tests for mice.petals: convexity of ICNN/Petals/PICNN, shape contracts, errors, gradients, init, toolkit."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mice.petals import (ACTIVATIONS, ICNN, PICNN, INITS, Petals, PetalLoop, act_moments, chord_test, hessian_check,
                         hk_init_, hk_moments, monotonicity, petals_suite, positive, positive_inverse, relu_moments)
from mice.utils import num_params

SETTINGS = settings(max_examples=25, deadline=None)


@torch.no_grad()
def scramble_(m, std):
    for p in m.parameters(): p.add_(std * torch.randn_like(p))
    return m


def reference(m: Petals, x: torch.Tensor) -> torch.Tensor:
    """Petals from the equations, one petal at a time, in float64:
    z_1 = g(x Wx_0 + b_0), z_{i+1} = g(z_i Wz_i + x Wx_i + b_i), f = z_k Wz_k + x Wx_k + b_k."""
    g, h, k = ACTIVATIONS[m.act], m.hidden, m.depth
    outs = []
    for p in range(m.petals):
        cols = lambda i: slice(i * h, i * h + (h if i < k else m.out_dim))
        wx, b = m.wx[:, p].double(), m.bias[p].double()
        s = x @ wx[:, cols(0)] + b[cols(0)]
        for i in range(1, k + 1):
            s = g(s) @ positive(m.wz_raw[i - 1][p].double()) + x @ wx[:, cols(i)] + b[cols(i)]
        outs.append(s)
    return torch.stack(outs, -2)


nets = st.fixed_dictionaries(dict(
    in_dim=st.integers(1, 5), hidden=st.integers(1, 12), out_dim=st.integers(1, 3), depth=st.integers(1, 3),
    act=st.sampled_from(sorted(ACTIVATIONS)), init=st.sampled_from(INITS)))


@SETTINGS
@given(cfg=nets, seed=st.integers(0, 2**16), noise=st.sampled_from([0.0, 0.5, 2.0]),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_icnn_is_convex_for_random_parameters_and_inputs(cfg, seed, noise, scale):
    torch.manual_seed(seed)
    m = scramble_(ICNN(**cfg).double(), noise)
    r = chord_test(m, cfg["in_dim"], n=500, scale=scale, generator=torch.Generator().manual_seed(seed))
    assert r.convex, str(r)


@SETTINGS
@given(seed=st.integers(0, 2**16), P=st.integers(1, 4), noise=st.sampled_from([0.0, 1.0]))
def test_petals_convex_shared_and_per_petal(seed, P, noise):
    torch.manual_seed(seed)
    m = scramble_(Petals(3, P, 8, 2).double(), noise)
    A = torch.randn(P, 3, 3, dtype=torch.float64)
    assert chord_test(m, 3, n=500).convex
    assert chord_test(lambda x: m(torch.einsum("pij,nj->npi", A, x)), 3, n=500).convex


@SETTINGS
@given(seed=st.integers(0, 2**16), noise=st.sampled_from([0.0, 1.0]))
def test_picnn_convex_in_y_for_fixed_u(seed, noise):
    torch.manual_seed(seed)
    m = scramble_(PICNN(3, 2, 8, 2).double(), noise)
    U = torch.randn(500, 2, dtype=torch.float64)
    assert chord_test(lambda y: m(y, U), 3, n=500).convex


def test_picnn_not_convex_in_u():
    m = scramble_(PICNN(3, 2, 16, 2).double(), 1.0)
    Y = torch.randn(10_000, 3, dtype=torch.float64)
    r = chord_test(lambda u: m(Y, u), 2, n=10_000)
    assert r.violations > 0 and r.worst_ulps > 1e6


def test_toolkit_catches_nonconvex_things():
    lin = torch.nn.Linear(4, 3).double()
    gate = lambda x: 1 - torch.exp(-F.softplus(lin(x)))      # = sigmoid(lin(x))
    assert chord_test(gate, 4, n=2000).violations > 0
    assert not hessian_check(gate, torch.randn(6, 4)).psd
    icnn = ICNN(4, 16, 2).double()
    assert chord_test(lambda x: -icnn(x), 4, n=2000).rate > 0.5
    assert hessian_check(icnn, torch.randn(6, 4)).psd
    A = torch.randn(4, 2, dtype=torch.float64)
    assert chord_test(lambda x: x @ A, 4, n=2000).convex        # affine: exactly on the boundary, within rounding


def test_toolkit_requires_float64():
    with pytest.raises(TypeError, match="float64"):
        chord_test(ICNN(2, 4, 1), 2, n=10)
    with pytest.raises(TypeError, match="float64"):
        chord_test(lambda x: x.float().sum(1, keepdim=True), 2, n=10)


def test_dtype_mismatch_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype"):
        ICNN(2, 4, 1)(torch.randn(3, 2, dtype=torch.float64))


def test_monotonicity():
    m = ICNN(3, 16, 2).double()
    r = monotonicity(m, torch.randn(128, 3))
    assert not r.nondecreasing.any() and not r.nonincreasing.any()
    r = monotonicity(lambda x: torch.stack([x[:, 0] - x[:, 1], x[:, 0]], 1), torch.randn(8, 3))
    assert r.nondecreasing.tolist() == [True, False, True] and r.nonincreasing.tolist() == [False, True, True]


@SETTINGS
@given(cfg=nets, P=st.integers(1, 4), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2))
def test_petals_matches_equations_and_shapes(cfg, P, lead):
    cfg = dict(cfg)
    hidden = cfg.pop("hidden")
    m = scramble_(Petals(cfg["in_dim"], P, hidden, **{k: v for k, v in cfg.items() if k != "in_dim"}).double(), 0.3)
    x = torch.randn(*lead, 5, cfg["in_dim"], dtype=torch.float64)
    y = m(x, per_petal=False)
    assert y.shape == (*lead, 5, P, cfg["out_dim"])
    assert torch.allclose(y, reference(m, x), atol=1e-10)
    xp = x.unsqueeze(-2).expand(*lead, 5, P, cfg["in_dim"])       # the same input per petal, via the per-petal path
    assert torch.allclose(m(xp, per_petal=True), y, atol=1e-10)


def test_icnn_is_one_petal():
    m = ICNN(4, 8, 3, depth=3)
    x = torch.randn(2, 5, 4)
    assert m(x).shape == (2, 5, 3)
    assert torch.allclose(m(x), Petals.forward(m, x, per_petal=False)[..., 0, :])


def test_fold_input_absorbs_a_linear_map():
    m = Petals(6, 3, 8, 4).double()
    A = torch.randn(3, 6, 6, dtype=torch.float64)
    x = torch.randn(10, 6, dtype=torch.float64)
    before = m(torch.einsum("pij,nj->npi", A, x))
    assert torch.allclose(m.fold_input_(A)(x), before, atol=1e-10)
    B = torch.randn(6, 6, dtype=torch.float64)
    before = m(x @ B.T)
    assert torch.allclose(m.fold_input_(B)(x), before, atol=1e-10)


@pytest.mark.parametrize("make", [lambda: ICNN(3, 8, 2, depth=3), lambda: Petals(3, 4, 8, 2, depth=2),
                                  lambda: PICNN(3, 2, 8, 2, depth=2)])
def test_gradients_reach_every_parameter(make):
    m = make()
    args = (torch.randn(16, 3), torch.randn(16, 2)) if isinstance(m, PICNN) else (torch.randn(16, 3),)
    m(*args).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_counts():
    d, P, h, o, k = 5, 3, 7, 2, 3
    m = Petals(d, P, h, o, depth=k)
    assert num_params(m) == P * (d * (k * h + o) + (k * h + o) + (k - 1) * h * h + h * o)
    assert m.flops_per_token() == 2 * P * (d * (k * h + o) + (k - 1) * h * h + h * o)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: m(torch.randn(11, d))
    assert fc.get_total_flops() == 11 * m.flops_per_token()
    assert Petals(8, 2).hidden == 16 and Petals(8, 2).out_dim == 8


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.randn(4, 5)), "last dim 6"),
    (lambda m: m(torch.randn(4, 2, 6), per_petal=True), "petals=3"),
    (lambda m: m(torch.tensor([[float("nan")] * 6])), "NaN"),
    (lambda m: m(torch.ones(2, 6, dtype=torch.int64)), "floating-point"),
    (lambda m: m([[0.0] * 6]), "torch.Tensor"),
    (lambda m: m.fold_input_(torch.eye(5)), "A:"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(Petals(6, 3, 8))


@pytest.mark.parametrize("kw, match", [(dict(depth=0), "depth"), (dict(hidden=-1), "hidden"), (dict(act="tanh"), "act"),
                                      (dict(init="xavier"), "init"), (dict(skip_share=0.5), "skip_share"),
                                      (dict(petals=0), "petals")])
def test_bad_config(kw, match):
    args = dict(in_dim=4, petals=2) | kw
    with pytest.raises(ValueError, match=match):
        Petals(**args)


def test_picnn_bad_input():
    m = PICNN(3, 2, 8, 1)
    with pytest.raises(ValueError, match="leading dims"): m(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="u: expected shape"): m(torch.randn(4, 3), torch.randn(4, 3))


@SETTINGS
@given(w=st.floats(1e-30, 50.0))
def test_positive_inverse_roundtrip(w):
    t = torch.tensor([w], dtype=torch.float64)
    # torch's softplus returns x itself above x = 20, an error of at most log1p(e^-20) < 2.1e-9
    assert torch.allclose(positive(positive_inverse(t)), t, rtol=1e-12, atol=0 if w < 20 else 2.1e-9)


def test_hk_matches_the_paper_for_relu():
    for n in (16, 128, 512):
        kappa = math.sqrt(1 - 0.25) + 0.5 * math.acos(-0.5)
        f_c = n * (math.pi - n + (n - 1) * kappa) / (2 * math.pi)
        m = hk_moments(n, "relu")
        assert math.isclose(m.mean**2, 0.5 / f_c, rel_tol=1e-12) and math.isclose(m.var, 1 / n, rel_tol=1e-12)
        assert math.isclose(m.bias, -n * m.mean / math.sqrt(2 * math.pi), rel_tol=1e-12)


def test_quadrature_moments():
    pairs = zip(act_moments("relu", 2.0, 0.3, 200), relu_moments(2.0, 0.3))
    assert all(math.isclose(a, b, rel_tol=3e-3) for a, b in pairs)
    z = torch.randn(2_000_000, dtype=torch.float64)
    assert abs(F.softplus(z).mean().item() - act_moments("softplus")[0]) < 3e-3


def test_hk_init_is_lognormal_with_the_moments():
    raw = torch.empty(512, 512)
    m = hk_init_(raw, None, 512, generator=torch.Generator().manual_seed(0))
    logw, s2 = positive(raw).double().log(), math.log1p(m.var / m.mean**2)
    assert abs(logw.mean().item() - (math.log(m.mean) - s2 / 2)) < 0.02
    assert abs(logw.std().item() / math.sqrt(s2) - 1) < 0.01


def test_compile_fullgraph():
    m = Petals(4, 3, 8)
    x = torch.randn(5, 4)
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(m, backend="eager", fullgraph=True)(x), m(x), atol=1e-6)
    torch._dynamo.reset()


def test_suite_runs_on_cpu():
    from mice.bench import parse_args
    argv = ["petals", "--device", "cpu", "--sizes", "8", "--tokens", "32", "--repeat", "1", "--warmup", "1",
            "--opt", "petals=2"]
    rows = petals_suite(parse_args(argv, {"petals": petals_suite}))
    names = [r.name for r in rows]
    assert any(n.startswith("loop P=2") for n in names) and any(n.startswith("petals P=2") for n in names)
    assert all(r.baseline for r in rows)


def test_petal_loop_baseline_matches_petals_math():
    loop = PetalLoop(3, 2, 4, 2)
    x = torch.randn(5, 3)
    y = loop(x)
    assert y.shape == (5, 2, 2)
    assert torch.allclose(y[:, 1], loop.nets[1](x))
    assert loop.flops_per_token() == Petals(3, 2, 4, 2).flops_per_token()


@pytest.mark.parametrize("act", ["softplus", "relu"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_petals_trunk_equals_reference(act, depth):
    "The hand-written trunk: every layer's output and every gradient equal the composed reference (float64)."
    torch.manual_seed(depth)
    m = Petals(5, 3, 4, 2, depth=depth, act=act).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    outs, refs = m.preactivations(x), m.preactivations_reference(x)
    ws = [torch.randn_like(r) for r in refs]
    def grads(o): return torch.autograd.grad(sum((a * w).sum() for a, w in zip(o, ws)), [x, *m.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip([*outs, *grads(outs)], [*refs, *grads(refs)])) < 1e-13


def test_petals_trunk_no_layout_copies_but_the_output_gradient():
    "Only the copy of an ordinary output gradient into the trunk's buffer remains; the reference has many more."
    from mice.petals import layout_ops
    torch.manual_seed(0)
    m = Petals(8, 4, 16, 8, depth=2)
    x, w = torch.randn(512, 8, requires_grad=True), torch.randn(512, 4, 8)
    new = layout_ops(lambda: (m(x) * w).sum().backward(), 512 * 4 * 8)
    old = layout_ops(lambda: (m.preactivations_reference(x)[-1] * w).sum().backward(), 512 * 4 * 8)
    assert new[0] == {"aten::copy_": 1} and {"aten::slice_backward", "aten::clone", "aten::zero_"} <= set(old[0])


def test_petals_trunk_under_autocast():
    torch.manual_seed(0)
    m = Petals(8, 4, 16, 8, depth=2)
    x = torch.randn(32, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y0 = m(x), m.preactivations_reference(x)[-1]
    assert y.dtype == torch.bfloat16 and (y.float() - y0.float()).abs().max() < 0.1
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_softplus_switch_keeps_an_icnn_convex_in_float64():
    "A case hypothesis found: torch's softplus drops 2.1e-9 at its switch (20), 1.2e5 ulps of chord gap here."
    cfg = dict(in_dim=3, hidden=1, out_dim=2, depth=2, act="softplus", init="hk")
    torch.manual_seed(33)
    m = scramble_(ICNN(**cfg).double(), 2.0)
    r = chord_test(m, 3, n=500, scale=10.0, generator=torch.Generator().manual_seed(33))
    assert r.convex, str(r)
