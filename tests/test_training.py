"""The trainer at scale and on the command line: DDP and FSDP2 against one process, staged runs, the runner's flags."""
import json
import os
import subprocess

import pytest
import torch

from conftest import bin_path
from mice.training import forward_context, load_checkpoint, read_metrics

SMALL = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1", "--seq-len", "32",
         "--eval-tokens", "1024", "--sample-tokens", "4", "--no-progress", "--lr", "1e-2", "--warmup", "2"]
STAGES = {"stages": [{"name": "attention", "train": ["*attn*"], "steps": 2}, {"name": "all", "steps": 2}]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def mice(*args, launcher=(), timeout=600):
    return subprocess.run([*launcher, bin_path("mice"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def in_process(config, stop_at):
    "Train in this process up to `stop_at`, with the thread count of the `mice` subprocesses (`ENV`): the sums of a"
    " CPU kernel may run in another order with another number of threads, and a resume is compared bit for bit."
    from mice.training import train
    threads = torch.get_num_threads()
    torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))
    try:
        train(config, stop_at=stop_at, progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)


def torchrun(n):
    return [bin_path("torchrun"), "--standalone", "--nproc_per_node", str(n)]


@pytest.fixture(scope="module")
def stage_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stages") / "stages.json"
    path.write_text(json.dumps(STAGES))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, stage_file):
    "The reference: one process, a global batch of 8, two stages (attention only, then everything)."
    out = tmp_path_factory.mktemp("one")
    r = mice("train", "--batch-size", "8", "--config", stage_file, "--eval-every", "2", "--out-dir", out, *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, one_process, stage_file, parallel):
    "torchrun, gloo on the CPU, two ranks of batch 4 each: the weights of the one-process run with batch 8."
    ref, ref_run = one_process
    r = mice("train", "--batch-size", "4", "--config", stage_file, "--eval-every", "2", "--parallel", parallel,
             "--out-dir", tmp_path, *SMALL, launcher=torchrun(2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation:") == 1 and r.stdout.count("stage 2/2 all") == 1, "only rank 0 reports"
    a, b = load_checkpoint(ref / "checkpoint.safetensors"), load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert a.step == b.step == 4 and a.model.keys() == b.model.keys()
    diff = torch.cat([(a.model[k] - b.model[k]).abs().flatten() for k in a.model])
    worst, off = diff.max().item(), (diff > 1e-6).float().mean().item()
    bpb = [r["val_bpb"] for r in read_metrics(tmp_path) if "val_bpb" in r], \
        [r["val_bpb"] for r in read_metrics(ref) if "val_bpb" in r]
    print(f"{parallel} x2 vs one process: worst weight difference {worst:.1e} ({off:.2%} of weights differ by more "
          f"than 1e-6), validation {bpb[0]} vs {bpb[1]}")
    # Gradients agree to float rounding (the sum runs in another order); AdamW divides by sqrt(v), which amplifies
    # that rounding where a gradient is near zero, so a few weights differ by up to a few percent of one step
    # (lr = 1e-2). Another batch would move nearly every weight by about a whole step.
    assert worst < 1e-3 and off < 0.01
    assert all(abs(x - y) < 1e-4 for x, y in zip(*bpb))


def test_fsdp_resumes_a_one_process_checkpoint(tmp_path, one_process, stage_file):
    "Checkpoints have one layout: a run stopped at step 3 in one process continues sharded on two, in stage 2."
    from mice.cli import parser, train_config
    ref, _ = one_process
    args = ["--config", str(stage_file), "--eval-every", "2", "--out-dir", str(tmp_path), *SMALL]
    in_process(train_config(parser().parse_args(["train", "--batch-size", "8", *args])), stop_at=3)
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").meta["stage"]["name"] == "all"
    r = mice("train", "--batch-size", "4", "--parallel", "fsdp", "--resume", *args, launcher=torchrun(2))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(ref / "checkpoint.safetensors"), load_checkpoint(tmp_path / "checkpoint.safetensors")
    worst = max((a.model[k] - b.model[k]).abs().max().item() for k in a.model)
    print(f"one process to step 3, FSDP2 x2 from there: worst weight difference {worst:.1e} from one process")
    assert b.step == 4 and worst < 1e-3
    assert [r["step"] for r in read_metrics(tmp_path) if "val_bpb" in r] == [2, 3, 4]


def test_stage_boundaries_are_in_the_checkpoint(one_process):
    out, r = one_process
    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck.meta["stage"] == {"index": 1, "name": "all", "start": 2, "end": 4}
    assert [s["steps"] for s in ck.meta["train_config"]["stages"]] == [2, 2]
    assert "stage 1/2 attention: steps 0-2" in r.stdout and "stage 2/2 all: steps 2-4" in r.stdout


MIXED_STAGES = """\
[[stages]]
name = "reasoning_warmup"
steps = 2
data = { reasoning = 1, cot = 1 }

[[stages]]
name = "plays"
steps = 2
data = { plays = 1 }

[[stages]]
name = "joint"
"""


def test_stage_file_with_a_data_mix_per_stage_trains_and_resumes(tmp_path):
    "`--config` with a data mix per stage, end to end: each stage reads its mix, validation reports every source;"
    " stopped at a stage boundary and resumed with `--resume`, the run reaches the weights of the run that never"
    " stopped; a stage file with another mix is refused on resume, in one line."
    from mice.cli import parser, train_config
    stages, other = tmp_path / "stages.toml", tmp_path / "other.toml"
    stages.write_text(MIXED_STAGES)
    other.write_text(MIXED_STAGES.replace("plays = 1 }", "plays = 1, bible = 1 }"))
    args = ["--steps", "6", "--eval-every", "2", "--batch-size", "4", "--data", "plays=1", "bible=1",
            "--no-full-final-eval", *SMALL]
    r = mice("train", "--config", stages, *args, "--out-dir", tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("stage 1/3 reasoning_warmup: steps 0-2", "frozen; data cot 1, reasoning 1\n",
                 "stage 2/3 plays: steps 2-4", "frozen; data plays 1\n", "stage 3/3 joint: steps 4-6",
                 "frozen; data bible 1, plays 1\n"):
        assert line in r.stdout, r.stdout
    last = [line for line in r.stdout.splitlines() if line.startswith("step     6")][0]
    assert all(f"  {s} " in last for s in ("plays", "bible", "cot", "reasoning")), last
    part = tmp_path / "part"
    in_process(train_config(parser().parse_args(["train", "--config", str(stages), *args, "--out-dir", str(part)])),
               stop_at=2)
    r = mice("train", "--config", other, *args, "--out-dir", part, "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "other settings: --stages=" in r.stderr, r.stderr
    assert "'data': {'bible': 1, 'plays': 1}" in r.stderr.split("→")[1], r.stderr
    r = mice("train", "--config", stages, *args, "--out-dir", part, "--resume")
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    b = load_checkpoint(part / "checkpoint.safetensors")
    assert a.step == b.step == 6 and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.meta["data_state"] == b.meta["data_state"]


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([bin_path("python"), "-m", "mice.cli", "train", "--k-experts", "2"], capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "--k-experts: model 'dense' has no moe.top_k" in r.stderr, r.stderr


def test_flash_attention_off_leaves_only_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401  (the API the trainer uses)
    with forward_context(torch.device("cpu"), torch.float32, flash_attention=False):
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    with forward_context(torch.device("cpu"), torch.float32, flash_attention=True):
        assert torch.backends.cuda.flash_sdp_enabled()


def test_runner_flags_reach_the_checkpoint(tmp_path):
    "The MGM runner's flags, end to end: what they set is what the checkpoint records."
    r = mice("train", "--model", "top2", "--hidden-dim", "32", "--num-heads", "2", "--experts-num", "4",
             "--k-experts", "2", "--learning-rate", "0.02", "--seq-len", "16", "--seed", "3", "--steps", "4",
             "--validation-steps", "2", "--sample-size", "5", "--amp-off", "--flash-attention-off",
             "--grad-accum", "2", "--schedule", "wsd", "--batch-size", "4", "--eval-every", "2",
             "--set", "n_layers=1", "--set", "n_kv_heads=1", "--no-progress", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    m, t = ck.meta["model_config"], ck.meta["train_config"]
    assert (m["dim"], m["n_heads"], m["moe"]["n_experts"], m["moe"]["top_k"]) == (32, 2, 4, 2)
    assert (t["lr"], t["seq_len"], t["seed"], t["eval_tokens"], t["sample_tokens"]) == (0.02, 16, 3, 2 * 4 * 16, 5)
    assert (t["amp"], t["flash_attention"], t["grad_accum"], t["schedule"]) == (False, False, 2, "wsd")
    assert read_metrics(tmp_path)[0]["val_tokens"] == 2 * 4 * 16


def test_mgm_preset_skip_setup_and_stage_steps(tmp_path):
    r = mice("train", "--model", "top2", "--stages", "mgm", "--stage-map", "*curvature*=*norm*", "--skip-setup",
             "--stage-steps", "1", "--batch-size", "4", "--eval-every", "4", "--out-dir", tmp_path,
             *[("n_layers=1" if a == "n_layers=2" else a) for a in SMALL])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "curvature_calibration" not in r.stdout and "stage 4/4 joint_finetune: steps 3-4" in r.stdout
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 4


def test_compiled_loss_takes_the_same_step_as_the_eager_one():
    "`TrainStep(compile_loss=True)` (what the trainer does when it compiles): the same loss and weights, bf16 logits."
    from mice.models import build_model
    from mice.training import TrainStep, lm_loss
    torch.manual_seed(0)
    models = [build_model("dense", "tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randint(4096, (2, 16)), torch.randint(4096, (2, 16))
    amp = lambda: torch.autocast("cpu", torch.bfloat16)           # noqa: E731 - bf16 logits, as on the GPU
    steps = [TrainStep(m, m, torch.optim.AdamW(m.parameters(), lr=1e-2), 1.0, amp, compile_loss=c)
             for m, c in zip(models, (False, True))]
    assert steps[0].lm_loss is lm_loss and steps[1].lm_loss is not lm_loss
    losses = [s(x, y) for s in steps]
    assert losses[0].dtype == losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
