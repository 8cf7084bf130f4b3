"""The repository's own invariants: the package is generated from the notebooks, notebooks are clean, the package is
lint-clean, README.md is generated from nbs/index.ipynb, and CI runs the README's test command."""
import json
import re
import shutil
import subprocess
import sys

from conftest import ROOT, bin_path


def _scratch_copy(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tmp_path / f)
    return tmp_path


def _tree(path, sub):
    return {p.relative_to(path): p.read_bytes() for p in sorted((path / sub).rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


def test_export_and_clean_leave_no_diff(tmp_path):
    scratch = _scratch_copy(tmp_path)
    before = {**_tree(scratch, "mice"), **_tree(scratch, "nbs")}
    env = {k: v for k, v in __import__("os").environ.items() if k != "IN_TEST"}  # nbdev_export is a no-op under IN_TEST
    for cmd in ("nbdev_export", "nbdev_clean"):
        subprocess.run([bin_path(cmd)], cwd=scratch, check=True, capture_output=True, env=env)
    after = {**_tree(scratch, "mice"), **_tree(scratch, "nbs")}
    changed = sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"run nbdev_export and nbdev_clean, then commit: these would change: {changed}"


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, ".ci/readme.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(python3 -m venv \.venv && .*)$", readme, flags=re.M)
    assert len(commands) == 2, f"README must show the two commands, found {commands}"
    assert "mice train" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command verbatim"


def test_every_notebook_is_linked_from_index():
    index = (ROOT / "nbs" / "index.ipynb").read_text()
    notebooks = sorted(p for p in (ROOT / "nbs").rglob("[0-9]*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert len(notebooks) > 10
    for nb in notebooks:
        link = nb.relative_to(ROOT / "nbs").as_posix()
        assert f"]({link})" in index, f"nbs/index.ipynb does not link {link}"


def test_the_package_is_lint_clean():
    """ruff (ruff.toml: unused imports, statements packed with `;`, lines over 120 characters) passes on the exported
    package. The one exception is nbdev 2.4's own `__all__` line: it wraps the list at 120 characters and then puts
    `__all__ = ` (10 characters) in front of it."""
    r = subprocess.run([bin_path("ruff"), "check", "--output-format", "json", "mice"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode in (0, 1), r.stderr
    def generated(v):
        line = open(v["filename"]).read().splitlines()[v["location"]["row"] - 1]
        return v["code"] == "E501" and line.startswith("__all__ = [")
    bad = [f"{v['filename']}:{v['location']['row']}: {v['code']} {v['message']}" for v in json.loads(r.stdout)
           if not generated(v)]
    assert not bad, "ruff check mice:\n" + "\n".join(bad)
