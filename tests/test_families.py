"""Properties every registered model name has, whatever its family: causal, blind to i.i.d. tokens, and clear about
bad input. Each test runs over `MODELS` as it is when the tests start, so a newly registered name is tested too."""
import math

import pytest
import torch
import torch.nn.functional as F

from mice.models import MODELS, build_model

NAMES = sorted(MODELS)
V, T = 32, 24


def vocab(name: str) -> int:
    "V; a `balanced` routing table is filled from the corpus's token counts, so it needs the corpus's vocabulary."
    experts = getattr(MODELS[name], "experts", None)
    return 4096 if getattr(experts, "route", None) == "balanced" else V


def small(name: str, **kw):
    "`name` at a CPU-test size; a model with memory gets segments of 8 tokens, so that T crosses two boundaries."
    memory = dict(segment=8) if getattr(MODELS[name], "memory", None) is not None else {}
    if memory and MODELS[name].memory.slots: memory["slots"] = 4
    extra = {"memory": memory} if memory else {}
    return build_model(name, None, vocab_size=vocab(name), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                       **extra, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_a_token_moves_no_logit_before_it(name):
    "Changing token t changes the logits at t (it is read) and none before t (up to the mixtures' rounding)."
    torch.manual_seed(0)
    m, V = small(name).eval(), vocab(name)
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = m(idx)
        for t in (0, 7, 8, T - 1):
            other = idx.clone()
            other[:, t] = (other[:, t] + 1) % V
            out = m(other)
            assert (out[:, :t] - ref[:, :t]).abs().max().item() <= 1e-5 if t else True, (name, t)
            assert (out[:, t] - ref[:, t]).abs().max().item() > 1e-4, (name, t, "token t is not read at t")


@pytest.mark.parametrize("name", NAMES)
def test_iid_tokens_stay_at_ln_v(name):
    """Trained briefly on i.i.d. uniform tokens, no causal model can beat ln V on fresh ones, beyond 3 standard errors
    (a model that reads the next token would learn to copy it), in training mode as well as in eval mode."""
    torch.manual_seed(0)
    m, V = small(name), vocab(name)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randint(0, V, (16, T + 1), generator=g)
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()) + m.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randint(0, V, (64, T + 1), generator=g)
    with torch.no_grad():               # still in training mode: a norm that reads batch statistics must not leak
        ce = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    noise = 3 * ce.std().item() / math.sqrt(ce.numel())
    print(f"{name}: held-out CE {ce.mean():.4f} nats, ln V = {math.log(V):.4f}, 3 sigma = {noise:.4f}")
    assert ce.mean().item() >= math.log(V) - noise


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, error, message", [
    ("V", ValueError, r"outside \[0, V\)"),
    (torch.tensor([[-1, 2]]), ValueError, r"outside \[0, V\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"shape \[batch, seq_len\]"),
    (torch.zeros(1, 3), TypeError, "integer token ids"),
    (torch.zeros(1, 65, dtype=torch.long), ValueError, "max_seq_len"),
])
def test_bad_input_gets_one_clear_error(name, bad, error, message):
    V = vocab(name)
    bad = torch.tensor([[1, V]]) if isinstance(bad, str) else bad
    with pytest.raises(error, match=message.replace("V", str(V))): small(name)(bad)
