"""Sphinx config of the docs site. `.ci/docs` builds it: nbdev's processed notebooks (`_proc/`) -> myst-nb -> `_docs/`.

nbdev processes notebooks for Quarto; `adapt` turns the Quarto-isms into what myst-nb understands.
"""
import json, re

import yaml
from configparser import ConfigParser
from pathlib import Path

from docutils.nodes import make_id, reference
from nbdev.doclinks import _nbpath2html
from sphinx.util import logging

_ini = ConfigParser(delimiters=['='])
_ini.read(Path(__file__).resolve().parent.parent/'settings.ini', encoding='utf-8')
_ini = _ini['DEFAULT']

project, author, release = _ini['title'], _ini['author'], _ini['version']
copyright = _ini['copyright']
extensions = ['myst_nb', 'sphinx.ext.mathjax', 'sphinx-mathjax-offline']  # the latter: MathJax 3 copied into _static/
exclude_patterns = ['_*', '.*', '**/.ipynb_checkpoints']
nb_execution_mode = 'off'                  # notebooks are committed with their outputs
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_inline']
myst_dmath_double_inline = True           # `$$...$$` inside a paragraph is display math, as in Quarto/pandoc
myst_heading_anchors = 3                   # `[text](02_mu_attention.ipynb#rmsnorm)` links to a heading, as on GitHub
nb_render_markdown_format = 'myst'         # math and links inside show_doc output too
nb_ipywidgets_js = {}                      # no widget JS from a CDN: the site works offline...
nb_mime_priority_overrides = [('html', 'application/vnd.jupyter.widget-view+json', None)]  # ...widgets show their text
html_theme = 'sphinx_book_theme'
html_title = project
html_theme_options = {'repository_url': _ini['git_url'], 'use_repository_button': True, 'show_toc_level': 2,
                      'navbar_persistent': []}
html_context = {'default_mode': 'auto'}   # pydata-sphinx-theme logs a console error on a first visit without it
html_static_path = ['_static']
html_css_files = ['mice.css']
# Every other warning fails the build (.ci/docs runs `sphinx-build -W`). Suppressed, with reasons:
suppress_warnings = ['myst.header']        # heading level jumps (# then ###): legal in notebooks and rendered fine

# The sidebar: the foundation notebooks first (nbs/foundation/, in file-name order), then the numbered ones, under index.
TOCTREE = '```{toctree}\n:hidden:\n:glob:\n:maxdepth: 1\n\nfoundation/*\n[0-9]*\n```'
DIRECTIVE = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
TAGS = {('echo', 'false'): 'remove-input', ('output', 'false'): 'remove-output', ('include', 'false'): 'remove-cell',
        ('output', 'asis'): 'show-doc'}  # nbdev marks show_doc cells `output: asis`; mice.css styles them


def adapt(app, docname, source):
    "source-read hook: rewrite one processed notebook (JSON text) for myst-nb."
    if not app.env.doc2path(docname).suffix == '.ipynb': return
    nb = json.loads(source[0])
    nb['metadata'].setdefault('language_info', {'name': 'python', 'pygments_lexer': 'ipython3'})
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'raw' and src.startswith('---'):      # nbdev frontmatter -> title + description
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            c = {'cell_type': 'markdown', 'metadata': {}, 'source': f"# {fm.get('title', docname)}\n\n"
                 + (f"{fm['description']}\n" if fm.get('description') else '')}
        elif c['cell_type'] == 'code':                                 # `#| echo: false` etc. -> myst-nb tags
            lines = src.splitlines()
            while lines and (m := DIRECTIVE.match(lines[0])):
                if tag := TAGS.get((m[1], m[2].lower())): c['metadata'].setdefault('tags', []).append(tag)
                lines.pop(0)
            c['source'] = '\n'.join(lines)
            for o in c.get('outputs', []):                             # show_doc output starts with a `---` rule
                if md := o.get('data', {}).get('text/markdown'):
                    o['data']['text/markdown'] = re.sub(r'\A---\n', '', ''.join(md))
        cells.append(c)
    if docname == app.config.root_doc: cells.append({'cell_type': 'markdown', 'metadata': {}, 'source': TOCTREE})
    nb['cells'] = [{**c, 'id': f'cell-{i}'} for i, c in enumerate(cells)]   # nbdev drops cell ids
    source[0] = json.dumps(nb)


def local_links(app, doctree, docname):
    "doctree-resolved hook: nbdev links symbols to `{doc_host}{doc_baseurl}core.html#sym`; point them at this site."
    site = _ini['doc_host'] + _ini['doc_baseurl']
    pages = {_nbpath2html(app.env.doc2path(d, False)).as_posix(): d for d in app.env.found_docs}
    for node in doctree.findall(reference):
        if not node.get('refuri', '').startswith(site): continue
        page, _, anchor = node['refuri'][len(site):].partition('#')
        if page not in pages:
            logging.getLogger(__name__).warning(f"link to unknown page {node['refuri']}", location=node)
            continue
        node['refuri'] = app.builder.get_relative_uri(docname, pages[page]) + ('#' + make_id(anchor) if anchor else '')


def outputs_dir(app):
    "myst-nb writes output images to `_docs/../jupyter_execute`; keep them beside the doctrees instead (in `_proc/`)."
    app.env.mystnb_config = app.env.mystnb_config.copy(output_folder=str(Path(app.doctreedir)/'jupyter_execute'))


def setup(app):
    app.connect('builder-inited', outputs_dir, priority=900)  # after myst-nb's own builder-inited
    app.connect('source-read', adapt)
    app.connect('doctree-resolved', local_links)
