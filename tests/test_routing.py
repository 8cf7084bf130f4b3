"""Token-routed MLP and top-k MoE (mice.routing): every path against the float64 per-token reference, forward and
backward; routing tables; training updates every expert; compile; configs; bad input."""
import math
from typing import get_args

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mice.blocks import SwiGLU
from mice.routing import (Dispatch, GroupedExperts, LegacyTokenRoutedMLP, LoopMoE, MoEConfig, Permute, RoutedConfig,
                          TokenRoutedMLP, TopKMoE, VariantTokenRoutedMLP, balanced_table, expert_load, grouped_mm_ok,
                          hash_table, imbalance, modulo_table, moe_apply, moe_apply_variant, reference_errors,
                          reference_moe, routing_stats, routing_table, sort_by_count, sort_by_expert)
from mice.utils import num_params

FEW = settings(max_examples=15, deadline=None)
GROUPED = grouped_mm_ok(torch.zeros(1, 16), torch.zeros(1, 64, 16))


# ---------------------------------------------------------------- routing tables
def test_modulo_and_hash_balance_vocabulary_types():
    assert torch.equal(modulo_table(7, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    h = hash_table(4096, 16, seed=3)
    assert torch.bincount(h, minlength=16).tolist() == [256] * 16
    assert torch.equal(h, hash_table(4096, 16, seed=3)) and not torch.equal(h, hash_table(4096, 16, seed=4))


@FEW
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=200), st.integers(1, 9), st.none() | st.integers(0, 99))
def test_balanced_table_meets_the_greedy_bound(counts, E, seed):
    c = np.array(counts)
    table = balanced_table(c, E, seed).numpy()
    assert table.min() >= 0 and table.max() < E
    load = np.bincount(table, weights=c, minlength=E)
    assert load.sum() == c.sum()
    # greedy to the least-loaded expert (Graham 1966): makespan <= mean + (1 - 1/E) * largest count,
    # and the heaviest expert exceeds the lightest by at most one count
    assert load.max() <= c.sum() / E + (1 - 1 / E) * c.max() + 1e-9
    assert load.max() - load.min() <= c.max() + 1e-9


@FEW
@given(st.lists(st.integers(0, 50), min_size=1, max_size=7), st.integers(1, 3))
def test_balanced_table_within_lpt_ratio_of_brute_force_optimum(counts, E):
    import itertools
    c = np.array(counts)
    best = min(np.bincount(a, weights=c, minlength=E).max() for a in itertools.product(range(E), repeat=len(c)))
    load = np.bincount(balanced_table(c, E).numpy(), weights=c, minlength=E)
    assert load.max() <= (4 / 3 - 1 / (3 * E)) * best + 1e-9            # LPT (Graham 1969)


def test_balanced_table_known_optimum_and_zero_counts_spread():
    t = balanced_table([7, 5, 4, 3, 1], 2).numpy()
    assert sorted(np.bincount(t, weights=[7, 5, 4, 3, 1]).tolist()) == [10.0, 10.0]
    t = balanced_table([0] * 12, 4).numpy()             # ties: fewest types first -> 3 types each
    assert np.bincount(t, minlength=4).tolist() == [3, 3, 3, 3]


def test_routing_table_balanced_on_given_counts_and_load():
    counts = np.random.default_rng(0).zipf(1.3, 512).clip(max=10_000)
    ids = np.repeat(np.arange(512), counts)
    mod = imbalance(expert_load(routing_table("modulo", 512, 8), ids, 8))
    bal = imbalance(expert_load(routing_table("balanced", 512, 8, counts=counts), ids, 8))
    assert bal <= mod and bal <= 1 + (1 - 1 / 8) * 8 * counts.max() / counts.sum() + 1e-9   # mean + (1-1/E) max


