"""Imports run one way, downward: the layer map in `tests/layers.py` holds for every module, and cannot rot."""
import re

import pytest

from conftest import ROOT
from layers import LAYER_NAMES, RANKS, modules, references, upward


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m not in RANKS]
    assert not missing, f"give these modules a rank in tests/layers.py RANKS: {missing}"
    gone = [m for m in RANKS if m not in modules()]
    assert not gone, f"RANKS names modules that do not exist: {gone}"


def test_no_reference_runs_upward():
    bad = upward()
    assert not bad, "imports must run downward:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("import mice.models", {"models"}),
    ("from mice.training import train", {"training"}),
    ("from . import cli", {"cli"}),
    ("from .models import build_model", {"models"}),
    ("def f():\n    from mice.models import build_model\n", {"models"}),
    ("import importlib\nimportlib.import_module('mice.training')", {"training"}),
    ("NAMES = ('mice.models', 'mice.cli')", {"models", "cli"}),
    ('"""Docstrings may name mice.models."""\nx = 1', set()),
    ("def f():\n    'see mice.cli'\n    return 1", set()),
])
def test_the_reader_sees_every_kind_of_reference(tmp_path, monkeypatch, source, expected):
    "The reader must find imports at the top, inside functions and by a module name in a string: a test that can fail."
    import layers
    pkg = tmp_path / "mice"
    pkg.mkdir()
    for m in ("utils", "models", "training", "cli"): (pkg / f"{m}.py").write_text("")
    (pkg / "utils.py").write_text(source)
    monkeypatch.setattr(layers, "PACKAGE", pkg)
    assert set(references("utils")) == expected


def test_readme_names_the_layers():
    "README's development section lists every module under its layer, as tests/layers.py has them."
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d)\. ([^|]+)\|([^|]+)\|", readme, flags=re.M)
    table = {int(k): set(re.findall(r"`mice\.(\w+)`", mods)) for k, _, mods in rows}
    expected = {}
    for m in modules(): expected.setdefault(RANKS[m] // 10, set()).add(m)
    assert table == expected, f"README layer table {table} != tests/layers.py {expected}"
    for k, name, _ in rows: assert name.strip() == LAYER_NAMES[int(k)]


def test_index_draws_the_layers_as_they_are():
    "The drawing in nbs/index.ipynb (and so README.md) is the output of `diagram()` on today's code."
    import json
    from layers import diagram
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "diagram()" in "".join(c["source"]))
    printed = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream")
    assert printed.rstrip("\n") == diagram(), "run nbs/index.ipynb's layer cell again, then .ci/readme.py"
