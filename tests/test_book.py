"""``make book``: executed notebooks -> static site (mkdocs-jupyter), figures inline, renders in Chromium.

The build test executes notebook 01 in smoke mode (the build script's ``--smoke --only 01``) into a
temporary folder and checks the site; the browser test opens that page from disk in headless
Chromium and checks that every figure decoded (a broken image planted in the page must be caught,
or the check would mean nothing). It saves ``figures/book_01_features.png``.
"""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    assert build_book.main(["--smoke", "--only", "01", "--out", str(out)]) == 0
    return out


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
    assert "Learning goals" in page
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="01_features.html"' in index
    timings = json.loads((smoke_book / "timings.json").read_text())
    assert timings["01_features"]["smoke"] is True and timings["01_features"]["seconds"] > 0


_IMAGES_JS = """() => [...document.querySelectorAll('img')].map(i => ({
  inline: i.src.startsWith('data:image/png'), ok: i.complete && i.naturalWidth > 0,
  width: i.getBoundingClientRect().width}))"""


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
        finally:
            browser.close()