# ---------------------------------------------------------------- dispatch
@FEW
@given(st.integers(0, 300), st.integers(1, 12), st.integers(0, 2**16))
def test_sort_by_expert_is_a_permutation_with_offsets(M, E, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, E, (M,), generator=g)
    order, inverse, offs = sort_by_expert(e, E)
    assert torch.equal(torch.sort(order).values, torch.arange(M))
    assert torch.equal(order[inverse], torch.arange(M)) and torch.equal(inverse[order], torch.arange(M))
    assert torch.equal(offs, torch.bincount(e, minlength=E).cumsum(0).int()) and offs.dtype == torch.int32
    assert (torch.diff(e[order]) >= 0).all()
    for a, b in zip(sort_by_count(e, E), (order, inverse, offs)): assert torch.equal(a, b)


CASES = [("loop", torch.float64, 1e-12)] + ([("grouped_mm", torch.float32, 2e-5)] if GROUPED else [])


VARIANTS = [None] + [dict(dispatch=d, permute=p) for d in get_args(Dispatch) for p in get_args(Permute)]


@pytest.mark.parametrize("impl,dtype,tol", CASES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "moe_apply" if v is None else "-".join(v.values()))
@pytest.mark.parametrize("k", [1, 2])
def test_moe_apply_equals_float64_reference(impl, dtype, tol, variant, k):
    "The production `moe_apply` (None) and every benchmark variant."
    torch.manual_seed(k)
    E, N = 5, 11
    ex = GroupedExperts(E, 16, 24, impl=impl, init_std=0.3).to(dtype)
    expert = torch.stack([torch.randperm(E)[:k] for _ in range(N)])       # distinct experts per token
    expert[expert == 4] = 3 if k == 1 else expert[expert == 4]             # k=1: expert 4 stays empty
    weight = torch.rand(N, k, dtype=dtype)
    apply, kw = (moe_apply, {}) if variant is None else (moe_apply_variant, variant)
    err = reference_errors(ex, torch.randn(N, 16, dtype=dtype), expert, weight, apply, **kw)
    assert max(err.values()) < tol, err
    if k == 1:                                                              # token routing: no weights
        err = reference_errors(ex, torch.randn(N, 16, dtype=dtype), expert, None, apply, **kw)
        assert max(err.values()) < tol, err


@pytest.mark.parametrize("permute", [None, *get_args(Permute)])
def test_gradcheck_through_layer(permute):
    "The production `moe_apply` (None) and each permutation variant."
    ex = GroupedExperts(3, 4, 6, init_std=0.5).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]])
    gu, dn = (p.detach().clone().requires_grad_() for p in (ex.gate_up, ex.down))

    def layer(x, w, gu, dn):
        class Swap:                                  # the experts with the checked leaves as weights
            n_experts = 3
            def __call__(self, t, offs): return torch.func.functional_call(ex, {"gate_up": gu, "down": dn}, (t, offs))
        if permute is None: return moe_apply(x, expert, w, Swap())[0]
        return moe_apply_variant(x, expert, w, Swap(), permute=permute)[0]
    assert torch.autograd.gradcheck(layer, (x, w, gu, dn), fast_mode=permute not in (None, "gather"))


def test_unaligned_width_falls_back_and_is_exact():
    ex = GroupedExperts(3, 6, 10, init_std=0.3)                             # 6 * 4 bytes: not 16-byte aligned
    assert not grouped_mm_ok(torch.zeros(1, 6), ex.gate_up, ex.down)
    err = reference_errors(ex, torch.randn(9, 6), torch.randint(0, 3, (9, 1)))
    assert max(err.values()) < 1e-5


# ---------------------------------------------------------------- layers
def test_one_expert_with_dense_weights_is_the_dense_swiglu():
    dense = SwiGLU(16, 40)
    m = TokenRoutedMLP(16, 40, 1, vocab_size=10)
    m.experts.gate_up.data[0], m.experts.down.data[0] = dense.gate_up.weight.data, dense.down.weight.data
    x = torch.randn(3, 4, 16)
    assert torch.allclose(m(x, torch.randint(0, 10, (3, 4))), dense(x), atol=1e-6)


