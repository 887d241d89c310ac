"""JupyterLab launcher (``userlab.lab``) and notebook 04 run in a real browser.

The first tests start a JupyterLab server and check, without a browser, that it listens on
127.0.0.1 only and refuses requests without its token. The browser test opens a copy of
``notebooks/04_attention_and_margins.ipynb`` in headless Chromium (driven by Playwright), runs
every cell from the Run menu in smoke mode, and checks that no cell failed and that the three
interactive browsers rendered and answer a slider move; it saves screenshots to ``figures/``.

Chromium comes from Debian (``bash scripts/setup_browser.sh``); the test fails when it is missing,
unless ``USERLAB_SKIP_BROWSER=1`` is set outside CI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from userlab import lab as lab_module
from userlab.errors import DataError
from userlab.lab import HOST, LabError, LabServer, lab_command, start_lab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_attention_and_margins.ipynb"
FIGURES = ROOT / "figures"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
RUN_TIMEOUT_S = 15 * 60


# --------------------------------------------------------------------------- launcher, no browser

def _get(url: str) -> tuple[int, str, bytes]:
    """(status, final URL after redirects, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.url, response.read()
    except urllib.error.HTTPError as err:
        return err.code, url, err.read()


def _listening_addresses(port: int) -> list[str]:
    """Addresses with a TCP socket in LISTEN state on ``port``, read from the kernel's tables."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            ip_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(ip_hex)
            # the table prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("labroot")
    (root / "hello.txt").write_text("hi\n")
    with start_lab(root) as lab:
        lab.wait_ready(timeout=120)
        yield lab
    assert not lab.running(), "stop() left the server running"


def test_lab_listens_on_loopback_only(running_lab):
    assert running_lab.base_url == f"http://127.0.0.1:{running_lab.port}"
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert _listening_addresses(running_lab.port) == ["127.0.0.1"]


def test_lab_refuses_requests_without_the_right_token(running_lab):
    for endpoint in ("api/status", "api/contents"):
        assert _get(running_lab.api_url(endpoint, token=False))[0] == 403, endpoint
        assert _get(running_lab.api_url(endpoint, token=False) + "?token=wrong" + running_lab.token)[0] == 403
    # the page itself sends a browser without the token to the login form
    status, final_url, _ = _get(running_lab.base_url + "/lab/tree/hello.txt")
    assert "/login" in final_url, (status, final_url)


def test_lab_answers_with_the_token(running_lab):
    status, _, body = _get(running_lab.api_url("api/status"))
    assert status == 200 and "started" in json.loads(body)
    status, _, body = _get(running_lab.api_url("api/contents"))
    assert status == 200
    assert [item["name"] for item in json.loads(body)["content"]] == ["hello.txt"]
    status, final_url, _ = _get(running_lab.url("hello.txt"))
    assert status == 200 and "/login" not in final_url


def test_lab_url_and_token():
    server = LabServer(Path("/x"), 8123, "abc", process=None, log_path=Path("/nonexistent"))
    assert server.url("sub dir/n.ipynb") == "http://127.0.0.1:8123/lab/tree/sub%20dir/n.ipynb?token=abc"
    assert server.url() == "http://127.0.0.1:8123/lab?token=abc"


def test_lab_command_is_local_quiet_and_root_aware(monkeypatch, tmp_path):
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 1000)
    cmd = lab_command(tmp_path, 8123)
    assert f"--ServerApp.ip={HOST}" in cmd and "--ServerApp.port=8123" in cmd
    assert "--no-browser" in cmd
    assert not any("token" in arg.lower() for arg in cmd)  # the token travels in the environment
    assert "--LabApp.news_url=None" in cmd and "--allow-root" not in cmd
    assert not any("disable_check_xsrf" in arg for arg in cmd)
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 0)
    assert "--allow-root" in lab_command(tmp_path, 8123)


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                pass  # exited meanwhile
    return out


def test_lab_token_is_in_no_process_command_line(running_lab):
    """The token reaches the server through its environment: no process on the machine shows it
    in its argv (what ``ps`` shows every local user), while the server does accept it."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("no /proc to read command lines from")
    assert running_lab.running() and len(running_lab.token) >= 32
    cmdlines = _cmdlines()
    assert running_lab.process.pid in cmdlines and "jupyter" in cmdlines[running_lab.process.pid]
    assert [pid for pid, line in cmdlines.items() if running_lab.token in line] == []
    environ = Path(f"/proc/{running_lab.process.pid}/environ").read_bytes().split(b"\0")
    assert f"JUPYTER_TOKEN={running_lab.token}".encode() in environ
    assert _get(running_lab.api_url("api/status"))[0] == 200  # the environment token is the one in force


def test_start_lab_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="missing"):
        start_lab(tmp_path / "missing")
    with pytest.raises(LabError, match="token"):
        start_lab(tmp_path, token="")


