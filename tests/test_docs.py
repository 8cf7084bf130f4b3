"""Browser test of the docs site: build `_docs/` if stale (`.ci/docs`), then open every page in headless Chromium, offline."""
import json, os, re, subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT/'_docs'
SHOTS = DOCS/'_screenshots'
CHROMIUM = '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync']
NEED = 'apt-get install -y chromium (Debian) and pip install playwright; never `playwright install`'


def _stale():
    idx = DOCS/'index.html'
    srcs = [*(ROOT/'nbs').rglob('*.ipynb'), ROOT/'nbs'/'conf.py', *(ROOT/'nbs'/'_static').rglob('*')]
    return not idx.exists() or any(p.stat().st_mtime > idx.stat().st_mtime for p in srcs)


def _pages():
    "Every html page of the site (not the theme's templates under `_static/`, nor `_sources/`)."
    return sorted(p for p in DOCS.rglob('*.html') if not any(s.startswith(('_', '.')) for s in p.relative_to(DOCS).parts[:-1]))


def _has_math(page):
    "Does the page's source notebook have `$...$` math in a markdown cell?"
    src = DOCS/'_sources'/page.relative_to(DOCS).with_suffix('.ipynb')
    if not src.exists(): return False
    md = ''.join(''.join(c['source']) for c in json.loads(src.read_text())['cells'] if c['cell_type'] == 'markdown')
    return bool(re.search(r'\$[^$\n]+\$', md))


PAGE_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const main = (document.querySelector('article') || document.body).cloneNode(true);
  main.querySelectorAll('pre, code, script, style, mjx-container').forEach(e => e.remove());
  return {
    mjx: document.querySelectorAll('mjx-container').length,
    unrendered: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length,
    merror: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    raw_tex: ['$', '\\\\(', '\\\\['].map(s => main.textContent.indexOf(s)).filter(i => i >= 0)
               .map(i => main.textContent.slice(Math.max(0, i - 40), i + 40).replace(/\\s+/g, ' ')),
    broken_imgs: [...document.images].filter(i => !i.complete || !i.naturalWidth).map(i => i.getAttribute('src')),
    plots: document.querySelectorAll('.cell_output img').length,
    show_docs: document.querySelectorAll('.tag_show-doc pre').length,
    urls: [...document.querySelectorAll('[href], [src]')].map(e => e.getAttribute('href') ?? e.getAttribute('src')),
  };
}"""


@pytest.fixture(scope='module')
def site():
    "Visit every page once; returns {page: report}."
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        msg = f'needs {CHROMIUM} and python playwright: {NEED}'
        if os.environ.get('CI'): pytest.fail(msg)
        pytest.skip(msg)
    if _stale():
        r = subprocess.run([str(ROOT/'.ci'/'docs')], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f'.ci/docs failed:\n{r.stdout}\n{r.stderr}'
    pages = _pages()
    SHOTS.mkdir(exist_ok=True)
    nb_pages = [p for p in pages if re.match(r'\d', p.name)] or pages
    shot = next((p for p in nb_pages if all(s in p.read_text() for s in ('tag_show-doc', '<img', 'class="math'))), nb_pages[0])
    shots = {DOCS/'index.html': 'index.png', shot: 'notebook.png'}
    res = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900}, service_workers='block')
        ctx.route('**/*', lambda route: route.continue_() if route.request.url.startswith('file:') else route.abort())
        for p in pages:
            r = res[p] = {'net': [], 'errors': []}
            page = ctx.new_page()
            page.on('request', lambda q, r=r: None if q.url.startswith(('file:', 'data:', 'blob:', 'about:')) else r['net'].append(q.url))
            page.on('console', lambda m, r=r: r['errors'].append(f'console: {m.text}') if m.type == 'error' else None)
            page.on('pageerror', lambda e, r=r: r['errors'].append(f'pageerror: {e}'))
            page.goto(p.as_uri(), wait_until='load')
            r.update(page.evaluate(PAGE_JS))
            if p in shots:  # full page: grow the viewport first (a resize during capture misplaces the sticky sidebar)
                page.set_viewport_size({'width': 1280, 'height': page.evaluate('document.documentElement.scrollHeight')})
                page.screenshot(path=SHOTS/shots[p], full_page=True)
            page.close()
        browser.close()
    return res


def _rel(p): return str(p.relative_to(DOCS))


def test_pages(site):
    assert DOCS/'index.html' in site and len(site) > 1, sorted(map(_rel, site))


def test_no_network(site):
    bad = {_rel(p): r['net'] for p, r in site.items() if r['net']}
    assert not bad, f'pages requested non-file URLs: {bad}'


def test_no_errors(site):
    bad = {_rel(p): r['errors'] for p, r in site.items() if r['errors']}
    assert not bad, f'console/page errors: {bad}'


def test_math_rendered(site):
    bad = {_rel(p): {k: r[k] for k in ('mjx', 'unrendered', 'merror', 'raw_tex')} for p, r in site.items()
           if r['unrendered'] or r['merror'] or r['raw_tex'] or (_has_math(p) and not r['mjx'])}
    assert not bad, f'math not rendered by MathJax: {bad}'
    assert any(map(_has_math, site)), 'no page source with $math$ found: is _docs/_sources/*.ipynb still there?'


def test_plots_and_api_docs(site):
    bad = {_rel(p): r['broken_imgs'] for p, r in site.items() if r['broken_imgs']}
    assert not bad, f'images that did not load: {bad}'
    assert sum(r['plots'] for r in site.values()), 'no plot (image output) on any page'
    assert sum(r['show_docs'] for r in site.values()), 'no show_doc API signature on any page'


def test_internal_links(site):
    ids, bad = {}, []
    def ids_of(f):
        if f not in ids: ids[f] = set(re.findall(r'\b(?:id|name)="([^"]+)"', f.read_text(errors='replace')))
        return ids[f]
    for p, r in site.items():
        for url in set(r['urls']):
            u = urlsplit(url)
            if u.scheme or url.startswith('//'): continue      # external links are not followed (and never loaded)
            f = (p.parent/unquote(u.path)).resolve() if u.path else p
            if f.is_dir(): f = f/'index.html'
            if not f.exists(): bad.append(f'{_rel(p)}: {url} (no such file)')
            elif u.fragment and f.suffix == '.html' and unquote(u.fragment) not in ids_of(f):
                bad.append(f'{_rel(p)}: {url} (no such anchor)')
    assert not bad, 'broken internal links:\n' + '\n'.join(sorted(bad))


def test_screenshots(site):
    for n in ('index.png', 'notebook.png'): assert (SHOTS/n).stat().st_size > 10_000, n
