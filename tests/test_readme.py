"""The README runs as written: every `mice` command it shows is accepted by the parser (nothing long is run), and the
tour of the API prints what the README says it prints (the forward time masked: it varies)."""
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def mice_commands(text: str) -> list[list[str]]:
    "The `mice` commands in ```sh blocks (each `&&` part) and in inline code, as argument lists (after `mice`)."
    parts = [p for block in re.findall(r"```sh\n(.*?)```", text, re.S) for p in block.split("&&")]
    parts += re.findall(r"`(mice [^`]+)`", text)
    found = []
    for part in parts:
        words = shlex.split(part.strip())
        if words and re.fullmatch(r"(\S*/)?mice", words[0]): found.append(words[1:])
    return found


def expand(argv: list[str], suites) -> list[list[str]]:
    "A placeholder SUITE stands for every suite the README lists."
    return [[s if w == "SUITE" else w for w in argv] for s in suites] if "SUITE" in argv else [argv]


def accept(argv: list[str]):
    "Parse `mice ARGV` as `main` would and check its values (TrainConfig, generation), without running anything."
    from mice import bench, cli
    from mice.models import check_generation
    if argv[:1] == ["bench"]:
        with pytest.raises(SystemExit, match="^0$") if "-h" in argv else mock.patch.object(sys, "argv", argv):
            bench.parse_args(argv[1:], cli.SUITES)
        return
    if "-h" in argv or "--help" in argv:
        with pytest.raises(SystemExit, match="^0$"): cli.parser().parse_args(argv)
        return
    a = cli.parser().parse_args(argv)
    if a.command == "train": cli._config(a, a.model, model=a.model, seed=a.seed, sample_tokens=a.sample_tokens)
    if a.command == "compare": cli._config(a, a.models[0], sample_tokens=0)
    if a.command == "generate": check_generation(a.tokens, a.temperature, a.top_k or None, a.seed)


def test_readme_commands_are_accepted():
    from mice.cli import SUITES
    listed = re.findall(r"`(\w+)`", README[README.index("the suites are"):][:200])
    assert set(listed) == set(SUITES), (listed, sorted(SUITES))
    commands = [c for argv in mice_commands(README) for c in expand(argv, listed)]
    subcommands = {c[0] for c in commands if c}
    assert {"train", "generate", "compare", "bench"} <= subcommands and len(commands) >= 10, commands
    for argv in commands:
        try: accept(argv)
        except SystemExit as e: raise AssertionError(f"`mice {shlex.join(argv)}` is refused (exit {e.code})") from None
        except ValueError as e: raise AssertionError(f"`mice {shlex.join(argv)}` is refused: {e}") from None
    print(f"{len(commands)} README commands accepted")


def tour() -> tuple[str, str]:
    "The tour's code block and the output the README shows below it."
    section = README[README.index("## A tour of the API"):]
    code = re.search(r"```\w*\n(.*?)```", section, re.S).group(1)
    after = section[section.index(code) + len(code) + 3:]
    shown = re.match(r"\n*((?:    .*\n|\n)+)", after).group(1)
    return code, "\n".join(line[4:] for line in shown.strip("\n").splitlines()) + "\n"


def mask(text: str) -> str:
    return re.sub(r"forward [0-9.]+ ms", "forward <time> ms", text)


def test_readme_tour_prints_what_the_readme_shows():
    code, shown = tour()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert mask(r.stdout) == mask(shown), f"the tour printed\n{r.stdout}\nthe README shows\n{shown}"