def test_wait_ready_reports_a_server_that_died(tmp_path):
    # a port already taken makes jupyter exit (port_retries=0): wait_ready must say so, with the log
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        with start_lab(tmp_path, port=taken.getsockname()[1]) as lab:
            with pytest.raises(LabError, match="exited"):
                lab.wait_ready(timeout=120)


# --------------------------------------------------------------------------- notebook 04 in Chromium

def _require_browser():
    """Fail (not skip) when Chromium or Playwright is missing, unless skipping was asked for."""
    if not os.environ.get("CI") and os.environ.get("USERLAB_SKIP_BROWSER") == "1":
        pytest.skip("USERLAB_SKIP_BROWSER=1 (outside CI)")
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup_browser.sh` (installs Debian's chromium), "
                    "or set USERLAB_SKIP_BROWSER=1 to skip this test outside CI", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: run `make install`", pytrace=False)


def test_missing_chromium_fails_unless_skipping_is_asked_for(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("USERLAB_SKIP_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="setup_browser.sh"):
        _require_browser()
    monkeypatch.setenv("USERLAB_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception):
        _require_browser()
    monkeypatch.setenv("CI", "true")   # CI never skips
    with pytest.raises(pytest.fail.Exception, match="setup_browser.sh"):
        _require_browser()


def _write_lab_settings(folder: Path) -> None:
    """JupyterLab user settings for the test: every cell in the DOM, no autosave, no news toast."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                            "checkForUpdates": False},
    }
    for name, values in settings.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture
def sandbox():
    """A git-ignored folder inside the repository that looks like a project root to the notebook.

    ``userlab.notebook.repo_root()`` walks up to the first folder with ``pyproject.toml`` and
    ``userlab/``; the marker files make it stop here, so the notebook's runs and figures land in
    the sandbox (fresh runs every time, never the ones nbmake or a person made) while the cached
    demo data is shared through a link to the repository's ``data/``.
    """
    parent = ROOT / "runs" / "browser"
    parent.mkdir(parents=True, exist_ok=True)
    box = Path(tempfile.mkdtemp(prefix="nb04-", dir=parent))
    (box / "pyproject.toml").write_text("# marker: userlab.notebook.repo_root() stops here\n")
    (box / "userlab").symlink_to(ROOT / "userlab", target_is_directory=True)
    (ROOT / "data").mkdir(exist_ok=True)
    (box / "data").symlink_to(ROOT / "data", target_is_directory=True)
    _write_lab_settings(box / ".lab" / "settings")
    yield box
    shutil.rmtree(box, ignore_errors=True)


_PANEL_ID_JS = """name => {
  const tab = [...document.querySelectorAll('.lm-DockPanel-tabBar .lm-TabBar-tab')]
    .find(t => (t.querySelector('.lm-TabBar-tabLabel') || {}).textContent === name);
  return tab ? tab.dataset.id : null;
}"""

# prompts of the notebook's code cells, and outputs that show a Python error
_CELL_STATE_JS = """panel => {
  const root = document.querySelector(panel);
  const cells = root ? [...root.querySelectorAll('.jp-Notebook .jp-CodeCell')] : [];
  const prompts = cells.map(c => ((c.querySelector('.jp-InputPrompt') || {}).textContent || '').trim());
  const errors = (root ? [...root.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], ' +
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"], ' +
      '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')] : [])
    .map(e => e.textContent)
    .filter(t => /Traceback|\\b\\w*(Error|Exception): /.test(t));
  return {prompts, errors};
}"""


def _kernel_state(lab: LabServer, notebook_name: str) -> str | None:
    """Execution state of the notebook's kernel from the sessions API (None: no kernel yet)."""
    status, _, body = _get(lab.api_url("api/sessions"))
    if status != 200:
        return None
    for session in json.loads(body):
        if session.get("path", "").endswith(notebook_name) and session.get("kernel"):
            return session["kernel"].get("execution_state")
    return None


def _open_with_kernel(page, lab: LabServer, notebook_name: str, timeout_s: float = 180) -> str:
    """Open the notebook and wait until its kernel is started and idle (accepting the kernel dialog).

    Returns:
        CSS selector of the notebook's panel (other open notebooks stay in the page, hidden).
    """
    page.goto(lab.url(notebook_name))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while _kernel_state(lab, notebook_name) != "idle":
        dialog = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if dialog.count() and dialog.first.is_visible():
            dialog.first.click()  # "Select Kernel" -> the notebook's own kernel (Python 3)
        assert time.monotonic() < deadline, f"no idle kernel for {notebook_name} after {timeout_s:.0f} s"
        time.sleep(0.5)
    panel_id = page.evaluate(_PANEL_ID_JS, notebook_name)
    assert panel_id, f"no JupyterLab tab titled {notebook_name}"
    return f'[id="{panel_id}"]'


def _run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def _wait_for_run(page, lab: LabServer, notebook_name: str, panel: str, timeout_s: float) -> dict:
    """Poll the cells until all have an execution count, or a cell shows an error (then return early).

    Raises:
        AssertionError: time is up, or nothing runs any more (kernel idle, no ``[*]`` cell) while
            some cells have no execution count.
    """
    deadline = time.monotonic() + timeout_s
    stalled = 0
    while True:
        state = page.evaluate(_CELL_STATE_JS, panel)
        done = state["prompts"] and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])
        if done or state["errors"]:
            return state
        queued = any(p == "[*]:" for p in state["prompts"])
        stalled = 0 if queued or _kernel_state(lab, notebook_name) != "idle" else stalled + 1
        if stalled >= 10:
            raise AssertionError(f"{notebook_name}: kernel idle and nothing queued, but not every cell ran: "
                                 f"{state['prompts']}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{notebook_name}: cells still not all executed after {timeout_s:.0f} s: "
                                 f"{state['prompts']}")
        time.sleep(2)


def _launch(p):
    args = CHROMIUM_ARGS + ["--headless=new"]
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_notebook04_runs_in_jupyterlab(sandbox):
    _require_browser()
    from playwright.sync_api import sync_playwright

    shutil.copy(NOTEBOOK, sandbox / NOTEBOOK.name)
    # the error detector must see an error when there is one, or a pass would mean nothing
    broken = {"cells": [{"cell_type": "code", "id": "c0", "metadata": {}, "outputs": [], "execution_count": None,
                         "source": "print('ok')"},
                        {"cell_type": "code", "id": "c1", "metadata": {}, "outputs": [], "execution_count": None,
                         "source": "1 / 0"}],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
    (sandbox / "broken.ipynb").write_text(json.dumps(broken))
    env = {"USERLAB_SMOKE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(sandbox / ".lab" / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(sandbox / ".lab" / "workspaces")}
    FIGURES.mkdir(exist_ok=True)
    started = time.monotonic()

    with start_lab(sandbox, env=env) as lab, sync_playwright() as p:
        lab.wait_ready(timeout=180)
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)

            panel = _open_with_kernel(page, lab, NOTEBOOK.name)
            run_started = time.monotonic()
            _run_all_cells(page)
            state = _wait_for_run(page, lab, NOTEBOOK.name, panel, timeout_s=RUN_TIMEOUT_S)
            if state["errors"]:
                page.screenshot(path=str(FIGURES / "browser_notebook04_error.png"))
            assert not state["errors"], "a cell failed in the browser:\n" + "\n---\n".join(state["errors"])
            run_s = time.monotonic() - run_started

            # The three browsers (retrieval, attention, margins) are widget views: Lumino panels in
            # the output area, without data-mime-type. tqdm's progress bars are widgets too, so
            # pick the outputs that hold a figure image; they render a moment after the cell ends.
            outputs = page.locator(panel).locator(".jp-OutputArea-output")
            views = outputs.filter(has=page.locator("img.widget-image"))
            deadline = time.monotonic() + 60
            while views.count() < 3 and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            kinds = outputs.evaluate_all("els => els.map(e => (e.getAttribute('data-mime-type') || '') + ' ' + "
                                         "e.className)")
            assert views.count() == 3, f"expected 3 widget outputs with a figure, got {views.count()}: {kinds}"
            for i in range(3):
                view = views.nth(i)
                assert "Error displaying widget" not in view.text_content()
                page.wait_for_function(
                    "el => [...el.querySelectorAll('img.widget-image')].some(i => i.complete && i.naturalWidth > 0)",
                    arg=view.element_handle(), timeout=60_000)
            assert views.nth(0).locator(".widget-slider").count() == 3   # image, caption, top k
            assert views.nth(1).locator(".widget-slider").count() == 1   # image
            assert views.nth(2).locator(".widget-slider").count() >= 1   # epoch (+ threshold)

            # a slider move travels to the kernel and comes back as a new figure and caption
            retrieval = views.nth(0)
            image = retrieval.locator("img.widget-image").first
            before = image.get_attribute("src")
            assert "image 0:" in retrieval.text_content()
            retrieval.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([img, old]) => img.getAttribute('src') !== old",
                                   arg=[image.element_handle(), before], timeout=60_000)
            page.wait_for_function("el => el.textContent.includes('image 1:')",
                                   arg=retrieval.element_handle(), timeout=60_000)

            retrieval.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(FIGURES / "browser_notebook04.png"))
            page.set_viewport_size({"width": 1400, "height": 2600})
            views.nth(1).scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(FIGURES / "browser_notebook04_tall.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})

            panel = _open_with_kernel(page, lab, "broken.ipynb")
            _run_all_cells(page)
            state = _wait_for_run(page, lab, "broken.ipynb", panel, timeout_s=180)
            assert any("ZeroDivisionError" in e for e in state["errors"]), \
                f"the error detector missed a ZeroDivisionError: {state}"
        finally:
            browser.close()
    # nothing was saved from the browser: the notebook ran as a copy, the original stays stripped
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert all(c.get("outputs", []) == [] for c in raw["cells"] if c["cell_type"] == "code")
    print(f"notebook 04: Run All Cells took {run_s:.0f} s (whole test {time.monotonic() - started:.0f} s)")
