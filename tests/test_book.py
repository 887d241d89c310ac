"""``make book``: executed notebooks -> static site (mkdocs-jupyter), figures inline, renders in Chromium.

The build test executes notebook 01 in smoke mode (the build script's ``--smoke --only 01``) into a
temporary folder and checks the site: the default build is the student version (no exercise
solution in any page), ``--teacher`` holds the solutions, and no page names a URL on the network
(MathJax is the local copy). The browser test opens that page from disk in headless Chromium and
checks that every figure decoded and every equation was typeset, with no TeX source left in view
(a broken image and a raw ``$\\gamma$`` planted in the page must be caught, or the checks would
mean nothing). It saves ``figures/book_01_features.png``.
"""
from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"

spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
build_book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_book)
spec = importlib.util.spec_from_file_location("make_course", ROOT / "scripts" / "make_course.py")
make_course = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_course)


def test_parameters_are_injected_after_the_tagged_cell():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# t"),
        nbformat.v4.new_code_cell("data_dir = None\ndevice = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(data_dir, device)")])
    assert build_book.inject_parameters(nb, data_dir=None, device=None) is False and len(nb.cells) == 3
    assert build_book.inject_parameters(nb, data_dir="/data/f30k", device="cpu") is True
    injected = nb.cells[2]
    assert injected.metadata["tags"] == ["injected-parameters"]
    names = {}
    exec(nb.cells[1].source + "\n" + injected.source, {}, names)
    assert names == {"data_dir": "/data/f30k", "device": "cpu"}
    with pytest.raises(ValueError, match="parameters"):
        build_book.inject_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), device="cpu")


def test_notebook_selection():
    assert [p.stem for p in build_book.notebook_paths(["01", "03"])] == ["01_features", "03_evaluate"]
    with pytest.raises(SystemExit, match="no notebook"):
        build_book.notebook_paths(["99"])


def test_widget_outputs_become_static():
    view = {"model_id": "m", "version_major": 2, "version_minor": 0}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("display_data", data={build_book.WIDGET_VIEW: view,
                                                     "text/plain": "demo scenes:  40%|####  | 4/10"}),
        nbformat.v4.new_output("display_data", data={build_book.WIDGET_VIEW: view, "text/plain": "VBox(...)"}),
        nbformat.v4.new_output("stream", name="stdout", text="kept\n")])])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    assert build_book.static_widgets(nb) == 2
    outputs = nb.cells[0].outputs
    assert "widgets" not in nb.metadata          # no widget state: nbconvert loads no widget manager
    assert [o.get("data", {}).get("text/plain") for o in outputs] == [build_book.WIDGET_NOTE, None]
    assert outputs[1].text == "kept\n"           # the progress bar is gone, other outputs stay


