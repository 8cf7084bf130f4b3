"""The layers of the `mice` package, and a reader of the references between its modules.

`tests/test_layers.py` checks that every reference runs downward; `nbs/index.ipynb` draws the layers with `diagram()`.
A module's rank is its layer times ten plus its order inside the layer: a module may use only modules of a lower rank.
"""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mice"
LAYER_NAMES = {1: "foundation", 2: "mechanisms", 3: "models", 4: "training", 5: "experiments and interfaces"}
RANKS = {
    "utils": 10, "bench": 11, "blocks": 12, "data": 12, "sources": 13,
    "petals": 20, "attention": 20, "routing": 20, "dynamics": 20, "memory": 20, "vectorhull": 21, "geometric": 21,
    "models": 30, "hf": 31,
    "training": 40,
    "experiments": 50, "cli": 51,
}
GENERATED = {"__init__", "_modidx"}   # written by nbdev, not by a notebook


def modules() -> list[str]:
    "The package's modules written from notebooks."
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in GENERATED)


def _docstrings(tree) -> set[int]:
    "ids of the string constants that are docstrings (of the module, a class or a function)."
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def references(module: str) -> dict[str, list[str]]:
    """Modules of the package that `module` refers to, each with how: an import anywhere in the file (top level or
    inside a function), `importlib.import_module`/`__import__` of a name, or a `mice.<module>` name in a string
    that is not a docstring."""
    known, tree = set(modules()), ast.parse((PACKAGE / f"{module}.py").read_text())
    docs, found = _docstrings(tree), {}
    def add(name, how):
        if name in known and name != module: found.setdefault(name, []).append(f"{how} (line {line})")
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mice."): add(a.name.split(".")[1], "import")
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1 or (node.level == 0 and parts[0] == "mice"):
                inner = parts if node.level == 1 else parts[1:]
                if inner and inner[0]: add(inner[0], "from-import")
                else:
                    for a in node.names: add(a.name, "from-import")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for name in re.findall(r"\bmice\.(\w+)", node.value): add(name, "string")
    return found


def upward() -> list[str]:
    "Every reference that does not run strictly downward, as readable lines."
    bad = []
    for m in modules():
        for target, hows in references(m).items():
            if RANKS.get(target, 99) >= RANKS.get(m, -1):
                bad.append(f"mice.{m} (rank {RANKS.get(m)}) -> mice.{target} (rank {RANKS.get(target)}): {', '.join(hows)}")
    return bad


def diagram() -> str:
    "The layers from the top down, then which module uses which (read from the code, so it cannot go stale)."
    by_layer = {}
    for m in sorted(modules(), key=lambda m: (RANKS[m], m)): by_layer.setdefault(RANKS[m] // 10, []).append(m)
    width = max(len(n) for n in LAYER_NAMES.values())
    lines = [f"{k}  {LAYER_NAMES[k]:<{width}}  " + "  ".join(by_layer.get(k, [])) for k in sorted(LAYER_NAMES, reverse=True)]
    lines += ["", "uses (every arrow points to a lower rank: a lower layer, or earlier in the same layer):"]
    order = sorted(modules(), key=lambda m: (-RANKS[m], m))
    for m in order:
        uses = sorted(references(m), key=lambda t: (-RANKS[t], t))
        lines.append(f"  {m:<11} -> {', '.join(uses) if uses else '(nothing of mice)'}")
    return "\n".join(lines)