@pytest.mark.parametrize("route", ["modulo", "hash", "balanced"])
def test_token_routed_equals_reference_and_loop(route):
    m = TokenRoutedMLP(16, 24, 4, vocab_size=40, route=route, counts=np.arange(40), shared_hidden=8, init_std=0.2)
    x, ids = torch.randn(2, 9, 16), torch.randint(0, 40, (2, 9))
    y = m(x, ids)
    ref = reference_moe(x.view(-1, 16), m.table[ids].view(-1, 1), None, m.experts.gate_up, m.experts.down)
    assert torch.allclose(y.double(), ref.view(2, 9, 16) + m.shared(x).double(), atol=1e-5)
    assert torch.allclose(LoopMoE(m)(x, ids) + m.shared(x), y, atol=1e-5)
    assert m.load.tolist() == torch.bincount(m.table[ids].flatten(), minlength=4).tolist()
    assert m.aux_loss.item() == 0


def test_state_dict_round_trip_keeps_table():
    a = TokenRoutedMLP(16, 24, 4, vocab_size=40, route="hash", seed=1)
    b = TokenRoutedMLP(16, 24, 4, vocab_size=40, route="modulo")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.table, b.table)
    x, ids = torch.randn(5, 16), torch.randint(0, 40, (5,))
    assert torch.equal(a(x, ids), b(x, ids))


def _changed(before, after): return (before != after).flatten(1).any(1)


@pytest.mark.parametrize("make", [lambda: TokenRoutedMLP(16, 24, 8, vocab_size=64),
                                  lambda: TokenRoutedMLP(16, 24, 8, vocab_size=64, route="hash", shared_hidden=8),
                                  lambda: TopKMoE(16, 24, 8, k=2)])
def test_every_expert_changes_after_one_step(make):
    m = make()
    x, ids = torch.randn(4, 32, 16), torch.arange(128).view(4, 32) % 64
    before = [p.detach().clone() for p in (m.experts.gate_up, m.experts.down)]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    xin = x.clone().requires_grad_()
    out = m(xin, ids)
    (out.square().mean() + m.aux_loss).backward()
    opt.step()
    assert (m.load > 0).all()                                           # every expert got tokens...
    for b, p in zip(before, (m.experts.gate_up, m.experts.down)): assert _changed(b, p).all()   # ...and moved
    assert xin.grad is not None and xin.grad.abs().sum() > 0
    if isinstance(m, TopKMoE): assert m.router.weight.grad.abs().sum() > 0


def test_legacy_reproduces_frozen_experts():
    m = LegacyTokenRoutedMLP(16, 24, 4, vocab_size=64)
    x = torch.randn(8, 16, requires_grad=True)
    y = m(x, torch.arange(8))
    assert not y.requires_grad and m.experts.gate_up.grad is None and m.route == "modulo"


@pytest.mark.parametrize("override", [None, "hard"])
def test_legacy_layer_is_the_routed_layer_without_gradient(override):
    "Same parameters, buffers, names and RNG use as `TokenRoutedMLP` with the same options; the same forward values."
    kw = dict(vocab_size=64, mu_override=override, mu_dim=6)
    torch.manual_seed(0)
    legacy = LegacyTokenRoutedMLP(16, 24, 4, **kw)
    after_legacy = torch.rand(2)
    torch.manual_seed(0)
    routed = TokenRoutedMLP(16, 24, 4, route="modulo", **kw)
    assert torch.equal(after_legacy, torch.rand(2))
    assert list(legacy.state_dict()) == list(routed.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(legacy.state_dict().values(), routed.state_dict().values()))
    x, ids, mu = torch.randn(2, 9, 16), torch.randint(0, 64, (2, 9)), torch.randn(2, 9, 6) * 100
    args = (x, ids, mu) if override else (x, ids)
    assert torch.equal(legacy(*args), routed(*args).detach())
    with pytest.raises(ValueError, match="mu_override: expected one of"):
        LegacyTokenRoutedMLP(16, 24, 4, mu_override="soft")


