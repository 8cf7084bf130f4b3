"""Geometric experts (mice.geometric): the manifold maps against closed forms in float64 (and geoopt where installed),
fp32 under autocast, finite at zero and at the boundary; each expert type against the paper formulas; the mixture
against a float64 loop; gradients to router, curvatures and weights; loss-free balancing; compile; bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mice.geometric import (EXPERTS, GeometricConfig, GeometricMoE, GeometricRouter, PoincareExperts, ambient_dim,
                            ball_eps, ball_boundary, lorentz_exp0, lorentz_inner, lorentz_linear, lorentz_log0,
                            lorentz_project, mobius_add, phase_exp0, phase_log0, poincare_exp0, poincare_fc,
                            poincare_log0, poincare_project, product_exp0, product_log0, reference_first,
                            reference_geometric, simplex_exp0, simplex_log0, sphere_exp0, sphere_log0)
from mice.routing import MoEConfig, TopKMoE, imbalance
from mice.utils import dead_parameters

FEW = settings(max_examples=15, deadline=None)
D64 = torch.float64
ALL = ("euclidean", "poincare", "lorentz", "sphere", "simplex", "phase", "product")


# ---------------------------------------------------------------- maps
@FEW
@given(st.integers(1, 9), st.floats(0.01, 5.0), st.integers(0, 2**16))
def test_ball_round_trip_inside_and_closed_form(d, c, seed):
    v = torch.randn(32, d, dtype=D64, generator=torch.Generator().manual_seed(seed))
    y = poincare_exp0(v, c)
    assert (c * y.square().sum(-1) < 1).all()
    n = v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    assert torch.allclose(y, torch.tanh(math.sqrt(c) * n) * v / (math.sqrt(c) * n), atol=1e-14)
    small = v * (3 / math.sqrt(c)) / n.clamp_min(3 / math.sqrt(c))                  # sqrt(c)|v| <= 3: invertible
    assert (poincare_log0(poincare_exp0(small, c), c) - small).abs().max() < 1e-9


def test_mobius_addition_identities_and_formula():
    g = torch.Generator().manual_seed(0)
    c = 0.8
    x, y = (poincare_exp0(torch.randn(50, 4, dtype=D64, generator=g), c) for _ in range(2))     # points of the ball
    xy, xx, yy = (x * y).sum(-1, True), x.square().sum(-1, True), y.square().sum(-1, True)
    want = ((1 + 2 * c * xy + c * yy) * x + (1 - c * xx) * y) / (1 + 2 * c * xy + c * c * xx * yy)
    assert torch.allclose(mobius_add(x, y, -c), want, atol=1e-15)
    assert torch.allclose(mobius_add(-x, mobius_add(x, y, -c), -c), y, atol=1e-12)
    assert (c * mobius_add(x, y, -c).square().sum(-1) < 1).all()
    # sphere (k = +c): the same law
    assert torch.allclose(mobius_add(-x, mobius_add(x, y, c), c), y, atol=1e-12)


def test_other_maps_round_trip_and_constraints():
    g = torch.Generator().manual_seed(1)
    v, c = torch.randn(64, 5, dtype=D64, generator=g), 1.7
    x = lorentz_exp0(v, c)
    assert torch.allclose(lorentz_inner(x, x), torch.full((64,), -1 / c, dtype=D64), atol=1e-10)
    assert (lorentz_log0(x, c) - v).abs().max() < 1e-12 and torch.allclose(lorentz_project(x, c), x)
    u = 0.9 * v / v.norm(dim=-1, keepdim=True) / math.sqrt(c)
    assert (sphere_log0(sphere_exp0(u, c), c) - u).abs().max() < 1e-13
    vc = v - v.mean(-1, keepdim=True)
    assert (simplex_log0(simplex_exp0(vc, 0.7), 0.7) - vc).abs().max() < 1e-13
    vp = torch.rand(64, 5, dtype=D64, generator=g) * 2 - 1
    assert (phase_log0(phase_exp0(vp, 2.0), 2.0) - vp).abs().max() < 1e-13
    parts = (("euclidean", 1), ("poincare", 1), ("lorentz", 1), ("sphere", 1), ("simplex", 2), ("phase", 1))
    cs = [0.0, 0.5, 1.0, 0.3, 0.8, 1.2]
    w = 0.3 * torch.randn(10, 7, dtype=D64, generator=g)
    w[:, 4:6] -= w[:, 4:6].mean(-1, keepdim=True)                                    # the simplex slice centred
    q = product_exp0(w, parts, cs)
    assert q.shape[-1] == sum(ambient_dim(m, d) for m, d in parts)
    assert (product_log0(q, parts, cs) - w).abs().max() < 1e-12


def test_maps_gradcheck():
    c = torch.tensor(0.6, dtype=D64, requires_grad=True)
    t = 0.5 * torch.randn(3, 4, dtype=D64, requires_grad=True)
    for fn in (poincare_exp0, lambda a, k: poincare_log0(0.5 * a / (1 + a.norm(dim=-1, keepdim=True)), k),
               sphere_exp0, sphere_log0, lorentz_exp0, lambda a, k: lorentz_log0(lorentz_exp0(a, k), k),
               simplex_exp0, lambda a, k: phase_exp0(a, k)):
        assert torch.autograd.gradcheck(fn, (t, c))                                  # wrt the point and the curvature


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_maps_finite_at_zero_and_boundary(dtype):
    t = torch.cat([torch.zeros(1, 4), torch.full((1, 4), 1e4), torch.full((1, 4), 1e-30)]).to(dtype)
    t.requires_grad_()
    outs = [poincare_log0(poincare_project(poincare_exp0(t, 1.0), 1.0), 1.0),
            sphere_log0(sphere_exp0(1e-5 * t, 1.0), 1.0), simplex_exp0(t, 1.0), phase_exp0(t, 1.0)]
    if dtype != torch.float16: outs.append(lorentz_log0(lorentz_exp0(t, 1.0), 1.0))   # fp16 cannot hold cosh(40)
    sum(o.float().sum() for o in outs).backward()
    assert all(torch.isfinite(o).all() and o.dtype == dtype for o in outs) and torch.isfinite(t.grad).all()
    p = poincare_project(torch.full((2, 8), 3.0, dtype=dtype), 1.0)
    assert (p.double().norm(dim=-1) < 1).all() and ball_eps(dtype) >= 8 * torch.finfo(dtype).eps


def test_maps_run_in_fp32_under_autocast():
    v = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = poincare_exp0(v.bfloat16(), 0.5)
        assert y.dtype == torch.bfloat16
        z = poincare_log0(poincare_exp0(v, 0.5), 0.5)
    assert z.dtype == torch.float32 and (z - v).abs().max() < 1e-4


def test_against_geoopt():
    geoopt = pytest.importorskip("geoopt")
    g = torch.Generator().manual_seed(2)
    v, c = torch.randn(20, 5, dtype=D64, generator=g), 0.7
    ball = geoopt.PoincareBall(c=c)
    assert torch.allclose(poincare_exp0(v, c), ball.expmap0(v), atol=1e-12)
    y = 0.5 * ball.expmap0(v)
    assert torch.allclose(poincare_log0(y, c), ball.logmap0(y), atol=1e-10)
    assert torch.allclose(mobius_add(y, y.flip(0), -c), ball.mobius_add(y, y.flip(0)), atol=1e-12)
    sph = geoopt.SphereProjection(k=c)
    u = 0.3 * v
    assert torch.allclose(sphere_exp0(u, c), sph.expmap0(u), atol=1e-12)
    lor = geoopt.Lorentz(k=1 / c)                                    # geoopt: <x, x>_L = -k, i.e. curvature -1/k
    tangent = torch.cat([torch.zeros(20, 1, dtype=D64), v], -1)
    assert torch.allclose(lorentz_exp0(v, c), lor.expmap0(tangent), atol=1e-9)


# ---------------------------------------------------------------- experts
@pytest.mark.parametrize("manifold", ALL)
def test_each_type_matches_the_paper_formula(manifold):
    torch.manual_seed(0)
    cls = EXPERTS[manifold]
    g = cls(3, 6, 4, (0.1, 0.5)).double()
    for name in cls.extras: getattr(g, name).data.normal_(0, 0.3)
    u = 0.4 * torch.randn(9, 6, dtype=D64)
    t, hit = g.first(u, torch.tensor([3, 6, 9], dtype=torch.int32), torch.arange(9) // 3)
    ref = torch.cat([reference_first(g, i, u[3 * i:3 * i + 3]) for i in range(3)])
    assert (t - ref).abs().max() < 1e-12 and (hit is None or not hit.any())


def test_poincare_fc_is_the_paper_layer():
    "HNN++ at small c is the Euclidean layer 2(Zx - |z| r) (the ball's lambda_0 = 2); its output stays in the ball."
    g = torch.Generator().manual_seed(3)
    x, z = 0.2 * torch.randn(7, 4, dtype=D64, generator=g), torch.randn(5, 4, dtype=D64, generator=g)
    r = 0.1 * torch.randn(5, dtype=D64, generator=g)
    y = poincare_fc(x, z, r, 1e-8)
    assert torch.allclose(y, 2 * (x @ z.T - z.norm(dim=-1) * r), atol=1e-5)
    assert (poincare_fc(3 * x, z, r, 2.0).square().sum(-1) * 2.0 < 1).all()
    h = lorentz_linear(lorentz_exp0(x, 0.5), z, r, 0.5)
    assert torch.allclose(lorentz_inner(h, h), torch.full((7,), -2.0, dtype=D64))


def test_magnitude_survives_in_the_poincare_expert():
    torch.manual_seed(0)
    g = PoincareExperts(1, 32, 16, (0.06, 0.06))
    d = torch.randn(32)
    u = torch.tensor([0.25, 0.5, 1, 2, 4])[:, None] * d / d.norm() * math.sqrt(32)
    t, hit = g.first(u, torch.tensor([5], dtype=torch.int32), torch.zeros(5, dtype=torch.long))
    assert (t.norm(dim=-1).diff() > 0).all() and not hit.any()
    rows = ball_boundary(dim=64, rms=(1.0, 4.0, 32.0), n=64)
    assert all(r["expert_finite"] == 1 for r in rows) and rows[-1]["expert_clipped"] == 1


# ---------------------------------------------------------------- the mixture
def _moe(manifolds=ALL, n=12, k=3, **kw):
    torch.manual_seed(0)
    moe = GeometricMoE(16, 8, GeometricConfig(n_experts=n, manifolds=manifolds, top_k=k, **kw)).double()
    for name, p in moe.named_parameters():
        if name.endswith(("offset", "bias", "beta")): p.data.normal_(0, 0.3)
    return moe


@pytest.mark.parametrize("manifolds,n,k,kw", [(ALL, 12, 3, {}), (("poincare",), 4, 1, {}),
                                              (("lorentz", "euclidean"), 5, 2, dict(router="linear")),
                                              (("sphere", "phase", "simplex"), 7, 2, dict(shared_hidden=8)),
                                              (ALL, 64, 8, dict(bias_rate=0.01))])
def test_mixture_matches_the_float64_loop(manifolds, n, k, kw):
    moe = _moe(manifolds, n, k, **kw)
    x = 0.5 * torch.randn(3, 20, 16, dtype=D64)
    moe.eval()
    y = moe(x)
    assert (y - reference_geometric(moe, x)).abs().max() < 1e-12
    assert int(moe.load.sum()) == 60 * k and torch.equal(y, moe(x))                # eval: deterministic


@pytest.mark.parametrize("manifolds", [ALL, ("euclidean", "poincare", "lorentz", "sphere"), ("sphere", "euclidean")])
def test_gradients_match_the_float64_loop(manifolds):
    "The fused tangent epilogue's backward (its per-row selections included) against autograd through the loop."
    moe = _moe(manifolds, 2 * len(manifolds), 2)
    x = (0.5 * torch.randn(2, 12, 16, dtype=D64)).requires_grad_()
    g = torch.randn(2, 12, 16, dtype=D64)
    ps = [x, *moe.parameters()]
    fast = torch.autograd.grad(moe(x), ps, g, allow_unused=True)
    slow = torch.autograd.grad(reference_geometric(moe, x), ps, g, allow_unused=True)
    zero = [torch.zeros_like(p) for p in ps]           # the loop never touches an expert that no token chose
    worst = max((a - b).abs().max().item() for a, b in zip(*(
        [z if t is None else t for t, z in zip(grads, zero)] for grads in (fast, slow))))
    assert worst < 1e-10, worst


def test_tangent_types_side_by_side_share_one_matmul(monkeypatch):
    "Euclidean, Poincare, Lorentz and sphere experts form one run: two grouped matmuls per forward, not two per type."
    import mice.geometric as geo
    moe = _moe(("euclidean", "poincare", "lorentz", "sphere", "phase"), 10, 2)
    assert [names for names, _, _ in moe.experts.runs] == [("euclidean", "poincare", "lorentz", "sphere"), ("phase",)]
    calls, real = [], geo.grouped_linear
    monkeypatch.setattr(geo, "grouped_linear", lambda x, w, offs, impl="auto": calls.append(w.shape[0]) or
                        real(x, w, offs, impl))
    moe(0.5 * torch.randn(2, 8, 16, dtype=D64))
    assert calls == [8, 8, 2, 2], calls


def test_gradient_reaches_router_every_curvature_and_weight():
    moe = _moe(shared_hidden=8)
    x = 0.5 * torch.randn(4, 16, 16, dtype=D64)
    (moe(x).square().sum() + moe.aux_loss).backward()
    assert dead_parameters(moe) == []
    curv = [p.grad for n, p in moe.named_parameters() if "curvature" in n]
    assert len(curv) == 7 and all((g != 0).all() for g in curv)               # product: a ball and a sphere
    # every beta with a nonzero kappa: the last is the product's, whose kappa (a mean of the ball's -c and the
    # sphere's +c, which start equal) is 0 at init
    assert moe.router.weight.grad.abs().sum() > 0 and (moe.router.beta.grad[:-1] != 0).all()
    assert {n for n, _ in moe.named_parameters() if "router" in n} == {"router.weight", "router.beta"}
    assert all(n.startswith(("router.", "experts.", "shared.")) for n, _ in moe.named_parameters())


def test_beta_only_for_curved_experts_and_old_checkpoints_load():
    """The curvature router learns beta_e only where kappa_e can be nonzero; a state dict from before (beta of every
    expert, the flat ones never trained) loads, and gives the same logits."""
    torch.manual_seed(0)
    c = GeometricConfig(n_experts=6, manifolds=("euclidean", "poincare", "simplex", "sphere"), top_k=2)
    moe = GeometricMoE(16, 16, c)
    flags = tuple(m in ("poincare", "sphere") for m in moe.experts.expert_types())     # simplex: kappa = 0 too
    assert moe.router.has_kappa == flags and moe.router.beta.shape == (sum(flags),)
    with torch.no_grad(): moe.router.beta.normal_()
    old = {k: v.clone() for k, v in moe.state_dict().items()}
    full = torch.zeros(6)
    full[torch.tensor(flags)] = old["router.beta"]
    old["router.beta"] = full
    again = GeometricMoE(16, 16, c)
    again.load_state_dict(old)
    x = torch.randn(10, 16)
    kappa = moe.experts.kappa()
    assert torch.equal(again.router(x, kappa), moe.router(x, kappa))
    assert torch.equal(moe.router.expert_beta()[~torch.tensor(flags)], torch.zeros(6 - sum(flags)))
    with pytest.raises(ValueError, match="has_kappa: expected 6 flags"): GeometricRouter(16, 6, has_kappa=(True,) * 5)


def test_bf16_autocast_and_fp32_curvature():
    moe = GeometricMoE(32, 16, GeometricConfig(n_experts=7, manifolds=ALL, top_k=2))
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert moe.experts.curvature().dtype == torch.float32


def test_curvature_init_spread_and_units():
    moe = GeometricMoE(64, 8, GeometricConfig(n_experts=9, manifolds=("poincare", "sphere", "euclidean"),
                                               curvature_init=(0.1, 2.0)))
    c = moe.experts.curvature()
    assert torch.allclose(c[:3] * 64, torch.tensor([0.1, math.sqrt(0.2), 2.0]), rtol=1e-4)
    assert torch.equal(c[6:], torch.zeros(3)) and moe.experts.expert_types()[3:6] == ["sphere"] * 3
    k = moe.experts.kappa()
    assert (k[:3] < 0).all() and (k[3:6] > 0).all() and (k[6:] == 0).all()


def test_loss_free_balancing_moves_load_to_uniform():
    for make in (lambda: TopKMoE(8, 16, 4, k=1, bias_rate=0.01),
                 lambda: GeometricMoE(8, 16, GeometricConfig(n_experts=4, manifolds=("euclidean", "poincare"),
                                                             top_k=1, bias_rate=0.01))):
        torch.manual_seed(0)
        moe = make()
        moe.router.weight.data[0] = 0.5
        x = torch.randn(256, 8) + 1.0
        loads = []
        for _ in range(300):
            moe(x)
            loads.append(moe.load.float())
        assert imbalance(loads[0].numpy()) > 3.9 and imbalance(torch.stack(loads[-20:]).mean(0).numpy()) < 1.15
        assert abs(float(moe.expert_bias.sum())) < 1e-4
        moe.eval()
        b = moe.expert_bias.clone()
        moe(x)
        assert torch.equal(b, moe.expert_bias)


def test_bias_balancing_off_by_default_and_in_the_config():
    assert TopKMoE(8, 16, 4).expert_bias is None and "expert_bias" not in TopKMoE(8, 16, 4).state_dict()
    assert MoEConfig().bias_rate == 0.0 and GeometricMoE(8, 8).expert_bias is None
    from mice.models import DenseConfig, topk_experts
    assert topk_experts(DenseConfig(moe=MoEConfig(bias_rate=1e-3))).bias_rate == 1e-3


def test_compiles_in_one_graph():
    moe = GeometricMoE(64, 64, GeometricConfig(n_experts=7, manifolds=ALL, top_k=2, bias_rate=1e-3)).bfloat16()
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    moe.eval()
    want = moe(x)
    got = torch.compile(moe, backend="aot_eager", fullgraph=True)(x)
    got.float().square().sum().backward()
    assert torch.equal(got, want) and x.grad is not None
    torch._dynamo.reset()


def test_bad_inputs():
    with pytest.raises(ValueError, match="GeometricConfig.manifolds: expected one of"):
        GeometricConfig(manifolds=("hyperbolic",))
    with pytest.raises(ValueError, match=r"GeometricConfig.top_k: expected an integer in \[1, 4\]"):
        GeometricConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"GeometricConfig.n_experts: expected an integer in \[1, 64\]"):
        GeometricConfig(n_experts=65)
    with pytest.raises(ValueError, match="curvature_init\\[0\\]: expected a number > 0"):
        GeometricConfig(curvature_init=(-0.5, 1.0))
    with pytest.raises(ValueError, match="each type once"):
        GeometricConfig(manifolds=("poincare", "poincare"))
    with pytest.raises(ValueError, match="'curvature' needs a curved manifold"):
        GeometricConfig(n_experts=2, manifolds=("simplex", "phase"))
    with pytest.raises(ValueError, match="bias_rate"):
        GeometricConfig(bias_rate=-1.0)
    with pytest.raises(ValueError, match="x: expected shape"):
        GeometricMoE(16, 8)(torch.randn(4, 8))
    with pytest.raises(TypeError, match="config: expected a GeometricConfig"):
        GeometricMoE(16, 8, MoEConfig())
    with pytest.raises(ValueError, match="c: expected a number > 0"):
        poincare_exp0(torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match="c: expected a curvature > 0"):
        sphere_log0(torch.ones(2, 3), torch.tensor([[0.5], [-0.5]]))
    with pytest.raises(ValueError, match="s: expected a number > 0"):
        phase_exp0(torch.ones(2, 3), -2.0)
    with pytest.raises(ValueError, match="manifold: expected one of"):
        product_exp0(torch.zeros(2, 3), (("klein", 3),), [1.0])
    with pytest.raises(ValueError, match="c: expected 2 curvatures"):
        product_exp0(torch.zeros(2, 3), (("poincare", 1), ("sphere", 2)), [1.0])


class _NanGradPastEnd(torch.autograd.Function):
    "Identity whose backward puts NaN into the rows `mask` (as grouped_mm may leave rows past offs[-1] undefined)."
    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        mask, = ctx.saved_tensors
        return torch.where(mask[:, None], float("nan"), g), None


def test_rows_past_a_groups_end_never_leak(monkeypatch):
    "grouped_mm leaves rows past offs[-1] undefined, forward and backward: poison them, the mixture must not notice."
    import mice.geometric as geo
    real = geo.grouped_linear
    def poisoned(x, w, offs, impl="auto"):
        past = torch.arange(x.shape[0]) >= offs[-1]
        y = real(_NanGradPastEnd.apply(x, past), w, offs, impl)
        return torch.where(past[:, None], float("nan"), y)
    moe = _moe()
    x = (0.5 * torch.randn(3, 20, 16, dtype=D64)).requires_grad_()
    def run():
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        (y.square().sum() + moe.aux_loss).backward()
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    clean = run()
    monkeypatch.setattr(geo, "grouped_linear", poisoned)
    dirty = run()
    assert all(torch.isfinite(d).all() and torch.allclose(c, d, atol=1e-12) for c, d in zip(clean, dirty))
