"Parameter and FLOP counts of every registered model against PyTorch's FLOP counter (`torch.utils.flop_counter`)."
import pytest
import torch
from mice.blocks import Attention
from mice.models import MODELS, MGMConfig, score_flops, build_model, counted_flops

SHAPE = dict(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
LEGACY = dict(legacy=True, mu=dict(norm="none"), inl=dict(bounds="clamp"))          # v0.13.0's math
CASES = [(name, {}) for name in sorted(MODELS)] + [("mu_inl", LEGACY), ("routed_modulo", dict(legacy=True))]


def _model(name, extra):
    torch.manual_seed(0)
    mem = dict(memory=dict(segment=16)) if isinstance(MODELS[name], MGMConfig) else {}
    return build_model(name, None, **SHAPE, **mem, **extra)


@pytest.mark.parametrize("name, extra", CASES, ids=[n + ("_legacy" if e else "") for n, e in CASES])
def test_flops_per_token_equals_the_counted_matmuls(name, extra):
    """`flops_per_token(T)` equals the FLOPs `FlopCounterMode` counts, row gathers written as one-hot matmuls aside,
    exactly: both count 2 per multiply-add of every matmul, attention's scores over all T keys (math SDPA with a mask
    computes them all), at T a multiple of the memory segment (where a windowed attention pads nothing)."""
    m = _model(name, extra)
    for T in (32, 64):
        counted, onehot = counted_flops(m, T)
        assert m.flops_per_token(T) == counted - onehot, (name, T, m.flops_per_token(T), counted, onehot)
    assert onehot == 0 or "mgm" in name          # only the curved geometric experts gather by one-hot matmuls


@pytest.mark.parametrize("name, extra", CASES, ids=[n + ("_legacy" if e else "") for n, e in CASES])
def test_active_parameters_match_the_matmul_flops(name, extra):
    """2 x `num_params(active=True)` is within 5% of the counted matmul FLOPs without attention's scores: the gap is
    parameters without per-token matmuls (norm gains, biases, mu_0, curvatures, initial memory slots) and FLOPs without
    per-token parameters (memory's per-segment work and slot attention, the legacy VectorHull's dense charts)."""
    m, T = _model(name, extra), 64
    counted, onehot = counted_flops(m, T)
    scores = sum(score_flops(a, T) for a in m.modules() if isinstance(a, Attention))
    ratio = 2 * m.num_params(active=True) / (counted - onehot - scores)
    assert abs(ratio - 1) < 0.05, (name, ratio)
    sparse = any(callable(getattr(x, "active_params", None)) for x in m.modules())
    assert (m.num_params(active=True) < m.num_params()) == sparse


def test_memory_window_is_not_counted_over_the_whole_sequence():
    "A working memory's attention costs its segment window per token, not T: at T = 4 L, a quarter of full attention."
    m = _model("dense_window", {})
    full = 4 * 256 * m.config.dim * m.config.n_layers
    assert sum(score_flops(a, 256) for a in m.modules() if isinstance(a, Attention)) == full // 16
    with pytest.raises(ValueError, match="seq_len: expected an integer >= 1"): m.flops_per_token(0)