@pytest.mark.parametrize("dispatch", get_args(Dispatch))
@pytest.mark.parametrize("permute", get_args(Permute))
def test_variant_layer_matches_the_production_layer(dispatch, permute):
    torch.manual_seed(0)
    v = VariantTokenRoutedMLP(16, 24, 4, vocab_size=40, route="hash", shared_hidden=8, dispatch=dispatch,
                              permute=permute)
    torch.manual_seed(0)
    m = TokenRoutedMLP(16, 24, 4, vocab_size=40, route="hash", shared_hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(v.state_dict().values(), m.state_dict().values()))
    x, ids = torch.randn(3, 7, 16, requires_grad=True), torch.randint(0, 40, (3, 7))
    assert torch.allclose(v(x, ids), m(x, ids), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(v.plan(ids), m.plan(ids)))


def test_active_params_is_what_one_token_uses():
    routed = TokenRoutedMLP(16, 32, 4, vocab_size=40, route="hash", shared_hidden=8, mu_override="soft", mu_dim=6)
    assert routed.active_params() == 3 * 16 * 32 + 3 * 16 * 8 + 6 * 4 == routed.flops_per_token() // 2
    moe = TopKMoE(16, 32, 4, k=2)
    assert moe.active_params() == 16 * 4 + 2 * 3 * 16 * 32
    both = torch.nn.ModuleList([routed, moe])
    assert num_params(both, active=True) == routed.active_params() + moe.active_params()
    assert num_params(both) == 4 * 3 * 16 * 32 + 3 * 16 * 8 + 6 * 4 + 1 + 16 * 4 + 4 * 3 * 16 * 32


def test_topk_losses_and_capacity():
    torch.manual_seed(0)
    moe = TopKMoE(8, 16, 4, k=2, capacity_factor=0.5, init_std=1.0)
    x = torch.randn(40, 8)
    y = moe(x)
    logits, expert, weight = moe.route(x)
    keep = moe.keep(expert)
    C = math.ceil(0.5 * 40 * 2 / 4)
    assert torch.bincount(expert[keep], minlength=4).max() <= C and moe.dropped == (~keep).sum() > 0
    ref = reference_moe(x, expert, weight * keep, moe.experts.gate_up, moe.experts.down)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    f = torch.bincount(expert.flatten(), minlength=4).float() / 80
    assert torch.allclose(moe.balance_loss, 4 * (f * logits.softmax(-1).mean(0)).sum())
    assert torch.allclose(moe.z_loss, torch.logsumexp(logits, -1).square().mean())
    assert torch.allclose(moe.aux_loss, 0.01 * moe.balance_loss + 1e-3 * moe.z_loss)
    moe.router.weight.data.zero_()
    moe.capacity_factor = None
    moe(x)
    assert torch.allclose(moe.balance_loss, torch.tensor(1.0)) and moe.dropped is None


def test_autocast_bf16_matches_fp32():
    m = TokenRoutedMLP(16, 32, 4, vocab_size=20, route="hash", init_std=0.2)
    x, ids = torch.randn(64, 16), torch.randint(0, 20, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16): y = m(x, ids)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), m(x, ids), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not grouped_mm_ok(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(1, 128, 64)),
                    reason="grouped_mm does not run in bf16 here")
