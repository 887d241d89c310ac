"""The retrieval browser driven in a real JupyterLab (headless Chromium via Playwright).

A two-cell notebook builds a :class:`userlab.widgets.RetrievalBrowser` over random scores of
1000 images x 5000 captions (no training, seconds) with a caption encoder that fails on purpose.
The test then works the widget as a person would and checks what comes back from the kernel:

- typing a caption index into the number box shows that caption's top images (status line and
  a new picture);
- an arrow key on the image slider steps to the next image;
- the picture is shown at its own size (CSS width = PNG width / 2, aspect ratio kept);
- typing a caption, whose encoding raises, shows the error and its traceback inside the widget.

Screenshots go to ``figures/browser_retrieval_*.png``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time

import pytest

from test_browser import (FIGURES, ROOT, _launch, _open_with_kernel, _require_browser, _run_all_cells,
                          _wait_for_run, _write_lab_settings)
from userlab.lab import start_lab

SETUP = """\
from types import SimpleNamespace
import numpy as np
from userlab.widgets import RetrievalBrowser

rng = np.random.default_rng(0)
sims = rng.uniform(size=(1000, 5000))
data = SimpleNamespace(captions=[f"caption number {c}" for c in range(5000)], image_paths=None)

def encode(text):
    raise RuntimeError("encoder offline: " + text)

browser = RetrievalBrowser(sims, data, encode_caption=encode, image_embeddings=np.ones((1000, 4)))
"""


def _notebook(cells: list[str]) -> dict:
    return {"cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "outputs": [], "execution_count": None,
                       "source": src} for i, src in enumerate(cells)],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def lab_root():
    parent = ROOT / "runs" / "browser"
    parent.mkdir(parents=True, exist_ok=True)
    box = tempfile.mkdtemp(prefix="retrieval-", dir=parent)
    from pathlib import Path
    box = Path(box)
    _write_lab_settings(box / ".lab" / "settings")
    yield box
    shutil.rmtree(box, ignore_errors=True)


def _status(view) -> str:
    return view.locator(".widget-html-content").first.text_content()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retrieval_browser_answers_in_jupyterlab(lab_root):
    _require_browser()
    from playwright.sync_api import sync_playwright

    name = "retrieval.ipynb"
    (lab_root / name).write_text(json.dumps(_notebook([SETUP, "browser.widget"])))
    env = {"MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT),
           "JUPYTERLAB_SETTINGS_DIR": str(lab_root / ".lab" / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(lab_root / ".lab" / "workspaces")}
    FIGURES.mkdir(exist_ok=True)
    with start_lab(lab_root, env=env) as lab, sync_playwright() as p:
        lab.wait_ready(timeout=180)
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(120_000)
            panel = _open_with_kernel(page, lab, name)
            _run_all_cells(page)
            state = _wait_for_run(page, lab, name, panel, timeout_s=300)
            assert not state["errors"], state["errors"]

            view = page.locator(panel).locator(".jp-OutputArea-output").filter(has=page.locator("img.widget-image"))
            view.first.wait_for(timeout=60_000)
            image = view.locator("img.widget-image")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            assert _status(view).startswith("image 0: top-5 captions")

            # fixed size: shown at half its pixel width (a 2x PNG), aspect ratio kept, not stretched
            size = image.evaluate("i => ({nw: i.naturalWidth, nh: i.naturalHeight, "
                                  "w: i.getBoundingClientRect().width, h: i.getBoundingClientRect().height, "
                                  "box: i.parentElement.getBoundingClientRect().width})")
            assert abs(size["w"] - size["nw"] / 2) <= 1, size
            assert abs(size["h"] / size["w"] - size["nh"] / size["nw"]) < 0.01, size
            assert size["w"] < size["box"], size

            # the number box: caption 4321 -> its top images
            before = image.get_attribute("src")
            box = view.locator("input[type=number]")
            box.fill("4321")
            box.press("Enter")
            page.wait_for_function("([el]) => el.textContent.includes('caption 4321: top-5 images')",
                                   arg=[view.element_handle()], timeout=60_000)
            page.wait_for_function("([img, old]) => img.getAttribute('src') !== old",
                                   arg=[image.element_handle(), before], timeout=60_000)
            page.screenshot(path=str(FIGURES / "browser_retrieval_caption.png"))

            # an arrow key on the image slider: image 1, mode back to image -> captions
            view.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([el]) => el.textContent.includes('image 1: top-5 captions')",
                                   arg=[view.element_handle()], timeout=60_000)

            # an error raised by the caption encoder appears in the widget, with its traceback
            text = view.locator("input[type=text]")
            text.fill("a dog on a beach")
            text.press("Enter")
            page.wait_for_function("([el]) => el.textContent.includes('RuntimeError: encoder offline: a dog on a beach')",
                                   arg=[view.element_handle()], timeout=60_000)
            assert view.locator("details summary", has_text="traceback").count() == 1
            view.locator("details summary").click()
            assert "raise RuntimeError" in view.locator("details pre").text_content()
            page.screenshot(path=str(FIGURES / "browser_retrieval_error.png"))
        finally:
            browser.close()
