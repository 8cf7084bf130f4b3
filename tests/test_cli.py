"""The `mice` command as a user runs it: the main job, generation, resuming, benchmarks, and every bad argument."""
import json
import re
import subprocess

import pytest

from conftest import bin_path

SMALL = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "2048", "--sample-tokens", "8", "--no-progress"]


def mice(*args, timeout=900):
    return subprocess.run([bin_path("mice"), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def val_bpb(output: str) -> float:
    return float(re.search(r"validation: ([0-9.]+) bits/byte", output).group(1))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    "The README's main job, `mice train` with its defaults (only the output folder moved)."
    out = tmp_path_factory.mktemp("default")
    r = mice("train", "--out-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_main_job_beats_the_bigram_floor(default_run):
    from mice.data import ngram_floors, text_files
    out, r = default_run
    read = lambda split: "".join(p.read_text() for p in text_files(split))
    floors = ngram_floors(read("train"), read("validation"))
    bpb = val_bpb(r.stdout)
    print(f"default run: {bpb:.3f} bits/byte; floors: {floors}")
    assert bpb < floors["bigram_bpb"] - 0.5, (bpb, floors)
    assert "(full validation split)" in r.stdout and "--- sample ---" in r.stdout
    assert "train:" in r.stderr, "the progress bar is shown"
    assert (out / "checkpoint.safetensors").is_file()


def test_generate_from_the_checkpoint(default_run):
    out, _ = default_run
    r = mice("generate", "--checkpoint", out / "checkpoint.safetensors", "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:") + 10
    again = mice("generate", "--checkpoint", out / "checkpoint.safetensors", "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3")
    assert again.stdout == r.stdout, "a seed reproduces a sample"


def test_resume_continues_the_run(tmp_path):
    r = mice("train", "--steps", "4", "--eval-every", "2", "--out-dir", tmp_path, *SMALL)
    assert r.returncode == 0, r.stderr
    r = mice("train", "--steps", "6", "--eval-every", "2", "--out-dir", tmp_path, "--resume", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "step     6" in r.stdout and "step     2" not in r.stdout
    from mice.training import load_checkpoint
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 6


def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    r = mice("bench", "matmul", "--device", "cpu", "--sizes", "64", "128", "--repeat", "3", "--warmup", "1",
             "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    assert "matmul n=128" in r.stdout and "TFLOP/s" in r.stdout
    rows = json.loads((tmp_path / "m.json").read_text())["results"]
    assert {row["name"] for row in rows} >= {"matmul n=64", "matmul n=128"}
    assert all(row["env"]["torch"] for row in rows)


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "nope"], "unknown model 'nope'"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--steps", "0"], "steps"),
    (["train", "--lr", "-1"], "lr"),
    (["train", "--set", "dim"], "expected name=value"),
    (["train", "--set", "dim=30", "--set", "n_heads=4"], "divisible by n_heads"),
    (["train", "--device", "cuda"], "CUDA is not available"),
    (["train", "--set", "vocab_size=10"], "vocab_size is set by the tokenizer"),
    (["train", "--resume", "/no/such.safetensors"], "checkpoint not found"),
    (["generate", "--checkpoint", "/no/such.safetensors"], "checkpoint not found"),
    (["generate", "--tokens", "-3"], "--tokens"),
    (["bench", "nosuch"], "invalid choice: 'nosuch'"),
    (["bench", "matmul", "--tokens", "0"], "positive integer"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--model", "dense", "--set", "inl.dt=0.2"], "--set inl.dt: DenseConfig has no field 'inl'"),
    (["train", "--model", "dense", "--set", "moe.top_k=2"], "model 'dense' has no moe: pick the model kind"),
    (["train", "--model", "inl", "--set", "inl.bounds=soft"], "inl.bounds: expected one of ('smooth', 'clamp')"),
    (["train", "--model", "routed_modulo", "--set", "experts.route=hash"], "pick the model kind instead of overriding"),
    (["compare", "--models", "dense", "nope"], "unknown model(s) ['nope']"),
    (["compare", "--models", "dense", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    r = mice(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "flipped byte", "other safetensors"])
def test_corrupted_checkpoint_is_refused(tmp_path, damage):
    r = mice("train", "--steps", "2", "--eval-every", "2", "--out-dir", tmp_path, *SMALL)
    assert r.returncode == 0, r.stderr
    ck = tmp_path / "checkpoint.safetensors"
    raw = bytearray(ck.read_bytes())
    if damage == "random bytes": ck.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated": ck.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped byte":
        raw[-100] ^= 0x01
        ck.write_bytes(raw)
    else:
        import torch
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(3)}, str(ck))
    r = mice("generate", "--checkpoint", ck, "--tokens", "5")
    assert r.returncode == 2 and ("corrupted" in r.stderr or "not a mice checkpoint" in r.stderr), r.stderr
    r = mice("train", "--steps", "4", "--out-dir", tmp_path, "--resume", *SMALL)
    assert r.returncode == 2 and ("corrupted" in r.stderr or "not a mice checkpoint" in r.stderr), r.stderr


def test_ddp_with_two_processes_on_cpu(tmp_path):
    "Training scales out through torch.distributed: torchrun, gloo on the CPU, two ranks."
    r = subprocess.run([bin_path("torchrun"), "--standalone", "--nproc_per_node", "2", bin_path("mice"), "train",
                        "--steps", "4", "--eval-every", "4", "--out-dir", str(tmp_path), *SMALL],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation:") == 1, "only rank 0 reports"
    from mice.training import load_checkpoint
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 4


def test_help_of_every_command():
    for args in (["-h"], ["train", "-h"], ["generate", "-h"], ["compare", "-h"], ["bench", "-h"]):
        r = mice(*args)
        assert r.returncode == 0 and "usage:" in r.stdout, (args, r.stderr)
    assert "matmul" in mice("bench", "-h").stdout


def test_train_and_generate_a_mechanism_kind(tmp_path):
    "`mice train --model mu_inl` trains, checkpoints, and `mice generate` rebuilds the kind from the checkpoint."
    r = mice("train", "--model", "mu_inl", "--steps", "2", "--eval-every", "2", "--out-dir", tmp_path, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "mu_inl/tiny" in r.stdout
    r = mice("generate", "--checkpoint", tmp_path / "checkpoint.safetensors", "--prompt", "ROMEO:", "--tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr


# --- data sources and mixes (mice.sources) ---
FAST = ["--steps", "2", "--eval-every", "2", "--no-full-final-eval", *SMALL]


def ckpt_meta(out):
    from mice.training import load_checkpoint
    return load_checkpoint(out / "checkpoint.safetensors").meta


def test_train_on_a_mix_reports_each_source(tmp_path):
    r = mice("train", "--data", "plays=1", "bible=1", "cot=0.5", "--out-dir", tmp_path, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    last = [line for line in r.stdout.splitlines() if line.startswith("step     2")][0]
    assert all(f"  {s} " in last for s in ("plays", "bible", "cot")), last
    meta = ckpt_meta(tmp_path)
    assert meta["train_config"]["data"] == {"bible": 1.0, "cot": 0.5, "plays": 1.0}
    rows = meta["data_state"]["rows"]
    assert sum(rows.values()) == 2 * 4 and rows["cot"] < rows["plays"], rows      # 2 steps of 4 rows, weights 2:2:1
    r = mice("train", "--data", "plays=1", "bible=1", "cot=0.5", "--out-dir", tmp_path, "--resume",
             *FAST[:1], "4", *FAST[2:])
    assert r.returncode == 0 and "step     4" in r.stdout, r.stderr[-3000:]
    assert sum(ckpt_meta(tmp_path)["data_state"]["rows"].values()) == 4 * 4, "the resumed stream continues"


@pytest.mark.parametrize("flags, mix", [
    (["--dataset-conversational"], {"plays": 1.0}),
    (["--dataset-reasoning"], {"reasoning": 1.0}),
    (["--dataset-cot"], {"cot": 1.0}),
    (["--dataset-bible"], {"bible": 1.0}),
    (["--dataset-conversational", "--dataset-cot", "--data", "reasoning=0.5"],
     {"cot": 1.0, "plays": 1.0, "reasoning": 0.5}),
])
def test_dataset_flags_choose_the_sources(tmp_path, flags, mix):
    r = mice("train", *flags, "--out-dir", tmp_path, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = ckpt_meta(tmp_path)
    assert meta["train_config"]["data"] == mix
    if mix == {"plays": 1.0}:
        assert "data_state" not in meta, "the plays alone keep the get_batch path"
    else:
        assert {k for k, v in meta["data_state"]["rows"].items() if v} == set(mix), meta["data_state"]
        assert f"data {mix}" in r.stdout


def test_data_path_trains_on_a_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6): (corpus / f"part{i}.txt").write_text(f"Line {i} of a small corpus, said the clerk.\n" * 60)
    r = mice("train", "--data-path", corpus, "--out-dir", tmp_path / "run", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    mix = ckpt_meta(tmp_path / "run")["train_config"]["data"]
    assert mix == {f"text:{corpus.resolve()}": 1.0}, mix


@pytest.mark.parametrize("args, message", [
    (["--data", "wiki=1"], "unknown source 'wiki'"),
    (["--data", "plays=-1"], "data['plays']: expected a number >= 0"),
    (["--data", "plays=0"], "at least one weight must be > 0"),
    (["--data", "plays"], "--data: expected SOURCE=WEIGHT, got 'plays'"),
    (["--data", "plays=lots"], "--data plays: expected a number, got 'lots'"),
    (["--data-path", "/no/such/folder"], "no such file or folder"),
    (["--data-path", "EMPTY"], "the folder has no .txt/.md/.rst/.text files"),
])
def test_bad_data_arguments_give_one_clear_line(tmp_path, args, message):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    r = mice("train", *args, "--out-dir", tmp_path, *FAST)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_data_suite_on_cpu():
    r = mice("bench", "data", "--device", "cpu", "--opt", "batch=4", "--opt", "seq=64", "--repeat", "3",
             "--warmup", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "get_batch plays B=4 T=64" in r.stdout and "mixed all B=4 T=64" in r.stdout, r.stdout


def test_ddp_on_a_mix_splits_each_batch_between_ranks(tmp_path):
    "With two ranks the stream gives 2 x batch-size rows per step, and each rank trains on its half."
    r = subprocess.run([bin_path("torchrun"), "--standalone", "--nproc_per_node", "2", bin_path("mice"), "train",
                        "--data", "plays=1", "cot=1", "--out-dir", str(tmp_path), *FAST],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation:") == 1, "only rank 0 reports"
    assert ckpt_meta(tmp_path)["data_state"]["rows"] == {"cot": 8, "plays": 8}   # 2 steps x 2 ranks x 4 rows