def test_compile_fullgraph_forward_and_backward():
    for m in (TokenRoutedMLP(64, 128, 4, vocab_size=100, route="hash"), TopKMoE(64, 128, 4, k=2)):
        m = m.bfloat16()
        x, ids = torch.randn(3, 8, 64, dtype=torch.bfloat16), torch.randint(0, 100, (3, 8))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = m(x1, ids)
        y1.float().square().sum().backward()
        g1 = m.experts.gate_up.grad.clone()
        m.zero_grad()
        torch._dynamo.reset()
        y2 = torch.compile(m, backend="aot_eager", fullgraph=True)(x2, ids)
        y2.float().square().sum().backward()
        assert torch.equal(y1, y2) and torch.allclose(x1.grad, x2.grad) and torch.allclose(g1, m.experts.gate_up.grad)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,msg", [
    (lambda m, x, i: m(x, i + 50), "outside [0, 50)"),
    (lambda m, x, i: m(x, i[:, :3]), "token_ids: expected shape (2, 5)"),
    (lambda m, x, i: m(x[..., :8], i), "x: expected shape [..., 16]"),
    (lambda m, x, i: m(x, i.float()), "token_ids: expected integer token ids"),
    (lambda m, x, i: m(x, i.to(torch.int16)), "(int64 or int32)"),
    (lambda m, x, i: m(i, i), "x: expected a floating-point tensor"),
    (lambda m, x, i: m(x.masked_fill(x > 1, float("inf")), i), "NaN or inf"),
])
def test_bad_input(call, msg):
    m = TokenRoutedMLP(16, 32, 4, vocab_size=50)
    with pytest.raises((ValueError, TypeError), match=None) as e:
        call(m, torch.randn(2, 5, 16), torch.randint(0, 50, (2, 5)))
    assert msg in str(e.value)


@pytest.mark.parametrize("make,msg", [
    (lambda: TokenRoutedMLP(16, 32, 4, vocab_size=50, route="zipf"), "route: expected one of"),
    (lambda: TokenRoutedMLP(16, 32, 4, vocab_size=0), "vocab_size: expected an integer >= 1"),
    (lambda: TokenRoutedMLP(16, 32, 4, vocab_size=8, table=torch.arange(8)), "table: expected 8 (vocab_size)"),
    (lambda: TokenRoutedMLP(16, 32, 4, vocab_size=8, route="balanced", counts=[1, -1] * 4), "non-negative"),
    (lambda: TokenRoutedMLP(16, 32, 4, vocab_size=8, shared_hidden=-1), "shared_hidden: expected an integer >= 0"),
    (lambda: VariantTokenRoutedMLP(16, 32, 4, vocab_size=8, dispatch="radix"), "dispatch: expected one of"),
    (lambda: VariantTokenRoutedMLP(16, 32, 4, vocab_size=8, permute="copy"), "permute: expected one of"),
    (lambda: TopKMoE(16, 32, 4, k=0), "k: expected an integer in [1, 4], got 0"),
    (lambda: TopKMoE(16, 32, 4, k=5), "k: expected an integer in [1, 4], got 5"),
    (lambda: TopKMoE(16, 32, 4, capacity_factor=-1.0), "capacity_factor: expected a number > 0"),
    (lambda: GroupedExperts(4, 16, 0), "hidden: expected an integer >= 1"),
    (lambda: GroupedExperts(4, 16, 8, impl="triton"), "impl: expected one of ('auto', 'grouped_mm', 'loop')"),
    (lambda: LegacyTokenRoutedMLP(16, 32, 4, mu_override="straight"), "mu_override: expected one of (None, 'hard')"),
])
def test_bad_config(make, msg):
    with pytest.raises((ValueError, TypeError)) as e: make()
    assert msg in str(e.value)


# ---------------------------------------------------------------- configs and statistics
def test_configs_validate_their_fields():
    assert RoutedConfig() == RoutedConfig(8, None, 0, "balanced", False, None)
    assert MoEConfig() == MoEConfig(8, None, 0, 1, None, 0.01, 1e-3)
    assert RoutedConfig().expert_width(96) == 96 and MoEConfig(top_k=2).expert_width(96) == 48
    assert MoEConfig(top_k=4).expert_width(16) == 8                          # at least 8, as before
    for make, msg in [(lambda: RoutedConfig(route="zipf"), "RoutedConfig.route: expected one of"),
                      (lambda: RoutedConfig(route_per_layer=1), "RoutedConfig.route_per_layer: expected one of"),
                      (lambda: RoutedConfig(route="modulo", route_per_layer=True), "modulo table has no seed"),
                      (lambda: RoutedConfig(mu_override="argmax"), "RoutedConfig.mu_override: expected one of"),
                      (lambda: RoutedConfig(expert_hidden=0), "RoutedConfig.expert_hidden: expected an integer >= 1"),
                      (lambda: MoEConfig(top_k=9), "MoEConfig.top_k: expected an integer in [1, 8]"),
                      (lambda: MoEConfig(capacity_factor=-1.0), "MoEConfig.capacity_factor: expected a number > 0"),
                      (lambda: MoEConfig(z_weight=-1.0), "MoEConfig.z_weight: expected a number >= 0")]:
        with pytest.raises(ValueError) as e: make()
        assert msg in str(e.value)