def test_network_references_are_found(tmp_path):
    (tmp_path / "ok.html").write_text('<script src="mathjax/MathJax.js"></script><a href="https://x.org">x</a>'
                                      '<script>const ns = "http://www.w3.org/2000/svg";</script>')
    assert build_book.network_references(tmp_path) == []
    (tmp_path / "cdn.html").write_text('<script src="https://cdn.example/m.js"></script>'
                                       '<script>var s = "https://unpkg.example/embed.js";</script>')
    found = build_book.network_references(tmp_path)
    assert len(found) == 2 and all(f.startswith("cdn.html: ") for f in found)
    mermaid = ('<script type="module">\n const m = (await import("https://cdn.example/mermaid.mjs"));\n'
               '</script>\n<p>kept</p>')
    assert build_book._MERMAID_LOADER.sub("", mermaid) == "<p>kept</p>"


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """The default build: the student version."""
    out = tmp_path_factory.mktemp("book")
    assert build_book.main(["--smoke", "--only", "01", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def teacher_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book_teacher")
    assert build_book.main(["--smoke", "--only", "01", "--out", str(out), "--teacher"]) == 0
    return out


def _solution_lines(notebook: Path) -> list[str]:
    """Lines of the notebook's solution blocks that appear nowhere in its student release."""
    release, blocks = make_course.strip_solutions(notebook.read_text(encoding="utf-8"))
    lines = {ln.strip() for block in blocks for ln in block.splitlines() if ln.strip()}
    return sorted(ln for ln in lines if ln not in release)


def _visible_text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.mark.slow
def test_book_builds_with_every_figure_inline(smoke_book):
    site = smoke_book / "site"
    page = (site / "01_features.html").read_text(encoding="utf-8")
    executed = nbformat.read(smoke_book / "lessons" / "01_features.ipynb", as_version=4)
    pngs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert len(pngs) >= 2 and not errors
    inline = re.findall(r'<img[^>]+src="data:image/png;base64,', page)
    assert len(inline) == len(pngs), "every figure of the executed notebook is inline in the page"
    assert not re.search(r'<(img|script)[^>]+src="https?://', page), "the page must not load from the network"
    assert build_book.network_references(site) == [] and not re.search(r"cdnjs|unpkg|jsdelivr", page)
    assert f'<script src="{build_book.MATHJAX_URL}">' in page and (site / "mathjax" / "MathJax.js").is_file()
    assert (site / "mathjax" / "config" / "local" / "userlab.js").is_file()
    assert "Learning goals" in page and r"\lfloor c / 5 \rfloor" in page      # TeX for MathJax to typeset
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="01_features.html"' in index
    timings = json.loads((smoke_book / "timings.json").read_text())
    assert timings["01_features"]["smoke"] is True and timings["01_features"]["seconds"] > 0


@pytest.mark.slow
def test_default_book_is_the_student_version(smoke_book, teacher_book):
    solutions = _solution_lines(ROOT / "notebooks" / "01_features.py")
    assert solutions, "01 has exercise solutions to look for"
    student_files = sorted((smoke_book / "site").glob("*.html")) + sorted((smoke_book / "site").glob("*.ipynb"))
    student = "\n".join(_visible_text(f.read_text(encoding="utf-8")) for f in student_files)
    teacher = _visible_text((teacher_book / "site" / "01_features.html").read_text(encoding="utf-8"))
    assert [ln for ln in solutions if ln in student] == []
    assert [ln for ln in solutions if ln not in teacher] == []
    assert make_course.STUB in student and make_course.BEGIN not in student
    assert make_course.BEGIN in teacher and make_course.STUB not in teacher
    assert "student version" in (smoke_book / "site" / "index.html").read_text(encoding="utf-8")
    assert "teacher" in (teacher_book / "site" / "index.html").read_text(encoding="utf-8")
    assert json.loads((teacher_book / "timings.json").read_text())["01_features"]["edition"] == "teacher"
    # re-rendering must not pass off one version's executed copies as the other's
    with pytest.raises(SystemExit, match="not executed as the teacher version"):
        build_book.main(["--no-execute", "--only", "01", "--out", str(smoke_book), "--teacher"])


_IMAGES_JS = """() => [...document.querySelectorAll('img')].map(i => ({
  inline: i.src.startsWith('data:image/png'), ok: i.complete && i.naturalWidth > 0,
  width: i.getBoundingClientRect().width}))"""


_MATH_DONE_JS = """() => window.MathJax && MathJax.Hub && MathJax.isReady
  && MathJax.Hub.queue.pending === 0 && !MathJax.Hub.queue.running
  && document.querySelectorAll('.MathJax, .MathJax_Display').length > 0"""
_MATH_JS = """() => ({
  version: MathJax.version,
  tex: document.querySelectorAll('script[type^="math/tex"]').length,
  typeset: document.querySelectorAll('span.MathJax[id$="-Frame"]').length,
  errors: document.querySelectorAll('.MathJax_Error, .MathJax merror').length,
  text: [...document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown')].map(e => e.innerText).join('\\n')})"""


def _raw_tex(text: str) -> list[str]:
    """TeX source a reader would see: ``$...$`` spans or TeX commands such as ``\\gamma``."""
    return re.findall(r"\$[^$\n]+\$|\\[a-zA-Z]+", text)


@pytest.mark.browser
@pytest.mark.slow
def test_book_page_renders_its_figures_in_chromium(smoke_book):
    from test_browser import _launch, _require_browser
    _require_browser()
    from playwright.sync_api import sync_playwright
    page_path = smoke_book / "site" / "01_features.html"
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_selector("img", state="attached", timeout=60_000)
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=60_000)
            images = [i for i in page.evaluate(_IMAGES_JS) if i["inline"]]
            assert len(images) >= 2 and all(i["ok"] for i in images), images
            assert all(i["width"] > 200 for i in images), images      # drawn at a readable size
            assert page.locator("h2", has_text="Feature statistics").count() == 1
            page.locator("img[src^='data:image/png']").nth(1).scroll_into_view_if_needed()
            FIGURES.mkdir(exist_ok=True)
            page.screenshot(path=str(FIGURES / "book_01_features.png"))
            # the check must see a broken figure when there is one
            page.evaluate("() => { const i = document.createElement('img');"
                          " i.src = 'data:image/png;base64,AAAA'; document.body.appendChild(i); }")
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=10_000)
            assert not all(i["ok"] for i in page.evaluate(_IMAGES_JS) if i["inline"])
            # math: every TeX snippet of the markdown typeset by the local MathJax, none left as source
            page.wait_for_function(_MATH_DONE_JS, timeout=60_000)
            math = page.evaluate(_MATH_JS)
            assert math["version"].startswith("2.7") and math["tex"] >= 8, math   # 01's equations table
            assert math["typeset"] == math["tex"] and math["errors"] == 0, math
            assert _raw_tex(math["text"]) == [], _raw_tex(math["text"])
            assert [u for u in requests if not u.startswith(("file:", "data:", "about:"))] == []
            page.locator("table").first.scroll_into_view_if_needed()
            page.screenshot(path=str(FIGURES / "book_01_equations.png"))
            # the check must see TeX source when some is left in view
            page.evaluate("() => { const p = document.createElement('p'); p.textContent = 'γ is $\\\\gamma$';"
                          " document.querySelector('.jp-MarkdownCell .jp-RenderedMarkdown').appendChild(p); }")
            assert _raw_tex(page.evaluate(_MATH_JS)["text"]) == ["$\\gamma$"]
        finally:
            browser.close()
