"""Checkpoints: atomic writes that survive a crash mid-save, and verification that catches any damage."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import ROOT
from mice.models import DenseConfig, DenseModel
from mice.training import load_checkpoint, load_model, load_state, save_checkpoint


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    m = DenseModel(DenseConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(0, 40, (2, 6))).sum().backward()
    opt.step()
    return m, opt


@pytest.fixture
def saved(tmp_path):
    m, opt = _model_and_opt()
    return save_checkpoint(tmp_path / "ck.safetensors", m, opt, step=3, meta={"model": "dense"}), m


def test_round_trip_restores_tied_weights(saved):
    path, m = saved
    m2 = DenseModel(m.config)
    load_state(m2, load_checkpoint(path).model)
    assert m2.head.weight is m2.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_a_process_killed_mid_save_loses_nothing(saved, tmp_path):
    path, _ = saved
    before = path.read_bytes()
    # a second process starts overwriting the checkpoint and is killed while its data is half on disk
    code = f"""
import os, time, torch
from mice.training import save_checkpoint
from mice.models import DenseConfig, DenseModel
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True); time.sleep(60)
os.fsync = slow_fsync
torch.manual_seed(1)
save_checkpoint({str(path)!r}, DenseModel(DenseConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)), step=9)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert any(".tmp-" in f.name for f in tmp_path.iterdir()), "the new checkpoint is written beside the old one first"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 3


def test_refuses_a_model_of_another_shape(saved):
    path, _ = saved
    other = DenseModel(DenseConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    with pytest.raises(ValueError, match="tensor shapes differ"):
        load_state(other, load_checkpoint(path).model)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_damage_is_caught_or_harmless(tmp_path_factory, data):
    m, opt = _model_and_opt()
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "ck.safetensors", m, opt, step=3)
    good = load_checkpoint(path)
    raw = bytearray(path.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    path.write_bytes(raw)
    try:
        bad = load_checkpoint(path)
    except ValueError as e:
        assert "corrupted" in str(e) or "not a mice checkpoint" in str(e)
        return
    # a flip that still parses (e.g. in the header's padding) must not change what is loaded
    assert bad.step == good.step and all(torch.equal(bad.model[k], good.model[k]) for k in good.model)


FLAT = ROOT / "tests" / "fixtures" / "flat-layout"
FLAT_NAMES = ["dense", "mu_inl", "mu_inl-legacy", "routed_mu_soft", "top2", "routed_modulo-legacy"]


@pytest.mark.parametrize("name", FLAT_NAMES)
def test_checkpoints_of_the_flat_layout_still_load(name):
    "Checkpoints written by mice before model families (commit c266595, `make.py`) load, and give the same logits."
    expected = json.loads((FLAT / "expected.json").read_text())
    model, ck = load_model(FLAT / f"{name}.safetensors")
    assert ck.step == 7 and "family" not in ck.meta
    with torch.no_grad(): logits = model(torch.tensor(expected["idx"])).double()
    assert torch.allclose(logits, torch.tensor(expected["logits"][name], dtype=torch.float64), atol=1e-5), name
    if name.endswith("legacy"): assert model.config.legacy


def test_a_checkpoint_without_a_model_gets_one_clear_line(tmp_path):
    "`save_checkpoint(path, model)` of a library model describes the model itself; of anything else, a clear error."
    m, _ = _model_and_opt()
    path = save_checkpoint(tmp_path / "bare.safetensors", m)
    assert load_model(path)[0].config == m.config
    path = save_checkpoint(tmp_path / "linear.safetensors", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="describes no model"):
        load_model(path)
    path = save_checkpoint(tmp_path / "odd.safetensors", m, meta={"family": "nope", "model_config": {}})
    with pytest.raises(ValueError, match="family 'nope' is not registered"):
        load_model(path)