def test_routing_stats_reads_every_routed_module_in_order():
    "Any model: the routed submodules (their `load` set) in module order, numbered by their position among them."
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 16)
            self.first = TokenRoutedMLP(16, 24, 4, vocab_size=40, route="hash")
            self.dense = torch.nn.Linear(16, 16)
            self.second = TopKMoE(16, 24, 4, k=2)
            self.unused = TokenRoutedMLP(16, 24, 4, vocab_size=40)         # never called: its load stays None

        def forward(self, idx):
            x = self.embed(idx)
            return self.second(self.dense(x + self.first(x, idx)))

    model, idx = Model(), torch.randint(0, 40, (2, 11))
    stats = routing_stats(model, idx)
    assert [s["layer"] for s in stats] == [0, 1] and all(s["overridden"] is None for s in stats)
    assert stats[0]["imbalance"] == imbalance(expert_load(model.first.table, idx.flatten(), 4))
    assert stats[1]["imbalance"] == imbalance(model.second.load.numpy())


def test_models_build_the_layers_from_their_configs():
    "Needs mice.models (DESIGN.md API)."
    from mice.models import build_model
    shape = dict(dim=32, hidden=96, vocab_size=64, n_layers=3, n_heads=2, n_kv_heads=1)
    model = build_model("routed", None, **shape,
                        experts=dict(n_experts=4, shared_hidden=16, route="hash", route_per_layer=True))
    a, b = model.blocks[0].mlp, model.blocks[1].mlp
    assert a.n_experts == 4 and a.experts.hidden == 96 and a.shared.hidden == 16 and not torch.equal(a.table, b.table)
    assert math.isclose(a.experts.out_std, 0.02 / math.sqrt(6)) and a.mu_override is None
    m = build_model("top2", None, **shape, moe=dict(capacity_factor=1.25, balance_weight=0.1)).blocks[0].mlp
    assert isinstance(m, TopKMoE) and m.k == 2 and m.experts.hidden == 48
    assert m.capacity_factor == 1.25 and m.balance_weight == 0.1 and m.z_weight == 1e-3
    legacy = build_model("routed_modulo", None, **shape, legacy=True, experts=dict(mu_override="hard")).blocks[0].mlp
    assert isinstance(legacy, LegacyTokenRoutedMLP) and legacy.route == "modulo" and legacy.mu_override == "hard"


# ---------------------------------------------------------------- the mu override
def _override_layer(mode, std=2.0, seed=0):
    torch.manual_seed(seed)
    m = TokenRoutedMLP(12, 20, 4, vocab_size=40, route="hash", mu_override=mode, mu_dim=5).double()
    torch.nn.init.normal_(m.mu_router.weight, std=std)
    x, ids, mu = torch.randn(3, 11, 12).double(), torch.randint(0, 40, (3, 11)), torch.randn(3, 11, 5).double()
    return m, x, ids, mu


@pytest.mark.parametrize("mode", ["soft", "straight"])
def test_learnable_override_router_gets_gradient(mode):
    m, x, ids, mu = _override_layer(mode)
    m(x, ids, mu).square().sum().backward()
    assert 0 < m.overridden < 1
    assert m.mu_router.weight.grad is not None and (m.mu_router.weight.grad != 0).all()
    assert m.table_logit.grad is not None and m.table_logit.grad != 0


def test_hard_override_router_gets_no_gradient():
    m, x, ids, mu = _override_layer("hard", std=8.0)
    mu = mu.requires_grad_()
    m(x, ids, mu).square().sum().backward()
    assert 0 < m.overridden < 1 and m.mu_router.weight.grad is None and mu.grad is None


