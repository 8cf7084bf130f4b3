#!/usr/bin/env python3
"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed here).

Hidden cells (`#| hide`) are dropped and `#|` directive lines removed, as nbdev's own processing does; a cell marked
`#| echo: false` shows its printed output only.
`python .ci/readme.py --check` exits 1 if README.md is not current."""
import re, sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parent.parent


def render() -> str:
    nb = nbformat.read(root / "nbs" / "index.ipynb", as_version=4)
    keep = []
    for cell in nb.cells:
        lines = cell.source.splitlines()
        directives = [l for l in lines if re.match(r"\s*#\|", l)]
        if any(re.match(r"\s*#\|\s*hide\b", l) for l in directives): continue
        if any(re.match(r"\s*#\|\s*echo:\s*false", l) for l in directives):   # the output alone, as a code block
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            keep.append(nbformat.v4.new_markdown_cell("```\n" + text.rstrip("\n") + "\n```"))
            continue
        cell.source = "\n".join(l for l in lines if l not in directives).strip("\n")
        keep.append(cell)
    nb.cells = keep
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    body = re.sub(r"\]\((\w+\.ipynb)", r"](nbs/\1", body)   # links between notebooks, seen from the repository root
    body = re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"
    return "<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n" + body


if __name__ == "__main__":
    text = render()
    readme = root / "README.md"
    if "--check" in sys.argv:
        if readme.read_text(encoding="utf-8") != text:
            sys.exit("README.md is not current: run `python .ci/readme.py` (it is generated from nbs/index.ipynb)")
    else:
        readme.write_text(text, encoding="utf-8")
