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


# Gradient reach, element by element, for every registered model name.
import re  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from mice.models import MODELS  # noqa: E402
from mice.utils import dead_elements  # noqa: E402

REACH = dict(vocab_size=4096, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
REACH_SEQ = 144          # longer than a working memory's segment (128), so that its write weights are used

# Elements that get no gradient by design, by model name: (a regex on the parameter name, the reason). Nothing else
# may be dead.
DEAD_BY_DESIGN = {
    "deep_legacy": (r"blocks\.\d+\.(mlp\.experts\.(gate_up|down)|mlp\.mu_router\.weight|mlp_norm\.weight)"
                    r"|blocks\.0\.(attn\.mu_qkv\.weight|dynamics\.controller_(in|out)\.weight|dynamics\.controller_out"
                    r"\.bias)",
                    "v0.13.0 as it ran: its experts run forward-only (their weights, the MLP's input norm and the "
                    "mu router behind an argmax get nothing), and layer 0 has mu_to_{q,k,v} it never reads and an "
                    "INL controller whose velocity columns and alpha rows meet v = 0"),
    "convex_legacy": (r"blocks\.\d+\.ffn\.net\.shifts",
                      "torch-mice 0.5.0's hull at 2 petals: both cyclic pairs average the same two petals, so the max "
                      "always takes the larger shift and the other one gets nothing"),
}


def dead_after_batches(model, n_batches=3, batch=2, seed=0):
    """`dead_elements` of `model` after the cross-entropy (+ aux loss) of `n_batches` random batches, its weights moved
    off the init first (a zero-initialised mu would otherwise zero its readers' gradients on the first step). Rows of
    the embedding for tokens that no batch holds are not counted (with a tied head every row gets a gradient anyway)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.05)
    seen = []
    for _ in range(n_batches):
        idx = torch.randint(0, model.config.vocab_size, (batch, REACH_SEQ + 1), generator=g)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()) + model.aux_loss
        loss.backward()
        seen.append(idx[:, :-1].flatten())
    dead = dead_elements(model)
    if "embed.weight" in dead:
        rows = torch.cat(seen).unique()
        grad = model.embed.weight.grad
        dead["embed.weight"] = grad[rows].numel() if grad is None else int((grad[rows] == 0).sum())
        if not dead["embed.weight"]: del dead["embed.weight"]
    return dead


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_element_gets_a_gradient(name):
    "Every element of every parameter of every registered model gets a gradient, but those dead by design (named)."
    torch.manual_seed(0)
    dead = dead_after_batches(build_model(name, None, **REACH))
    pattern, _ = DEAD_BY_DESIGN.get(name, (None, None))
    unexplained = {n: c for n, c in dead.items() if pattern is None or not re.fullmatch(pattern, n)}
    assert unexplained == {}, f"{name}: elements that never got a gradient: {unexplained}"
    if pattern is not None: assert dead, f"{name}: DEAD_BY_DESIGN names elements that do get a gradient now"


def test_the_element_check_finds_inl_layer0_dead_weights():
    """The check can fail: INL's layer 0 with the full controller (`initial_v="zero"`, mice's layout before
    `first_layer`) has 2 H k + H = 24,768 dead weights at the tiny preset; the default layer 0 has none."""
    for initial_v, want in (("zero", 2 * 192 * 64 + 192), ("none", 0)):
        torch.manual_seed(0)
        m = build_model("inl", "tiny", inl=dict(initial_v=initial_v))
        dead = dead_after_batches(m, n_batches=1)
        assert sum(dead.values()) == want and all(n.startswith("blocks.0.dynamics.") for n in dead), (initial_v, dead)


# complexity-deep v0.13.0's published state dicts: names, shapes, and the forward they define.
import math  # noqa: E402

from mice.models import legacy_state_dict, load_legacy_state_dict, v013_views  # noqa: E402

V013 = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)


def v013_state_dict(c, seed=0, std=0.1):
    "A random state dict with v0.13.0's names and shapes (from the study's list), buffers as v0.13.0 computes them."
    H, V, hd, E = c.dim, c.vocab_size, c.head_dim, c.experts.n_experts
    Q, KV, I, k = c.n_heads * hd, c.n_kv_heads * hd, c.experts.expert_width(c.mlp_hidden), c.inl.controller_hidden
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (Q, H), p + "self_attn.k_proj.weight": (KV, H),
            p + "self_attn.v_proj.weight": (KV, H), p + "self_attn.o_proj.weight": (H, Q),
            p + "self_attn.mu_to_q.weight": (Q, H), p + "self_attn.mu_to_k.weight": (KV, H),
            p + "self_attn.mu_to_v.weight": (KV, H), p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,), p + "dynamics.mu": (H,), p + "dynamics.mu_proj.weight": (H, H),
            p + "dynamics.controller_in.weight": (k, 2 * H), p + "dynamics.controller_in.bias": (k,),
            p + "dynamics.controller_out.weight": (3 * H, k), p + "dynamics.controller_out.bias": (3 * H,),
            p + "mlp.gate_up_proj": (E, H, 2 * I), p + "mlp.down_proj": (E, I, H), p + "mlp.mu_router.weight": (E, H)})
    g = torch.Generator().manual_seed(seed)
    sd = {n: torch.randn(s, generator=g) * std + (1.0 if n.endswith("norm.weight") else 0.0) for n, s in shapes.items()}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        sd[p + "mlp.mu_router.weight"] *= 60        # large enough that mu moves some tokens off their table expert
        sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        sd[p + "mlp.token_to_expert"] = torch.arange(V) % E
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def v013_forward(sd, c, idx):
    """v0.13.0's `DeepForCausalLM` forward written out in float64 from its state dict: pre-norm mu-guided GQA (layer 0
    without mu; QK-norm, then rotate-half RoPE), INL on the attention output (v = 0 at layer 0), the 0.1 mu highway,
    experts picked by argmax(10 onehot(id % E) + W_r mu_cur), tied head. Also returns the smallest routing margin."""
    W = {n: t.double() for n, t in sd.items()}
    H, nh, nkv, hd, E = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.experts.n_experts
    B, T = idx.shape
    def rms(x, w, eps): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    ang = torch.arange(T, dtype=torch.float64)[:, None] * W["model.layers.0.self_attn.rotary_emb.inv_freq"]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    def rope(t): return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin
    x, v, mu_prev, total, margin = W["model.embed_tokens.weight"][idx], None, None, None, math.inf
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"], c.norm_eps)
        def proj(n, heads):
            y = h @ W[f"{p}self_attn.{n}_proj.weight"].T
            if mu_prev is not None: y = y + mu_prev @ W[f"{p}self_attn.mu_to_{n}.weight"].T
            return y.view(B, T, heads, hd).transpose(1, 2)
        q, k, vv = proj("q", nh), proj("k", nkv), proj("v", nkv)
        q = rope(rms(q, W[p + "self_attn.q_norm.weight"], 1e-6))
        k = rope(rms(k, W[p + "self_attn.k_norm.weight"], 1e-6)).repeat_interleave(nh // nkv, 1)
        s = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, -math.inf)
        a = (s.softmax(-1) @ vv.repeat_interleave(nh // nkv, 1)).transpose(1, 2).reshape(B, T, H)
        a = a @ W[p + "self_attn.o_proj.weight"].T
        v = torch.zeros_like(a) if v is None else v
        ctl_in, ctl_out = p + "dynamics.controller_in.", p + "dynamics.controller_out."
        z = F.silu(torch.cat([a, v], -1) @ W[ctl_in + "weight"].T + W[ctl_in + "bias"])
        z = z @ W[ctl_out + "weight"].T + W[ctl_out + "bias"]
        alpha, beta, gate = z[..., :H].sigmoid(), F.softplus(z[..., H:2 * H]).clamp(max=2.0), z[..., 2 * H:].sigmoid()
        mu = W[p + "dynamics.mu"] + a @ W[p + "dynamics.mu_proj.weight"].T
        v = (alpha * v - beta * (a - mu)).clamp(-10.0, 10.0)
        x = x + a + 0.1 * gate * v
        h = rms(x, W[p + "post_attention_layernorm.weight"], c.norm_eps)
        route = 10 * F.one_hot(sd[p + "mlp.token_to_expert"][idx], E).double() + mu @ W[p + "mlp.mu_router.weight"].T
        top = route.topk(2, -1).values
        margin = min(margin, (top[..., 0] - top[..., 1]).min().item())
        e = route.argmax(-1)
        gate_up = torch.einsum("bth,bthj->btj", h, W[p + "mlp.gate_up_proj"][e])
        g_, u_ = gate_up.chunk(2, -1)
        x = x + torch.einsum("btj,btjh->bth", F.silu(g_) * u_, W[p + "mlp.down_proj"][e])
        total = mu if total is None else total + mu
        mu_prev = mu + 0.1 * total
    return rms(x, W["model.norm.weight"], c.norm_eps) @ W["lm_head.weight"].T, margin


def test_v013_state_dict_loads_strictly_and_gives_v013s_logits():
    "A state dict with v0.13.0's names and shapes loads into `deep_legacy` and gives v0.13.0's forward."
    model = build_model("deep_legacy", None, **V013)
    sd = v013_state_dict(model.config)
    assert sorted(v013_views(model)) == sorted(sd)
    load_legacy_state_dict(model, sd)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    want, margin = v013_forward(sd, model.config, idx)
    with torch.no_grad(): got = model(idx).double()
    moved = [b.mlp.overridden.item() for b in model.blocks]
    err = (got - want).abs().max().item()
    print(f"max |mice - v0.13.0 float64| = {err:.1e} (logits up to {want.abs().max():.1f}); tokens moved by mu per "
          f"layer {moved}; smallest routing margin {margin:.2f}")
    assert margin > 1e-3 and any(m > 0 for m in moved), "a routing near-tie or no override: pick another seed"
    assert err <= 1e-4 * max(1.0, want.abs().max().item())
    back = legacy_state_dict(model)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[n], sd[n].to(back[n].dtype)) for n in sd)


def test_v013_loader_is_strict():
    model = build_model("deep_legacy", None, **V013)
    sd = v013_state_dict(model.config)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.gate_proj'\]"):
        load_legacy_state_dict(model, {**sd, "model.layers.0.mlp.gate_proj": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['model.layers.2.self_attn.mu_to_v.weight'\]"):
        load_legacy_state_dict(model, {n: t for n, t in sd.items() if n != "model.layers.2.self_attn.mu_to_v.weight"})
    with pytest.raises(ValueError, match="shapes differ"):
        load_legacy_state_dict(model, {**sd, "model.layers.1.mlp.down_proj": sd["model.layers.1.mlp.down_proj"].mT})
    with pytest.raises(ValueError, match="ties them"):
        load_legacy_state_dict(model, {**sd, "lm_head.weight": sd["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="fit a deep_legacy model"):
        load_legacy_state_dict(build_model("deep", None, **V013), sd)


def test_v013_1p5b_parameter_count():
    "The published 1.5B config, built on the meta device, has the published 1,516,217,856 parameters."
    with torch.device("meta"):
        m = build_model("deep_legacy", "1.5b", vocab_size=32000, max_seq_len=2048, experts=dict(expert_hidden=1408))
    print(f"deep_legacy 1.5b: {m.num_params():,} parameters")
    assert m.num_params() == 1_516_217_856


def test_deep_config_holds_only_what_the_model_reads():
    """Every field of the `deep` model's config (and of its mechanism configs) is read while the model is built, run
    and given a cache: the config holds no option that does nothing."""
    from dataclasses import fields, is_dataclass
    from mice.models import DeepModel, model_config
    config = model_config("deep", None, **V013)
    tracked = {id(config): ""}
    for f in fields(config):
        sub = getattr(config, f.name)
        if is_dataclass(sub): tracked[id(sub)] = f.name + "."
    classes = {type(config)} | {type(getattr(config, n.rstrip("."))) for n in tracked.values() if n}
    read = set()
    def recording(self, name):
        if id(self) in tracked and name in {f.name for f in fields(type(self))}: read.add(tracked[id(self)] + name)
        return object.__getattribute__(self, name)
    for cls in classes: cls.__getattribute__ = recording
    try:
        model = DeepModel(config)
        idx = torch.randint(0, 97, (2, 8))
        model(idx)
        model(idx, model.new_cache(2, 8))
    finally:
        for cls in classes: del cls.__getattribute__
    held = {prefix + f.name for obj_id, prefix in tracked.items() for f in fields(
        config if not prefix else getattr(config, prefix.rstrip(".")))}
    assert held - read == set(), f"fields of the deep config that nothing reads: {sorted(held - read)}"
