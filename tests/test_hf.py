"""Model directories and the Hugging Face wrappers: bitwise round trips for every model, clear errors, `transformers`
kept optional, HF's loading, forward and greedy `generate` equal to the library's, HF's cache equal to recomputation."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mice.hf import (CONFIG_NAME, EOT_ID, WEIGHTS_NAME, from_pretrained, pretrained_config, read_config,
                     save_pretrained)
from mice.models import FAMILIES, MODELS, MGMConfig, MGMModel, build_model, family_of, generate
from mice.geometric import GeometricConfig
from mice.utils import tied_names

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPE = dict(vocab_size=4096, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
MEMORY = dict(memory=dict(slots=4, segment=4))
PADDED = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 3, 4]])
PADDED_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
EVEN = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13, 14, 15, 16]])


def moved(name, seed=0, **kw):
    "Model `name` at a small size, weights moved off the init, running statistics moved by training forwards."
    torch.manual_seed(seed)
    model = build_model(name, None, **{**SHAPE, **kw})
    for _ in range(2): model(torch.randint(0, 4096, (2, 8)))
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf():
    "The registered wrapper classes; skips (with the reason) where transformers is not installed."
    pytest.importorskip("transformers", reason="the Hugging Face wrappers need transformers (pip install transformers)")
    from mice.hf import register_hf
    return register_hf()


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bitwise(name, tmp_path):
    model = moved(name)
    save_pretrained(model, tmp_path, name=name)
    rng = torch.get_rng_state()
    back = from_pretrained(tmp_path)
    assert torch.equal(rng, torch.get_rng_state())
    idx = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): assert torch.equal(back(idx), model(idx))
    assert type(back) is type(model) and back.head.weight is back.embed.weight and not back.training
    config, saved_name, raw = read_config(tmp_path)
    assert config == model.config and saved_name == name and raw["model_type"] == f"mice_{family_of(config).name}"


def test_untied_head_and_dtype(tmp_path):
    untied = moved("dense", tie_embeddings=False)
    assert tied_names(untied.state_dict()) == {}
    back = from_pretrained(save_pretrained(untied, tmp_path / "a"))
    assert back.head.weight is not back.embed.weight and torch.equal(back.head.weight, untied.head.weight)
    half = moved("mu_inl").to(torch.bfloat16)
    back = from_pretrained(save_pretrained(half, tmp_path / "b"))
    assert back.embed.weight.dtype == torch.bfloat16
    assert from_pretrained(tmp_path / "b", dtype=torch.float32).embed.weight.dtype == torch.float32


def _edit(path, **changes):
    c = json.loads((path / CONFIG_NAME).read_text())
    c.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(c))


@pytest.mark.parametrize("change,message", [
    (dict(family="lstm"), "family 'lstm' is not a registered family"),
    (dict(mice_format=None), "format None, expected 'mice-pretrained/1'"),
    (dict(num_hidden_layers=3), "contradicts itself: num_hidden_layers 3 vs model_config.n_layers 2"),
    (dict(model_type="mice_convex"), "model_type 'mice_convex' vs family 'dense'"),
    (dict(model="convex"), "model 'convex' is not a registered model of family 'dense'"),
    (dict(model_config=[1]), "model_config must be a dict"),
    (dict(dtype="int8"), "dtype 'int8' is not a floating-point"),
    (dict(weights_sha256="f" * 64), "from different saves")])
def test_config_errors(tmp_path, change, message):
    save_pretrained(moved("dense"), tmp_path)
    _edit(tmp_path, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")): from_pretrained(tmp_path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): from_pretrained(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="config.json not found"): from_pretrained(tmp_path)
    save_pretrained(moved("dense"), tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))       # one flipped bit
    with pytest.raises(ValueError, match="is corrupted: tensor 'model"): from_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:100])
    with pytest.raises(ValueError, match="is truncated or corrupted"): from_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"): from_pretrained(tmp_path)


def test_tensor_errors(tmp_path):
    "Weights of a model of another shape or kind: missing, unexpected or differently shaped tensors, by name."
    save_pretrained(moved("dense"), tmp_path / "dense")
    for other, message in ((dict(n_layers=1), "missing tensor"), (dict(n_layers=3), "unexpected tensor"),
                           (dict(hidden=96), "tensor shapes differ")):
        save_pretrained(moved("dense", **other), tmp_path / "other")
        (tmp_path / "dense" / WEIGHTS_NAME).replace(tmp_path / "x")
        (tmp_path / "other" / WEIGHTS_NAME).replace(tmp_path / "dense" / WEIGHTS_NAME)
        _edit(tmp_path / "dense", weights_sha256=None)                  # the pairing check off: the strict load speaks
        with pytest.raises(ValueError, match=message): from_pretrained(tmp_path / "dense")
        (tmp_path / "x").replace(tmp_path / "dense" / WEIGHTS_NAME)


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="model: expected a mice Decoder"): pretrained_config(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="name: unknown model 'nope'"):
        save_pretrained(moved("dense"), tmp_path, "nope")
    with pytest.raises(ValueError, match="name: model 'mgm' is of family 'mgm'"):
        save_pretrained(moved("dense"), tmp_path, "mgm")
    save_pretrained(moved("dense"), tmp_path)
    with pytest.raises(TypeError, match="dtype: expected a floating-point"): from_pretrained(tmp_path, dtype=torch.int8)


def test_transformers_stays_optional():
    code = "import sys, mice.hf, mice.models, mice.training; print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
    blocked = ("import sys; sys.modules['transformers'] = None; import mice.hf\n"
               "try: mice.hf.register_hf()\nexcept ImportError as e: print(e)")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=True)
    assert "need transformers 5: pip install" in run.stdout


def test_registration(hf):
    import mice.hf
    from transformers import AutoConfig
    assert set(hf.models) == set(FAMILIES)
    assert mice.hf.MGMForCausalLM is hf.models["mgm"] and mice.hf.MiceCache is hf.Cache
    assert type(AutoConfig.for_model("mice_convex")) is hf.configs["convex"]
    with pytest.raises(AttributeError): mice.hf.NopeForCausalLM


def _mgm_without_memory():
    torch.manual_seed(0)
    model = MGMModel(MGMConfig(**SHAPE, experts=GeometricConfig(n_experts=4)))
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


CASES = {"dense": lambda: (moved("dense"), PADDED, PADDED_MASK), "top1": lambda: (moved("top1"), PADDED, PADDED_MASK),
         "mu_inl": lambda: (moved("mu_inl"), PADDED, PADDED_MASK),
         "routed_mu_soft": lambda: (moved("routed_mu_soft"), PADDED, PADDED_MASK),
         "mgm": lambda: (moved("mgm", **MEMORY), EVEN, torch.ones_like(EVEN)),
         "mgm without memory": lambda: (_mgm_without_memory(), PADDED, PADDED_MASK),
         "convex_picnn": lambda: (moved("convex_picnn"), PADDED, PADDED_MASK)}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_loads_and_generates_as_the_library(hf, case, tmp_path):
    from transformers import AutoModelForCausalLM
    model, prompts, mask = CASES[case]()
    save_pretrained(model, tmp_path, name=case if case in MODELS else None)
    hm = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hm) is hf.models[family_of(model.config).name]
    real = mask.bool()
    with torch.no_grad():
        assert torch.equal(hm(prompts, attention_mask=mask).logits[real],
                           model(prompts, valid=None if real.all() else real)[real])
    ours = generate(model, prompts, 10, temperature=0, attention_mask=mask)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached, full = hm.generate(prompts, **kw), hm.generate(prompts, use_cache=False, **kw)
    assert torch.equal(cached.sequences, ours) and torch.equal(full.sequences, ours)
    assert (torch.stack(cached.logits) - torch.stack(full.logits)).abs().max() <= 1e-4


def test_memory_refuses_left_padding(hf):
    from mice.hf import to_hf
    hm = to_hf(moved("dense_mem", **MEMORY), "dense_mem")
    with pytest.raises(ValueError, match="left padding is not supported"):
        hm.generate(PADDED, attention_mask=PADDED_MASK, max_new_tokens=2)


def test_cache_grows_and_continues(hf):
    "Prefill, then chunks that outgrow the cache's first allocation: the logits of one full forward pass."
    from mice.hf import to_hf
    model = moved("mgm", **MEMORY)
    hm, idx = to_hf(model, "mgm"), torch.randint(0, 4096, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hm(idx[:, :5], use_cache=True)
        logits, cache = [out.logits], out["cache" if "cache" in out else "past_key_values"]   # 5.17: past_key_values
        for a, b in ((5, 6), (6, 40), (40, 60)):
            out = hm(idx[:, a:b], cache=cache, use_cache=True)
            logits.append(out.logits)
        assert cache.get_seq_length() == 60 and cache.kv.max_len == 64
        assert (torch.cat(logits, 1) - model(idx)).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="exceed max_seq_len 64"): hm(idx[:, :5], cache=cache)


def test_hf_errors(hf, tmp_path):
    from transformers import AutoModelForCausalLM
    from mice.hf import to_hf
    hm = to_hf(moved("dense"), "dense")
    with pytest.raises(ValueError, match="position_ids: mice models number"):
        hm(PADDED, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs_embeds"): hm(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 5\)"):
        hm(PADDED, attention_mask=PADDED_MASK[:, 1:])
    save_pretrained(moved("mu_inl"), tmp_path)
    with pytest.raises(ValueError, match="DenseForCausalLM loads dense models"):
        hf.models["dense"].from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="device_map: mice models load onto one device"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu", "x": 1})


def test_tokenizer(hf, tmp_path):
    from transformers import AutoTokenizer
    from mice.data import EOT, load_tokenizer
    from mice.hf import hf_tokenizer
    tok, ref = hf_tokenizer(), load_tokenizer()
    text = "JULIET. O Romeo, Romeo, wherefore art thou Romeo?"
    assert tok(text).input_ids == ref.encode(text).ids and tok.decode(tok(text).input_ids) == text
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (EOT, EOT_ID, EOT_ID, "left")
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == ref.encode(text).ids


@pytest.mark.parametrize("case", ["mu_inl", "mgm"])
def test_beam_search_cache_equals_recompute(hf, case):
    "Beam search reorders the cache (the working memory with the keys and values): the tokens of no cache."
    from mice.hf import to_hf
    model, prompts, mask = CASES[case]()
    hm = to_hf(model, case)
    kw = dict(attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False)   # beams that part ways
    assert torch.equal(hm.generate(prompts, **kw), hm.generate(prompts, use_cache=False, **kw))


def test_hf_save_is_the_library_save(hf, tmp_path):
    "The wrapper's save_pretrained writes the library's model directory; both loaders read it back bitwise."
    from transformers import AutoModelForCausalLM
    from mice.hf import to_hf
    model = moved("routed")
    to_hf(model, "routed").save_pretrained(tmp_path)
    assert read_config(tmp_path)[1] == "routed"
    idx = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(idx), model(idx))
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(idx).logits, model(idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_and_generate(hf, tmp_path):
    "On the GPU: both loaders build on the device in the saved dtype; HF's greedy tokens are the library's (float32)."
    from transformers import AutoModelForCausalLM
    for name in ("mu_inl", "routed", "convex"):
        save_pretrained(moved(name), tmp_path / name, name=name)
        for dtype in (torch.float32, torch.bfloat16):
            model = from_pretrained(tmp_path / name, device="cuda", dtype=dtype)
            hm = AutoModelForCausalLM.from_pretrained(tmp_path / name, device_map="cuda", dtype=dtype)
            assert model.embed.weight.device.type == "cuda" and hm.dtype == dtype
            for m in (model, hm):                          # every tensor, buffers made from numpy too
                assert {t.device.type for t in (*m.parameters(), *m.buffers())} == {"cuda"}
            prompts, mask = PADDED.cuda(), PADDED_MASK.cuda()
            with torch.no_grad():
                assert torch.equal(hm(prompts, attention_mask=mask, use_cache=False).logits[mask.bool()],
                                   model(prompts, valid=mask.bool())[mask.bool()])
            if dtype == torch.float32:
                ours = generate(model, prompts, 8, temperature=0, attention_mask=mask, static=False)
                assert torch.equal(hm.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False), ours)