@given(seed=st.integers(0, 10_000), std=st.floats(0.0, 5.0))
@FEW
def test_straight_through_forward_is_the_hard_choice(seed, std):
    "straight: weight 1 forward, so the output is the unweighted expert that argmax z picks; soft scales it by p_e <= 1."
    m, x, ids, mu = _override_layer("straight", std, seed)
    expert, weight = m.assign(ids.flatten(), mu.view(-1, 5))
    assert torch.equal(weight, torch.ones_like(weight))
    plain, _ = moe_apply(x.view(-1, 12), expert, None, m.experts)
    assert torch.equal(m(x, ids, mu).view(-1, 12), plain)
    s = TokenRoutedMLP(12, 20, 4, vocab_size=40, route="hash", mu_override="soft", mu_dim=5).double()
    s.load_state_dict(m.state_dict())
    e2, p = s.assign(ids.flatten(), mu.view(-1, 5))
    assert torch.equal(e2, expert) and (p > 0).all() and (p <= 1).all()
    assert torch.allclose(s(x, ids, mu).view(-1, 12), plain * p, atol=1e-12)


def test_override_in_a_model_trains_its_router():
    from mice.models import build_model
    model = build_model("routed_mu_straight", None, vocab_size=61, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                        experts=dict(n_experts=4, route="hash"))
    before = [b.mlp.mu_router.weight.detach().clone() for b in model.blocks]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 61, (4, 17))
    for _ in range(2):          # step 1 moves ContextualMu off zero (mu is exactly 0 at init); step 2 reaches the router
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all((b.mlp.mu_router.weight != w).any() for b, w in zip(model.blocks, before))
    assert all(b.mlp.overridden is not None for b in model.blocks)


def test_trained_routing_stats_reports_every_layer():
    "Needs mice.experiments (the function moved there, with the same signature)."
    from mice.experiments import trained_routing_stats
    stats = trained_routing_stats("routed_mu_straight", steps=2, batch_size=2, seq_len=32, eval_every=2,
                                  eval_tokens=256, full_final_eval=False, val_tokens=256)
    assert [s["layer"] for s in stats] == [0, 1, 2, 3]
    assert all(s["imbalance"] >= 1 and 0 <= s["overridden"] <= 1 for s in stats)


@FEW
@given(n=st.integers(1, 64), mu_dim=st.sampled_from([8, 48]), mode=st.sampled_from(["soft", "straight"]),
       seed=st.integers(0, 2**16))
def test_mu_router_in_bf16_is_the_float32_rule_rounded(n, mu_dim, mode, seed):
    "bf16 mu gives float32 weights within bf16 rounding of the float32 rule's, where both pick the same expert."
    from mice.routing import mu_route
    g = torch.Generator().manual_seed(seed)
    base, mu = torch.randint(0, 8, (n,), generator=g), torch.randn(n, mu_dim, generator=g)
    W, b = torch.randn(8, mu_dim, generator=g) * 0.5, torch.tensor(1.5)
    e32, w32 = mu_route(base, mu, W, b, mode)
    e16, w16 = mu_route(base, mu.bfloat16(), W.bfloat16(), b.bfloat16(), mode)
    assert w16.dtype == torch.float32 and e16.shape == e32.shape == (n, 1)
    same = e16 == e32
    assert ((w16 - w32).abs() * same).max() < 3e-2


def test_mu_router_never_copies_mu_and_has_finite_gradients_at_zero():
    from torch.profiler import profile
    from mice.routing import mu_route
    mu = torch.zeros(32, 24, dtype=torch.bfloat16, requires_grad=True)     # a model's mu starts at zero
    W, b = (torch.randn(4, 24) * 0.1).bfloat16().requires_grad_(), torch.tensor(2.0).requires_grad_()
    with profile() as prof:
        mu_route(torch.arange(32) % 4, mu, W, b, "straight")[1].sum().backward()
    assert not [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")
                and [32, 24] in (e.input_shapes or [])]
    assert all(torch.isfinite(t.grad).all() for t in (mu, W, b))
