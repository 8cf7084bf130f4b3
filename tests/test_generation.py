"`generate` for every model family: its errors, nucleus sampling, end-of-sequence ids, streaming, and the KV cache."
import math
import pytest
import torch
from mice.models import DenseConfig, DenseModel, MGMConfig, MODELS, build_model, generate, sampling_probs


def _dense(**kw):
    torch.manual_seed(0)
    shape = dict(vocab_size=61, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64) | kw
    return DenseModel(DenseConfig(**shape)).eval()


def _small(name):
    "Model `name` at a tiny size; working memories with segments of 8 tokens, so that decoding crosses segments."
    torch.manual_seed(0)
    mem = dict(memory=dict(segment=8)) if isinstance(MODELS[name], MGMConfig) else {}
    return build_model(name, None, vocab_size=4096, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                       **mem).eval()


IDS = torch.tensor([[1, 2, 3], [0, 7, 8]])
M = torch.tensor([[1, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize("kw, error, message", [
    (dict(attention_mask=M.float()), TypeError, "attention_mask: expected 1 for a real token and 0 for padding, as an "
     "integer or bool tensor (as tokenizers give); got dtype torch.float32"),
    (dict(attention_mask=M.tolist()), TypeError, "attention_mask: expected 1 for a real token and 0 for padding"),
    (dict(attention_mask=M * 2), ValueError, "; got value 2"),
    (dict(attention_mask=-M), ValueError, "; got value -1"),
    (dict(attention_mask=M[:, 1:]), ValueError, "attention_mask: expected the prompts' shape (2, 3), got (2, 2)"),
    (dict(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), ValueError,
     "attention_mask: row 1 marks no real token"),
    (dict(top_p=0.0), ValueError, "top_p: expected a number > 0 and <= 1, got 0.0"),
    (dict(top_p=1.5), ValueError, "top_p: expected a number > 0 and <= 1, got 1.5"),
    (dict(top_p=math.nan), ValueError, "top_p: expected a number > 0"),
    (dict(eos=61), ValueError, "eos: expected a token id or a non-empty list of them, in [0, 61), got 61"),
    (dict(eos=[]), ValueError, "eos: expected a token id or a non-empty list"),
    (dict(eos=[3, -1]), ValueError, "got [3, -1]"),
    (dict(eos="\n"), ValueError, "eos: expected"),
    (dict(eos=3, pad_id=-1), ValueError, "pad_id: expected an integer >= 0, got -1"),
    (dict(stream=[]), TypeError, "stream: expected a function of each step's tokens"),
])
def test_generate_names_the_bad_argument(kw, error, message):
    with pytest.raises(error) as e: generate(_dense(), IDS, 3, **{"attention_mask": M, **kw})
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("mask", [M, M.bool(), M.int(), M.to(torch.uint8)])
def test_integer_and_bool_masks_are_accepted(mask):
    "Hugging Face's int64 0/1 masks, bool and other integer ones give the same tokens as the lists they mark."
    m = _dense()
    out = generate(m, IDS, 4, temperature=0, attention_mask=mask)
    assert out[:, 3:].tolist() == [r[-4:] for r in generate(m, [[1, 2, 3], [7, 8]], 4, temperature=0)]


@pytest.mark.parametrize("prompts, message", [
    ([[1, 2], []], "prompts: every prompt needs a token (non-empty)"),
    (torch.zeros(1, 0, dtype=torch.long), "prompts: every prompt needs a token (non-empty)"),
    (torch.zeros(0, 3, dtype=torch.long), "prompts: every prompt needs a token (non-empty)"),
    ([1, 61], "prompts: token ids must lie in [0, 61), got 61"),
    (torch.tensor([[1, 99]]), "prompts: token ids must lie in [0, 61), got 99"),
    ([[1, 2], [-1]], "prompts: token ids must lie in [0, 61), got -1"),
])
def test_empty_prompts_and_ids_outside_the_vocabulary(prompts, message):
    with pytest.raises(ValueError) as e: generate(_dense(), prompts, 3)
    assert message in str(e.value), str(e.value)


def test_a_cache_of_another_shape_is_refused_by_name():
    "A cache of another batch, depth, head count or head width: one error that says what differs, in forward and step."
    m, idx = _dense(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    cases = [(m.new_cache(3, 8), "batch 3 (expected 2)"),
             (_dense(n_layers=1).new_cache(2, 8), "layers 1 (expected 2)"),
             (_dense(n_heads=2, n_kv_heads=2).new_cache(2, 8), "kv_heads 2 (expected 1)"),
             (_dense(dim=64).new_cache(2, 8), "head_dim 32 (expected 16)")]
    for cache, message in cases:
        with pytest.raises(ValueError) as e: m(idx, cache)
        assert str(e.value).startswith("cache: made for another model or batch: " + message), str(e.value)
        with pytest.raises(ValueError, match="cache: made for another model or batch"):
            m.decode_step(idx[:, :1], cache)
    with pytest.raises(TypeError, match="cache: expected a KVCache"): m(idx, {"k": None})
    with pytest.raises(ValueError, match="cache: holds 4 tokens; 0 \\+ 5 would overflow it"):
        m(torch.ones(2, 5, dtype=torch.long), m.new_cache(2, 4))


def test_nan_logits_are_an_error_not_tokens():
    "A model whose logits are NaN (a diverged checkpoint) gets an error naming the rows, on both paths and streaming."
    m = _dense()
    with torch.no_grad(): m.norm.weight.fill_(math.nan)
    for kw in (dict(temperature=0), dict(seed=0, static=False), dict(temperature=0, stream=lambda t: None)):
        with pytest.raises(FloatingPointError, match=r"logits: NaN or inf in row\(s\) \[0, 1\]"):
            generate(m, [[1, 2], [3]], 4, **kw)


def test_nucleus_sampling_never_leaves_the_nucleus():
    """`top_p`: probability 0 outside the fewest likeliest tokens whose mass reaches top_p, renormalised inside, the
    likeliest token always in; 4000 draws by `generate` never leave the nucleus."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    for top_p in (0.05, 0.3, 0.9):
        p, q = logits.softmax(-1), sampling_probs(logits, 1.0, top_p=top_p)
        sp, order = p.sort(-1, descending=True)
        size = ((sp.cumsum(-1) - sp) < top_p).sum(-1)                   # the nucleus: the first `size` in order
        for r in range(3):
            inside = order[r, :size[r]]
            assert q[r, inside].sum().item() == pytest.approx(1, abs=1e-6)
            assert torch.allclose(q[r, inside], p[r, inside] / p[r, inside].sum())
            assert sp[r, :size[r]].sum() >= top_p and (size[r] == 1 or sp[r, :size[r] - 1].sum() < top_p)
    assert torch.equal(sampling_probs(logits, 0.7, top_p=1.0), sampling_probs(logits, 0.7))
    m, top_p = _dense(), 0.5
    prompt = [4, 9, 2]
    with torch.no_grad(): p = m(torch.tensor([prompt]))[0, -1].softmax(-1)
    sp, order = p.sort(descending=True)
    nucleus = set(order[:int(((sp.cumsum(0) - sp) < top_p).sum())].tolist())
    seen = [generate(m, [prompt] * 400, 1, top_p=top_p, seed=s)[i][-1] for s in range(10) for i in range(400)]
    assert set(seen) <= nucleus and len(set(seen)) == len(nucleus) > 1, (set(seen), nucleus)


def test_eos_ends_each_row_and_pads_it():
    "A row that samples `eos` keeps `pad_id` after it; lists end at their eos; decoding stops once every row has ended."
    m = _dense()
    prompts = [[1, 2, 3], [7, 8], [5]]
    free = generate(m, prompts, 12, seed=3)
    eos = free[0][3 + 4]                                   # the fifth new token of the first row
    out = generate(m, prompts, 12, seed=3, eos=eos)
    for f, o, p in zip(free, out, prompts):
        new = f[len(p):]
        end = new.index(eos) + 1 if eos in new else len(new)
        assert o == p + new[:end]
    ids, mask = torch.tensor([[1, 2, 3], [0, 7, 8], [0, 0, 5]]), torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    t = generate(m, ids, 12, seed=3, eos=eos, pad_id=60, attention_mask=mask)
    for row, f, p in zip(t[:, 3:].tolist(), free, prompts):
        new = f[len(p):]
        end = new.index(eos) + 1 if eos in new else len(new)
        assert row[:end] == new[:end] and all(x == 60 for x in row[end:])
    greedy = generate(m, [[1, 2, 3], [1, 2, 3]], 10, temperature=0)[0][3:]
    end = greedy.index(greedy[2]) + 1
    stopped = generate(m, [[1, 2, 3], [1, 2, 3]], 10, temperature=0, eos=greedy[2])
    assert stopped == [[1, 2, 3] + greedy[:end]] * 2
    t = generate(m, torch.tensor([[1, 2, 3]] * 2), 10, temperature=0, eos=[greedy[2], 60])
    assert t.shape == (2, 3 + end) and end < 10            # stopped after the step where both rows ended


def _rows(x) -> list[list[int]]:
    "`generate`'s output (a tensor, a list of lists or one list) as a list of rows."
    if isinstance(x, torch.Tensor): return x.tolist()
    return x if isinstance(x[0], list) else [x]


@pytest.mark.parametrize("static", [True, False])
def test_streamed_tokens_are_the_returned_ones(static):
    "`stream` sees each step's tokens as they come, one list of B ids per step, and they are the tokens returned."
    m = _dense()
    for prompts, kw in (([[1, 2, 3], [7, 8]], dict(seed=1)), ([4, 5], dict(temperature=0)),
                        (IDS, dict(attention_mask=M, seed=2, top_p=0.8, top_k=20)),
                        ([[1, 2], [3]], dict(seed=0, eos=5))):
        steps = []
        out = _rows(generate(m, prompts, 9, static=static, stream=steps.append, **kw))
        assert out == _rows(generate(m, prompts, 9, static=static, **kw))       # streaming changes nothing
        assert 0 < len(steps) <= 9 and all(len(s) == len(out) for s in steps)
        for row, streamed, p in zip(out, zip(*steps), _rows(prompts)):
            assert row[len(p):] == list(streamed)[:len(row) - len(p)], (row, streamed)


def greedy_by_recompute(model, prompt, n):
    "Greedy decoding without a cache: the whole sequence through the model for every new token."
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n): seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_generation_equals_recomputation(name):
    """Every registered model: greedy decoding with the KV cache gives the tokens of decoding by full recomputation,
    token for token, for a batch of 2 left-padded prompts (a working memory takes no left padding: 2 prompts of one
    length), on the static step and on the sliced path wherever the model has both."""
    m = _small(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]] if m.static_decode else [[5, 6, 7, 8, 9], [3, 4, 2, 1, 7]]
    want = [greedy_by_recompute(m, p, 12) for p in prompts]
    for static in ((True, False) if m.static_decode else (False,)):
        assert generate(m, prompts, 12, temperature=0, static=static) == want, (name, static)
    if not m.static_decode:
        with pytest.raises(ValueError, match="left padding is not supported"):
            generate(m, [[5, 6, 7], [3]], 2, temperature=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_nucleus_sampling_needs_no_host_sync_on_cuda():
    "`next_tokens` with top_k and top_p after a static step: no host sync (sync debug mode raises on one)."
    from mice.models import next_tokens
    m = _dense(vocab_size=257, dim=64).cuda()
    cache = m.new_cache(3, 30)
    with torch.no_grad():
        logits = m(torch.randint(0, 257, (3, 20), device="cuda"), cache)[:, -1]
        cache.begin_decode()
        gen = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5): logits = m.decode_step(next_tokens(logits, 0.8, 40, gen, top_p=0.9), cache)
        finally: torch.cuda.set_sync_debug_mode("default")


@cuda
def test_compiled_decoding_with_eos_and_stream_matches_the_sliced_path():
    "CUDA graphs with nucleus sampling, an eos and a stream give the sliced path's tokens, and stream them."
    m = _dense(vocab_size=257, dim=64).cuda()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    kw = dict(seed=0, top_p=0.9, eos=7)
    want = generate(m, prompts, 16, static=False, **kw)
    for _ in range(2):
        steps = []
        assert generate(m, prompts, 16, compile=True, stream=steps.append, **kw) == want
        for row, p, s in zip(want, prompts, zip(*steps)): assert row[len(p):] == list(s)[:len(row) - len(p)]
