"""The mixed stream of `mice.sources`: exact resume at any point (also across epochs), weights, errors."""
import json

import numpy as np
import pytest
import torch

from mice.sources import MixedLoader, check_mix, check_steps, problem_documents

IDS = {"plays": np.arange(1, 700, dtype=np.uint16), "bible": np.arange(1000, 1450, dtype=np.uint16),
       "cot": np.arange(2000, 2090, dtype=np.uint16)}          # small: many epochs in a few batches
MIX = {"plays": 2, "bible": 1, "cot": 0.5}


def stream(loader, n):
    "`n` batches, each row x then y, stacked."
    return torch.cat([torch.cat(loader.next_batch(), 1) for _ in range(n)] or [torch.empty(0, 32, dtype=torch.long)])


@pytest.mark.parametrize("cut", [0, 1, 7, 19, 40])
@pytest.mark.parametrize("seed", [0, 5])
def test_a_resumed_stream_equals_the_uninterrupted_one(cut, seed):
    whole = stream(MixedLoader(MIX, 3, 16, seed, ids=IDS), 41)
    first = MixedLoader(MIX, 3, 16, seed, ids=IDS)
    head = stream(first, cut)
    second = MixedLoader(MIX, 3, 16, seed, ids=IDS)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert torch.equal(torch.cat([head, stream(second, 41 - cut)]), whole)
    assert min(second.state_dict()["epoch"].values()) >= 1, "the stream crossed epochs of every source"


def test_every_epoch_reads_each_window_once():
    ld = MixedLoader({"cot": 1}, 1, 16, 0, ids=IDS)
    for e in range(4):
        starts = ld._starts_of("cot", e)
        got = np.array([ld.next_batch()[0][0, 0].item() for _ in range(len(starts))])
        assert np.array_equal(np.sort(got - 2000), np.sort(starts))
        assert ld.state_dict()["epoch"]["cot"] == e + 1


def test_weights_are_honoured_within_one_row():
    ld = MixedLoader(MIX, 7, 16, 0, ids=IDS)
    total = sum(MIX.values())
    for n in range(1, 60):
        ld.next_batch()
        rows = ld.state_dict()["rows"]
        assert all(abs(rows[s] - 7 * n * w / total) < 1 for s, w in MIX.items()), (n, rows)


def test_rows_come_from_their_source():
    x, _ = MixedLoader(MIX, 14, 16, 0, ids=IDS).next_batch()
    first = x[:, 0]
    counts = {s: int(((first >= a.min()) & (first <= a.max())).sum()) for s, a in IDS.items()}
    assert counts == {"plays": 8, "bible": 4, "cot": 2}, counts


def test_a_new_weight_keeps_positions_and_restarts_the_round_robin():
    a = MixedLoader(MIX, 4, 16, 0, ids=IDS)
    stream(a, 5)
    b = MixedLoader({**MIX, "cot": 3}, 4, 16, 0, ids=IDS)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["index"] == a.state_dict()["index"] and sum(b.state_dict()["rows"].values()) == 0


@pytest.mark.parametrize("kw, message", [
    (dict(mix={"wiki": 1}), "unknown source 'wiki'"),
    (dict(mix={"plays": -0.5}), "data['plays']: expected a number >= 0"),
    (dict(mix={"plays": float("nan")}), "data['plays']"),
    (dict(mix={"plays": 0}), "at least one weight must be > 0"),
    (dict(mix=["plays"]), "non-empty dict"),
    (dict(seq_len=0), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=100), "'cot' has 90 tokens, fewer than seq_len + 2"),
])
def test_bad_input_gets_one_clear_error(kw, message):
    args = dict(mix=MIX, batch_size=2, seq_len=16) | kw
    with pytest.raises(ValueError) as e:
        MixedLoader(args["mix"], args["batch_size"], args["seq_len"], 0, ids=IDS)
    assert message in str(e.value), str(e.value)


def test_a_state_of_other_data_is_refused():
    st = MixedLoader(MIX, 2, 16, 0, ids=IDS).state_dict()
    for kw, message in ((dict(seed=1), "seed=0"), (dict(seq_len=8), "seq_len=16")):
        args = dict(seed=0, seq_len=16) | kw
        with pytest.raises(ValueError, match=message):
            MixedLoader(MIX, 2, args["seq_len"], args["seed"], ids=IDS).load_state_dict(st)
    with pytest.raises(ValueError, match="'cot' had 90 tokens, now 80"):
        MixedLoader(MIX, 2, 16, 0, ids={**IDS, "cot": IDS["cot"][:80]}).load_state_dict(st)


def test_generated_steps_check_out():
    docs = problem_documents("validation", cot=True)
    assert len(docs) > 1000 and sum(map(check_steps, docs)) == 0
    assert check_steps("Step 1: 3 * 4 = 13\nStep 2: 1 + 1 = 2\n") == 1


def test_check_mix_is_order_free():
    assert check_mix({"cot": 1, "plays": 2}) == check_mix({"plays": 2, "cot": 1})
