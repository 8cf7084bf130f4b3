"""Property tests (hypothesis) of the shared blocks and the model families, and their bad-input errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mice.blocks import Attention, RotaryEmbedding, causal_mask
from mice.models import DenseConfig, DenseModel, build_model, generate

SMALL = settings(max_examples=25, deadline=None)


@st.composite
def gqa_shapes(draw):
    g = draw(st.sampled_from([1, 2, 4]))
    h = g * draw(st.sampled_from([1, 2, 3]))
    return h, g, draw(st.integers(1, 3)), draw(st.integers(1, 10))


@SMALL
@given(gqa_shapes(), st.integers(0, 2**16))
def test_cache_equals_recompute(shape, seed):
    H, G, B, T = shape
    torch.manual_seed(seed)
    attn = Attention(8 * H, H, G)
    x = torch.randn(B, T, 8 * H)
    full = attn(x, torch.arange(T))
    kb = torch.zeros(B, G, T, 8)
    vb = torch.zeros_like(kb)
    steps = [attn(x[:, t:t + 1], torch.arange(t, t + 1), causal_mask(1, t), (kb, vb), t) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


@SMALL
@given(st.integers(1, 12), st.integers(0, 12))
def test_causal_mask_is_bottom_right(T, start):
    m = causal_mask(T, start)
    if start == 0:
        assert m is None
        return
    m = m[0, 0]
    assert m.shape == (T, start + T)
    for i in range(T):
        assert m[i].sum() == start + i + 1 and m[i, : start + i + 1].all()


@SMALL
@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 300))
def test_rope_scores_depend_on_offset_only(m, n, shift):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    s = lambda a, b: (rope(q, torch.tensor([a])) * rope(k, torch.tensor([b]))).sum()
    assert torch.allclose(s(m, n), s(m + shift, n + shift), atol=1e-4)


@SMALL
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(0, 5))
def test_generate_batch_equals_each_prompt_alone(lengths, new):
    torch.manual_seed(1)
    model = DenseModel(DenseConfig(vocab_size=31, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32))
    prompts = [torch.randint(0, 31, (n,)).tolist() for n in lengths]
    batched = generate(model, prompts, new, temperature=0)
    assert batched == [generate(model, [p], new, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, 31]]), "outside [0, 31)"),
    (torch.tensor([[-1, 2]]), "outside [0, 31)"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(4, dtype=torch.long), "[batch, seq_len]"),
    (torch.zeros(1, 4), "integer token ids"),
    ([[1, 2]], "torch.Tensor"),
    (torch.zeros(1, 33, dtype=torch.long), "max_seq_len"),
])
def test_bad_token_input(bad, message):
    model = DenseModel(DenseConfig(vocab_size=31, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32))
    with pytest.raises((ValueError, TypeError)) as e:
        model(bad)
    assert message in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, n_heads=4), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "must be even"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
])
def test_contradictory_config(kwargs, message):
    with pytest.raises(ValueError) as e:
        DenseConfig(**kwargs)
    assert message in str(e.value)


def test_unknown_model_and_preset():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_model("dense", "huge")


def test_generate_rejects_bad_arguments():
    model = DenseModel(DenseConfig(vocab_size=31, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8))
    for kwargs, msg in [(dict(prompts=[[]], max_new_tokens=1), "non-empty"),
                        (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens"),
                        (dict(prompts=[[1]], max_new_tokens=1, temperature=-1), "temperature"),
                        (dict(prompts=[[1]], max_new_tokens=1, top_k=0), "top_k"),
                        (dict(prompts=[[1] * 5], max_new_tokens=5), "max_seq_len")]:
        with pytest.raises(ValueError, match=msg):
            generate(model, **kwargs)


def test_generate_takes_ids_lists_and_padded_tensors():
    "`generate` accepts one list of ids, a list of them, or an id tensor with an attention mask; each comes back in kind."
    torch.manual_seed(0)
    m = DenseModel(DenseConfig(vocab_size=61, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)).eval()
    lists = generate(m, [[1, 2, 3], [7, 8]], 4, temperature=0)
    one = generate(m, [1, 2, 3], 3)
    assert isinstance(one, list) and len(one) == 6 and one[:3] == [1, 2, 3] and all(isinstance(t, int) for t in one)
    assert generate(m, [1, 2, 3], 4, temperature=0) == lists[0]
    right = torch.tensor([[1, 2, 3], [7, 8, 0]])           # padded on the right, as a tokenizer pads a batch
    left = torch.tensor([[1, 2, 3], [0, 7, 8]])
    for ids, mask in ((right, right != 0), (left, left != 0)):
        out = generate(m, ids, 4, temperature=0, attention_mask=mask.long())
        assert isinstance(out, torch.Tensor) and out.shape == (2, 7) and out.dtype == ids.dtype
        assert out[0].tolist() == lists[0] and out[1, 3:].tolist() == lists[1][2:]
    assert generate(m, torch.tensor([[1, 2, 3]]), 4, temperature=0)[0].tolist() == lists[0]


@pytest.mark.parametrize("prompts, kw, error, message", [
    ("ROMEO", {}, TypeError, "prompts: expected a list of token ids, a list of such lists, or an integer tensor"),
    (3, {}, TypeError, "got int"),
    ([1.5, 2.0], {}, TypeError, "got list of float"),
    ([[1, 2], "ab"], {}, TypeError, "prompts: expected"),
    (torch.zeros(2, 3), {}, TypeError, "dtype torch.float32"),
    (torch.ones(3, dtype=torch.long), {}, TypeError, "shape (3,)"),
    (torch.ones(2, 3, dtype=torch.long), {"attention_mask": torch.ones(2, 4)}, TypeError, "attention_mask: expected"),
    ([1, 2], {"attention_mask": torch.ones(1, 2)}, TypeError, "attention_mask: goes with a tensor"),
    ([[1, 2], []], {}, ValueError, "non-empty"),
    ([1, 99], {}, ValueError, "prompts: token ids must lie in [0, 61), got 99"),
    ([1, 2], {"temperature": float("nan")}, ValueError, "temperature: expected a number >= 0"),
    ([1, 2], {"temperature": float("inf")}, ValueError, "temperature: expected a number >= 0 and < inf"),
    ([1, 2], {"top_k": 0}, ValueError, "top_k: expected an integer >= 1"),
    ([1, 2], {"max_new_tokens": -1}, ValueError, "max_new_tokens: expected an integer >= 0"),
])
def test_generate_says_what_it_expects(prompts, kw, error, message):
    m = DenseModel(DenseConfig(vocab_size=61, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)).eval()
    with pytest.raises(error) as e: generate(m, prompts, **{"max_new_tokens": 3, **kw})
    assert message in str(e.value), str(e.value)


def _small(name):
    torch.manual_seed(0)
    return build_model(name, None, vocab_size=4096, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32).eval()


@pytest.mark.parametrize("name", sorted(__import__("mice.models", fromlist=["MODELS"]).MODELS))
def test_static_step_gives_the_sliced_paths_tokens(name):
    "Every registered model: the default path (the static step where exact) gives the sliced path's tokens, in fp32."
    m = _small(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 8, 7, 6]] if m.static_decode else [[1, 2, 3]]
    for kw in (dict(temperature=0), dict(seed=3), dict(temperature=0.7, top_k=5, seed=4)):
        assert generate(m, prompts, 8, **kw) == generate(m, prompts, 8, static=False, **kw)
    if not m.static_decode:
        with pytest.raises(ValueError, match="static: .* keeps a working memory"):
            generate(m, prompts, 2, static=True)


def test_static_step_compiles_once():
    "With `fullgraph=True, dynamic=False`, two generations of one shape (20 steps) trace the static step once."
    import torch._dynamo
    graphs = []
    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    m = _small("dense")
    opts = dict(backend=counting, fullgraph=True, dynamic=False)
    for p in ([[5, 6, 7, 8], [3, 4, 0, 0]], [[1, 2, 3, 4], [9, 9, 8, 8]]):
        assert generate(m, p, 10, seed=0, compile=opts) == generate(m, p, 10, seed=0, static=False)
    torch._dynamo.reset()
    assert len(graphs) == 1


def test_next_tokens_is_multinomials_draw():
    from mice.models import next_tokens
    for s in range(5):
        logits = torch.randn(3, 100) * 3
        g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)
        assert torch.equal(next_tokens(logits, 1.0, None, g1), torch.multinomial(logits.softmax(-1), 1, generator=g2))
        assert torch.equal(g1.get_state(), g2.get_state())
