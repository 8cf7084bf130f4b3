"""Property tests (hypothesis) of mice.vectorhull: exact charts, the legacy path against its float64 equations,
convexity where it is claimed (and its failure where it is not), shapes, gradients, closed-form costs and bad-input
errors."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mice.petals import chord_test
from mice.utils import num_params
from mice.vectorhull import (LSEMixture, LegacyVectorHull, MLP, TopKMixture, VectorHull, VectorHullFoldPerCall,
                             VectorHullRotateInput, atlas_angles, atlas_matrices, count_flops, group_means,
                             legacy_closed_form, legacy_reference, max_of_means, rotate_pairs, scramble_,
                             vectorhull_suite)

SMALL = settings(max_examples=20, deadline=None)
FEW = settings(max_examples=6, deadline=None)
EPS = torch.finfo(torch.float64).eps


@SMALL
@given(st.integers(1, 33), st.integers(1, 16), st.integers(0, 2**16))
def test_charts_are_the_matrix_exponential_and_round_trip_exactly(D, P, seed):
    torch.manual_seed(seed)
    a = atlas_angles(P)
    c, s = a.cos()[:, None], a.sin()[:, None]
    x = torch.randn(7, P, D, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-3, 3).item()
    y = rotate_pairs(x, c, s)
    scale = x.abs().amax()
    assert (y - torch.einsum("pij,npj->npi", atlas_matrices(D, P), x)).abs().max() <= 8 * EPS * scale
    assert (rotate_pairs(y, c, -s) - x).abs().max() <= 4 * EPS * scale       # A_p^T A_p x = x to rounding


@SMALL
@given(st.integers(1, 6), st.integers(1, 5), st.booleans(), st.integers(0, 2**16))
def test_legacy_matches_its_float64_equations(D, P, invert, seed):
    torch.manual_seed(seed)
    m = LegacyVectorHull(D, P, invert=invert).double()
    with torch.no_grad():
        for t in (m.shifts, m.petals.bg, m.petals.b0, m.petals.c): t.normal_()
    x = torch.randn(16, D, dtype=torch.float64)
    ref = legacy_reference(m.petals, x, m.shifts, invert)
    # torch's softplus returns z for z > 20 (abs. error < 2e-9), as 0.5.0's nn.Softplus does; the reference is exact
    assert ((m(x) - ref).abs() / ref.abs().clamp_min(1)).max() < 1e-8
    params, flops = legacy_closed_form(D, P, invert=invert)
    assert num_params(m) == params and count_flops(m, x[:2]) == 2 * flops


@FEW
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([False, "nonneg"]), st.sampled_from(["softplus", "relu"]),
       st.integers(0, 2**16))
def test_claimed_convex_cases_pass_10k_chords(D, P, invert, act, seed):
    torch.manual_seed(seed)
    group = 1 + seed % P
    for m in (VectorHull(D, P, invert=invert, act=act, group=group), LSEMixture(D, P, invert=invert, act=act)):
        m = scramble_(m.double(), generator=torch.Generator().manual_seed(seed))
        r = chord_test(m, D, n=10_000, scale=2.0, generator=torch.Generator().manual_seed(seed))
        assert r.convex, (type(m).__name__, r)


@pytest.mark.parametrize("make", [lambda: VectorHull(6, 4, invert=True), lambda: LegacyVectorHull(6, 4),
                                  lambda: LegacyVectorHull(6, 4, invert=True), lambda: TopKMixture(6, 4)],
                         ids=["signed-invert", "legacy", "legacy-invert", "topk"])
def test_documented_non_convex_cases_violate(make):
    torch.manual_seed(0)
    m = scramble_(make().double(), generator=torch.Generator().manual_seed(1))
    r = chord_test(m, 6, n=10_000, scale=2.0, generator=torch.Generator().manual_seed(2))
    assert r.violations > 0, r


@pytest.mark.parametrize("invert", [False, True, "nonneg"])
def test_rotation_variants_compute_the_same_function(invert):
    torch.manual_seed(0)
    x = torch.randn(32, 7, dtype=torch.float64)
    m_in = VectorHullRotateInput(7, 5, invert=invert).double()
    m_fold = VectorHullFoldPerCall(7, 5, invert=invert).double()
    m_fold.load_state_dict(m_in.state_dict())
    m_init = VectorHull(7, 5, invert=invert).double()
    m_init.load_state_dict(m_in.state_dict())
    m_init.petals.fold_input_(atlas_matrices(7, 5))
    assert (m_in(x) - m_fold(x)).abs().max() < 1e-13 and (m_in(x) - m_init(x)).abs().max() < 1e-13


@SMALL
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**16))
def test_pair_fusion_fast_path_is_the_definition(P, O, seed):
    torch.manual_seed(seed)
    v, sh = torch.randn(11, P, O), torch.randn(P)
    assert torch.equal(max_of_means(v, sh, 2), (group_means(v, 2) + sh[:, None]).amax(1))


@SMALL
@given(st.lists(st.integers(1, 3), max_size=3), st.integers(1, 9), st.integers(1, 6), st.integers(1, 4))
def test_shapes_any_leading_dims(lead, D, P, O):
    x = torch.randn(*lead, D)
    for m in (VectorHull(D, P, out_dim=O), LSEMixture(D, P, out_dim=O), TopKMixture(D, P, out_dim=O, k=1),
              LegacyVectorHull(D, P, out_dim=O), MLP(D, out_dim=O)):
        assert m(x).shape == (*lead, O)


@pytest.mark.parametrize("cls, kw", [(VectorHull, {}), (VectorHull, {"invert": True}),
                                     (VectorHull, {"invert": "nonneg"}), (LegacyVectorHull, {}),
                                     (VectorHullFoldPerCall, {}), (VectorHullRotateInput, {}),
                                     (VectorHull, {"group": 3}), (VectorHull, {"depth": 2, "act": "relu"})])
def test_gradients_reach_every_parameter(cls, kw):
    torch.manual_seed(0)
    m = cls(6, 4, **kw)
    m(torch.randn(128, 6)).square().mean().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_legacy_invert_drops_shifts_like_0_5_0_and_ours_keeps_them():
    for cls, used in ((LegacyVectorHull, False), (VectorHull, True)):
        m = cls(6, 4, invert=True)
        m(torch.randn(8, 6)).sum().backward()
        assert (m.shifts.grad is not None) == used


def test_closed_form_costs():
    D, P = 64, 8
    assert legacy_closed_form(512, 8)[0] == 19_695_112
    m, mlp = VectorHull(D, P), MLP(D)
    assert num_params(m) == P * (5 * D * D + 3 * D + 1)
    assert count_flops(m, torch.randn(3, D)) == 3 * 10 * P * D * D
    assert num_params(mlp) == 8 * D * D + 5 * D and count_flops(mlp, torch.randn(3, D)) == 3 * 16 * D * D


@pytest.mark.parametrize("call, match", [
    (lambda: VectorHull(5, 3)(torch.randn(2, 4)), r"x: expected shape \[\.\.\., 5\]"),
    (lambda: VectorHull(5, 3)(torch.ones(2, 5, dtype=torch.long)), "floating-point"),
    (lambda: VectorHull(5, 3)([1.0] * 5), "torch.Tensor"),
    (lambda: LegacyVectorHull(5, 3)(torch.full((2, 5), float("inf"))), "NaN or inf"),
    (lambda: VectorHull(5, 3, out_dim=2, invert=True), "out_dim must equal"),
    (lambda: VectorHull(5, 3, invert="yes"), "invert"),
    (lambda: VectorHull(5, 3, group=4), "group"),
    (lambda: VectorHull(5, 3, group=True), "group"),
    (lambda: VectorHull(0, 3), "in_dim"),
    (lambda: VectorHull(5, 2.0), "petals"),
    (lambda: VectorHull(5, 3, rotation="dense"), "rotation"),
    (lambda: LegacyVectorHull(5, 3, invert="nonneg"), "invert"),
    (lambda: LegacyVectorHull(5, 3, out_dim=2, invert=True), "out_dim must equal"),
    (lambda: VectorHull(5, 3, act="tanh"), "act"),
    (lambda: TopKMixture(5, 3, k=4), "k:"),
    (lambda: LSEMixture(5, 3, temperature=-1.0), "temperature"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_compiles_fullgraph():
    for m in (VectorHull(6, 4), VectorHullFoldPerCall(6, 4, invert=True), VectorHullRotateInput(6, 4),
              LegacyVectorHull(6, 4)):
        x = torch.randn(5, 6)
        assert torch.allclose(torch.compile(m, backend="eager", fullgraph=True)(x), m(x), atol=1e-5)


def test_bench_suite_runs_on_cpu(tmp_path, capsys):
    from mice.bench import main
    out = tmp_path / "vh.json"
    main(["vectorhull", "--device", "cpu", "--sizes", "16", "--opt", "petals=2", "--tokens", "64", "--repeat", "1",
          "--warmup", "1", "--opt", "variants=mlp,vectorhull,legacy", "--out", str(out)],
         {"vectorhull": vectorhull_suite})
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows][1:] == ["mlp D=16 P=2", "vectorhull D=16 P=2", "legacy D=16 P=2"]
    assert {r["baseline"] for r in rows[1:]} == {"mlp D=16 P=2"} and "flop x 1.25" in rows[2]["note"]


def test_legacy_state_dict_layout_is_0_5_0_transcriptions():
    """`LegacyVectorHull` keeps the parameter names of the former `VectorHull(legacy=True)`: checkpoints load."""
    names = list(LegacyVectorHull(6, 4).state_dict())
    assert names == ["shifts"] + [f"petals.{n}" for n in ("w0", "b0", "w1", "b1", "wr", "br", "wg", "bg", "c")]


def _layer_ops(m, n=512):
    from mice.petals import layout_ops
    x, w = torch.randn(n, m.in_dim, requires_grad=True), torch.randn(n, m.out_dim)
    return layout_ops(lambda: (m(x) * w).sum().backward(), n * m.n_petals * m.out_dim)


def test_vectorhull_layer_has_no_layout_copies():
    "Forward + backward of a VectorHull layer: no full-size copy/fill/cat/stack/roll/index op outside the GEMMs."
    from mice.vectorhull import VectorHullReference
    torch.manual_seed(0)
    new, old = _layer_ops(VectorHull(8, 4)), _layer_ops(VectorHullReference(8, 4))
    print("now", new, "reference", old)
    assert new[0] == {}
    assert {"aten::roll", "aten::slice_backward", "aten::clone", "aten::zero_"} <= set(old[0])


@pytest.mark.parametrize("invert", [False, True, "nonneg"])
@pytest.mark.parametrize("depth", [1, 2])
def test_vectorhull_equals_reference_float64(invert, depth):
    from mice.vectorhull import VectorHullReference
    torch.manual_seed(depth)
    new = VectorHull(6, 4, invert=invert, depth=depth).double()
    ref = VectorHullReference(6, 4, invert=invert, depth=depth).double()
    ref.load_state_dict(new.state_dict())
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    yn, yr = new(x), ref(x)
    w = torch.randn_like(yr)
    gn = torch.autograd.grad((yn * w).sum(), [x, *new.parameters()])
    gr = torch.autograd.grad((yr * w).sum(), [x, *ref.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip([yn, *gn], [yr, *gr])) < 1e-13


def test_vectorhull_compiles_fullgraph_with_gradients():
    torch.manual_seed(0)
    m = VectorHull(8, 4)
    x = torch.randn(6, 8, requires_grad=True)
    yc = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    (gc,) = torch.autograd.grad(yc.sum(), x)
    (ge,) = torch.autograd.grad(m(x).sum(), x)
    torch._dynamo.reset()
    assert torch.allclose(yc, m(x), atol=1e-6) and torch.allclose(gc, ge, atol=1e-6)
