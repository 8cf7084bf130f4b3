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
    assert "% ref matmul" in r.stdout and "% peak" not in r.stdout, "the ratio is to the reference matmul, not a peak"
    rows = json.loads((tmp_path / "m.json").read_text())["results"]
    assert {row["name"] for row in rows} >= {"matmul n=64", "matmul n=128"}
    assert all(row["env"]["torch"] for row in rows)


def test_bench_profile_splits_each_timing_by_kernel_kind(tmp_path):
    "`--profile`: every timing carries device time by kernel kind into the JSON and a line under the table."
    r = mice("bench", "routing", "--device", "cpu", "--opt", "parts=dense", "--sizes", "64", "--opt", "experts=4",
             "--opt", "tokens=256", "--repeat", "2", "--warmup", "1", "--profile", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "* token-routed E=4 d=64 N=256 fwd+bwd profile: device" in r.stdout
    for row in json.loads((tmp_path / "r.json").read_text())["results"]:
        p = row["step"]["profile"] if row["step"] else row["fwd"]["profile"]
        assert p["device_ms"] > 0 and p["launches"] >= 1 and abs(sum(p["kinds"].values()) - p["device_ms"]) < 1e-6
        assert "gemm" in p["kinds"] and p["top"], (row["name"], p)


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
    # a device that is not one, or not here
    (["train", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", "--device", "cuda:7"], "--device: 'cuda:7' requested but"),
    # values that make no sense, named by their flag
    (["generate", "--temperature", "nan"], "--temperature: expected a number >= 0 and < inf, got nan"),
    (["generate", "--temperature", "inf"], "--temperature: expected a number >= 0 and < inf, got inf"),
    (["generate", "--top-k", "-2"], "--top-k: expected an integer >= 1"),
    (["generate", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["generate", "--top-p", "0"], "--top-p: expected a number > 0 and <= 1, got 0.0"),
    (["generate", "--top-p", "1.5"], "--top-p: expected a number > 0 and <= 1, got 1.5"),
    (["generate", "--model", "nope"], "--model: unknown model 'nope'; expected one of: dense"),
    (["generate", "--model", "dense", "--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["generate", "--model", "dense", "--checkpoint", "x.safetensors"], "--model: samples an untrained model; it goes "
     "without --checkpoint"),
    (["generate", "--set", "dim=64"], "--set: sets a field of --model's config"),
    (["generate", "--model", "mu", "--set", "inl.dt=0.2"], "model 'mu' has no inl"),
    (["train", "--grad-clip", "-1"], "--grad-clip: expected a number > 0, got -1.0"),
    (["train", "--weight-decay", "-1"], "--weight-decay: expected a number >= 0"),
    (["train", "--lr", "inf"], "--lr: expected a number > 0 and < inf"),
    (["train", "--min-lr-ratio", "2"], "--min-lr-ratio: expected a number >= 0 and <= 1"),
    (["train", "--sample-tokens", "-1"], "--sample-tokens: expected an integer >= 0"),
    (["train", "--eval-tokens", "-1"], "--eval-tokens: expected an integer >= 0"),
    (["train", "--allow-changes"], "--allow-changes: goes with --resume"),
    (["compare", "--grad-clip", "0"], "--grad-clip: expected a number > 0"),
    # the benchmark harness: a suite's own errors, and options no suite reads
    (["bench", "model", "--models", "nosuch"], "--models: unknown model(s) ['nosuch']"),
    (["bench", "model", "--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["bench", "model", "--opt", "loss=fused"], "--opt loss: expected compiled and/or eager, got ['fused']"),
    (["bench", "matmul", "--compile-mode", "reduce-overhead"], "--compile-mode: reduce-overhead needs --compile"),
    (["bench", "model", "--compile", "--compile-mode", "max-autotune"], "--compile-mode: the model suite compiles as"),
    (["bench", "matmul", "--opt", "foo=1"], "suite 'matmul' reads no option 'foo'; it takes none"),
    (["bench", "petals", "--opt", "petal=2"], "suite 'petals' reads no option 'petal'; its options: petals, depth"),
    (["bench", "decode", "--device", "cpu", "--opt", "new=1"], "--opt new: expected an integer >= 2, got 1"),
    (["bench", "decode", "--device", "cpu", "--opt", "qk_norm=2"], "--opt qk_norm: expected an integer in [0, 1]"),
    (["bench", "decode", "--opt", "prompts=3"], "suite 'decode' reads no option 'prompts'; its options: prompt, new"),
    (["bench", "decode", "--device", "cpu", "--models", "dense", "nope"], "--models: unknown model 'nope'"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    r = mice(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]          # argparse's own errors come after its usage line
    assert message in last and len(last) < 400, last
    if not r.stderr.startswith("usage:"): assert r.stderr.count("\n") == 1, r.stderr
    assert not re.search(r"TrainConfig|\btop_k\b|max_new_tokens|\bgrad_clip\b|\bweight_decay\b", r.stderr), r.stderr


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("weight_decay", -1.0), ("grad_clip", 0.0),
                                          ("lr", float("nan")), ("eval_tokens", 0), ("device", "tpu"),
                                          ("preset", "huge"), ("model", "nope"), ("compile", "yes")])
def test_train_config_checks_every_field_in_one_place(field, value):
    "The Python API refuses what the command line refuses, with the field's name (the CLI maps it to the flag)."
    from mice.cli import FLAGS, cli_message
    from mice.training import TrainConfig
    with pytest.raises(ValueError, match=f"^{field}: ") as e: TrainConfig(**{field: value})
    assert cli_message(e.value).startswith(FLAGS[field] + ": "), cli_message(e.value)


def test_flags_name_every_field():
    "One mapping from internal names to flags; every TrainConfig field has a flag that `mice train` takes."
    from dataclasses import fields
    from mice.cli import FLAGS, parser
    from mice.training import TrainConfig
    train = next(a for a in parser()._actions if a.dest == "command").choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    missing = [f.name for f in fields(TrainConfig) if FLAGS[f.name] not in flags]
    assert not missing, missing
    assert {"--tokens", "--top-k", "--temperature", "--prompt"} <= {FLAGS[k] for k in ("max_new_tokens", "top_k",
                                                                                      "temperature", "prompts")}


def test_generate_from_a_checkpoint_saved_without_meta(tmp_path):
    "A library model saved by `save_checkpoint(path, model)` describes itself; anything else is one clear line."
    import torch.nn as nn
    from mice.data import load_tokenizer
    from mice.models import build_model
    from mice.training import save_checkpoint
    V = load_tokenizer().get_vocab_size()
    small = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    save_checkpoint(tmp_path / "bare.safetensors", build_model("dense", "tiny", vocab_size=V, **small))
    r = mice("generate", "--checkpoint", tmp_path / "bare.safetensors", "--tokens", "5", "--prompt", "ROMEO:")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    save_checkpoint(tmp_path / "v50.safetensors", build_model("dense", "tiny", vocab_size=50, **small))
    save_checkpoint(tmp_path / "linear.safetensors", nn.Linear(2, 2))
    for name, message in (("v50", "its model has 50 token ids, the tokenizer"), ("linear", "describes no model")):
        r = mice("generate", "--checkpoint", tmp_path / f"{name}.safetensors", "--tokens", "5")
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_resume_refuses_changed_settings_and_never_overwrites(tmp_path):
    "A resume continues a run exactly: other settings than the checkpoint's (but a larger --steps) are refused in one line"
    " naming them, before anything is written; a fresh run does not replace a checkpoint unless asked to."
    r = mice("train", "--steps", "4", "--eval-every", "2", "--out-dir", tmp_path, *SMALL)
    assert r.returncode == 0, r.stderr
    ck = tmp_path / "checkpoint.safetensors"
    good = ck.read_bytes()
    r = mice("train", "--steps", "6", "--eval-every", "2", "--out-dir", tmp_path, "--resume", *SMALL,
             "--lr", "0.5", "--batch-size", "8", "--seq-len", "16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and len(r.stderr) < 400, r.stderr
    for change in ("--lr=0.003 → 0.5", "--batch-size=4 → 8", "--seq-len=32 → 16", "--allow-changes"):
        assert change in r.stderr, r.stderr
    r = mice("train", "--steps", "6", "--eval-every", "2", "--out-dir", tmp_path, *SMALL)
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr
    r = mice("train", "--steps", "4", "--eval-every", "2", "--out-dir", tmp_path, "--resume", *SMALL)
    assert r.returncode == 2 and "ask for more steps than that (--steps=4)" in r.stderr, r.stderr
    assert ck.read_bytes() == good, "a refused run leaves the checkpoint as it was"
    r = mice("train", "--steps", "6", "--eval-every", "2", "--out-dir", tmp_path, "--resume", "--allow-changes", *SMALL,
             "--lr", "0.005", "--sample-tokens", "0")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 4" in r.stdout and "validation:" in r.stdout, "--sample-tokens 0 keeps the summary"
    assert "--- sample ---" not in r.stdout
    from mice.training import load_checkpoint
    saved = load_checkpoint(ck)
    assert saved.step == 6 and saved.meta["train_config"]["lr"] == 0.005
    r = mice("train", "--steps", "2", "--eval-every", "2", "--out-dir", tmp_path, "--overwrite", *SMALL)
    assert r.returncode == 0 and load_checkpoint(ck).step == 2, r.stderr


def test_header_is_a_line_of_its_own(tmp_path):
    "The run's header is printed before the progress bar's first frame, not glued after it."
    import os
    r = subprocess.run([bin_path("mice"), "train", "--steps", "2", "--eval-every", "2", "--out-dir", str(tmp_path),
                        *[a for a in SMALL if a != "--no-progress"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout
    lines = re.split(r"[\r\n]", r.stdout)
    header = next(line for line in lines if "parameters on" in line)
    assert header.startswith("dense/tiny: "), repr(header)
    assert r.stdout.index("parameters on") < r.stdout.index("train:"), "the header comes before the bar"


def _parsers():
    "Every argparse parser the `mice` command uses: the main one, each subcommand's and the benchmark harness's."
    import argparse
    from unittest import mock
    from mice import bench
    from mice.cli import SUITES, parser
    p = parser()
    subs = next(a for a in p._actions if a.dest == "command").choices
    seen = []
    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        bench.parse_args(["matmul"], SUITES)
    return {"mice": p, **{f"mice {k}": v for k, v in subs.items() if k != "bench"}, "mice bench": seen[0]}


def test_help_says_what_each_option_does():
    "Every option's help says what it does, not only its default."
    import argparse
    bare = []
    for name, p in _parsers().items():
        for a in p._actions:
            text = (a.help or "").replace("%(default)s", "X")
            words = re.sub(r"\(default[^)]*\)", "", text).strip()
            if a.dest != "help" and not isinstance(a, argparse._SubParsersAction) and len(words.split()) < 3: bare.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not bare, bare
    assert mice("bench", "-h").stdout.startswith("usage: mice bench")


def test_greedy_sample_from_the_default_prompt_is_text(default_run):
    "`mice generate --temperature 0` from the default prompt (a new line) prints text, not blank lines."
    out, _ = default_run
    r = mice("generate", "--checkpoint", out / "checkpoint.safetensors", "--temperature", "0", "--tokens", "40")
    assert r.returncode == 0 and len(r.stdout.split()) >= 5 and r.stderr == "", (r.stdout, r.stderr)


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


TINY = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1"]


@pytest.mark.parametrize("name", ["dense", "top2", "mu_inl", "routed", "mgm", "dense_mem", "convex", "convex_picnn"])
def test_generate_samples_every_family(name):
    "`mice generate --model NAME` samples an untrained model of any family (and says it is untrained)."
    r = mice("generate", "--model", name, "--prompt", "ROMEO:", "--tokens", "6", "--seed", "2", *TINY)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    assert f"--model {name}: an untrained model" in r.stderr and r.stderr.count("\n") == 1, r.stderr


class _Writes:
    "A stdout that records every write and whether a flush followed it."
    def __init__(self): self.writes, self.flushed = [], 0
    def write(self, text): self.writes.append(text)
    def flush(self): self.flushed += 1


def test_generate_prints_the_text_as_it_comes(monkeypatch):
    """`mice generate` prints every token's text when it is sampled (a write and a flush per step, a multi-byte
    character once whole), and what it prints is the tokenizer's decoding of the prompt and every new token."""
    import contextlib
    from mice import cli
    from mice.data import EOT, load_tokenizer
    from mice.models import generate
    seen = []
    def spy(*args, **kw):
        out = generate(*args, **kw)
        seen.append(out)
        return out
    monkeypatch.setattr(cli, "generate", spy)
    out = _Writes()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(_Writes()):
        assert cli.main(["generate", "--model", "dense", "--prompt", "Caf\u00e9 \U0001f642", "--tokens", "12",
                         "--temperature", "1.5", "--top-k", "0", "--top-p", "0.99", "--seed", "4", *TINY]) == 0
    tok = load_tokenizer()
    text = "".join(out.writes)
    ids = seen[0]                                                       # one prompt: one list of ids back
    assert text == tok.decode(ids) + "\n" and text.startswith("Caf\u00e9 \U0001f642")
    assert ids[0] == tok.token_to_id(EOT) and len(ids) == len(tok.encode("Caf\u00e9 \U0001f642").ids) + 13
    assert out.flushed >= 12 and len([w for w in out.writes if w]) >= 6, out.writes


def test_text_stream_prints_multibyte_characters_whole():
    "Fed one byte-level token at a time, `TextStream` prints accents, CJK and emoji whole, never a U+FFFD."
    import io
    from mice.cli import TextStream
    from mice.data import load_tokenizer
    tok = load_tokenizer()
    text = "ROMEO: caf\u00e9 \u4e2d\u6587 \U0001f642\U0001f3b8 na\u00efve"
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())                          # several tokens for some characters
    buf = io.StringIO()
    s = TextStream(tok, ids[:1], file=buf)
    pieces = []
    for t in ids[1:]:
        n = len(buf.getvalue())
        s.add(t)
        pieces.append(buf.getvalue()[n:])
    assert s.finish() == text and buf.getvalue() == text + "\n"
    assert not any("\ufffd" in p for p in pieces) and "" in pieces    # some tokens waited for the rest of a character


def test_bench_decode_takes_every_family(tmp_path):
    "`mice bench decode --models ...` times every family: the static step where exact, the sliced path everywhere."
    names = ["dense", "mu_inl", "routed", "mgm", "convex"]
    r = mice("bench", "decode", "--device", "cpu", "--models", *names, "--repeat", "1", "--warmup", "1", "--opt",
             "batches=1", "--opt", "prompt=8", "--opt", "new=3", "--opt", "hf=0", "--out", tmp_path / "d.json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row["name"] for row in json.loads((tmp_path / "d.json").read_text())["results"]]
    for name in names:
        assert f"{name} sliced (static=False) B=1" in rows
        assert (f"{name} static eager B=1" in rows) == (name != "mgm"), rows
