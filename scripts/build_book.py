"""Build the lessons into a static site: execute the notebooks, then ``mkdocs build`` (mkdocs-jupyter).

``make book`` runs ``python scripts/build_book.py``. By default the book is the **student
version**: the notebooks of the course release (``scripts/make_course.py``, every exercise
solution replaced by a stub), written afresh into ``build/book/release/``; ``--teacher`` builds
from ``notebooks/`` with the solutions. Every notebook is executed top to bottom (nbclient, in
``notebooks/``, so checkpoints are reused from ``runs/`` as in JupyterLab) into
``build/book/lessons/``, with the values of the parameters cell given on the command line
injected right after it (as papermill does); then mkdocs renders them, figures inline as PNG
data, into ``build/book/site/`` (open ``index.html``; no server and no network needed). Math is
typeset by the MathJax 2.7 that the PyPI package ``jupyter-server-mathjax`` ships, copied into
``site/mathjax/``; no page loads anything from the network. The wall and CPU time of each
notebook (kernel included), and the machine's load average, go to ``build/book/timings.json``.

    python scripts/build_book.py                      # full mode, demo data, student version
    python scripts/build_book.py --teacher            # the same with the exercise solutions
    python scripts/build_book.py --smoke              # tiny data, seconds per notebook
    python scripts/build_book.py --only 01 03 --data-dir /data/f30k --runs-dir runs
    python scripts/build_book.py --no-execute         # render the executed copies already there
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PARAMETER_NAMES = ("data_dir", "runs_dir", "device", "preset")
#: MathJax 2.7 from the ``jupyter-server-mathjax`` package, copied to ``site/<MATHJAX_DIR>``. The
#: pages sit at the site's root (``use_directory_urls: false``), so the URL is relative to them.
#: ``-full`` bundles the TeX input and the HTML-CSS output (STIX web fonts, shipped too).
MATHJAX_DIR = "mathjax"
MATHJAX_URL = f"{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe,local/userlab"
#: ``config/local/userlab.js``: the package ships the STIX web fonts only (MathJax's default, TeX,
#: is missing), so the HTML-CSS output is told to use them and to look for no other font.
MATHJAX_LOCAL_CONFIG = """\
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}});
MathJax.Ajax.loadComplete("[MathJax]/config/local/userlab.js");
"""
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "[an interactive widget: it needs a running kernel; open the notebook in JupyterLab]"
_PROGRESS_METER = re.compile(r"\d+%\|")

MKDOCS_YML = """\
site_name: userlab lessons
site_description: USER and DBL for image-text retrieval, step by step (executed notebooks)
docs_dir: lessons
site_dir: site
use_directory_urls: false
theme:
  name: material
  font: false          # no web fonts: the site works offline
nav:
{nav}
plugins:
  - mkdocs-jupyter:
      execute: false       # executed by build_book.py, with its parameters
      include_source: true
      include_requirejs: false
      ignore_h1_titles: true
      custom_mathjax_url: "{mathjax_url}"   # the local copy; the default is a CDN
"""


def notebook_paths(only: Optional[Sequence[str]] = None) -> list[Path]:
    """The lesson notebooks in order; ``only`` keeps those whose name starts with one of them."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook matches {list(only)} in {NOTEBOOKS}")
    return paths


def student_notebooks(build: Path) -> Path:
    """Write the course release (solutions stubbed, ``scripts/make_course.py``) into
    ``build/release`` afresh; returns its notebook folder."""
    spec = importlib.util.spec_from_file_location("make_course", ROOT / "scripts" / "make_course.py")
    make_course = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_course)
    release = build / "release"
    make_course.build_release(release, NOTEBOOKS)
    return release / "notebooks"


def mathjax_folder() -> Path:
    """The MathJax 2.7 tree that ``jupyter-server-mathjax`` ships (``MathJax.js``, ``jax/``, ``fonts/`` ...)."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or spec.origin is None:
        raise SystemExit("math needs the package jupyter-server-mathjax (pip install 'userlab[book]')")
    folder = Path(spec.origin).parent / "static"
    if not (folder / "MathJax.js").is_file():
        raise SystemExit(f"jupyter-server-mathjax has no MathJax.js in {folder}")
    return folder


_NETWORK_SRC = re.compile(r'<(?:script|img|link|iframe)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"', re.I)
#: nbconvert's loader of mermaid.js (from a CDN, URL not configurable); it loads nothing on a page
#: without a diagram, and no lesson draws one, so the book drops it from such pages.
_MERMAID_LOADER = re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>\s*', re.S)
_SCRIPT = re.compile(r"<script\b[^>]*>(.*?)</script>", re.I | re.S)
_URL = re.compile(r"""["'](?:https?:)?//(?!www\.w3\.org/)[^"'\s]+["']""")   # w3.org: SVG's DTD name, never fetched


def network_references(site: Path) -> list[str]:
    """``page: what`` for every script, image, stylesheet or frame of the site's pages that a
    browser would fetch from the network, and every URL an inline script of a page names (none
    may be left: the book works offline)."""
    found = []
    for page in sorted(site.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        found += [f"{page.name}: {m.group(0)[:160]}" for m in _NETWORK_SRC.finditer(text)]
        found += [f"{page.name}: script names {u}" for body in _SCRIPT.findall(text) for u in _URL.findall(body)]
    return found


def inject_parameters(nb, **values) -> bool:
    """Insert ``name = value`` lines after the cell tagged ``parameters`` (papermill's way).

    Returns:
        False when no value is given (nothing inserted). Raises ValueError if values are given
        but the notebook has no ``parameters`` cell.
    """
    import nbformat
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return False
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])),
                 None)
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    source = "# Parameters injected by scripts/build_book.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return True


def executed_edition(path: Path) -> Optional[str]:
    """``"student"`` / ``"teacher"``: which notebooks an executed copy was made from (None if unmarked)."""
    import nbformat
    return nbformat.read(path, as_version=4).metadata.get("userlab_book", {}).get("edition")


def static_widgets(nb) -> int:
    """Make an executed notebook's widget outputs static: the book has no kernel, and the widget
    manager nbconvert would load comes from a CDN. A progress bar (tqdm) is dropped; any other
    widget shows :data:`WIDGET_NOTE`. The saved widget state goes too. Returns how many outputs
    changed."""
    changed = 0
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                changed += 1
                if _PROGRESS_METER.search(str(data.get("text/plain", ""))):
                    continue
                out["data"] = {"text/plain": WIDGET_NOTE}
            kept.append(out)
        cell["outputs"] = kept
    return changed


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the kernels)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def execute(path: Path, out: Path, smoke: bool, params: dict, timeout: int,
            edition: str = "student") -> tuple[float, float]:
    """Execute notebook ``path`` into ``out`` (marked with its ``edition``); returns its wall
    time and CPU time in seconds (the CPU time, kernel included, does not grow when other
    programs share the cores)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    nb.metadata["userlab_book"] = {"edition": edition}
    inject_parameters(nb, **params)
    env_before = dict(os.environ)
    os.environ["USERLAB_SMOKE"] = "1" if smoke else "0"
    # the book needs inline figures, whatever backend the calling process chose (tests pick Agg)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    started, cpu = time.perf_counter(), _cpu_seconds()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    static_widgets(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds, cpu


_EDITION_WORDS = {
    "student": "the student version: each exercise solution is replaced by a stub, as in the course"
               " release (`make course`), so the exercise checks report \"not implemented\";"
               " `scripts/build_book.py --teacher` builds the version with the solutions",
    "teacher": "the teacher's version, with the exercise solutions (the default build is the"
               " student version, solutions removed)",
}


def write_index(lessons: Path, paths: Sequence[Path], timings: dict, smoke: bool, edition: str = "student") -> None:
    rows = "\n".join(f"| [{p.stem}]({p.name}) | {timings.get(p.stem, {}).get('seconds', float('nan')):.0f} s |"
                     for p in paths)
    (lessons / "index.md").write_text(
        "# userlab lessons\n\n"
        "The notebooks of `notebooks/`, executed top to bottom"
        f" ({'smoke mode: tiny data' if smoke else 'full mode'}) by `make book`: {_EDITION_WORDS[edition]}."
        " Every figure is the one the code above it drew. Open a notebook in JupyterLab (`userlab lab`)"
        " to change its parameters and rerun it; the interactive browsers only work there.\n\n"
        "| lesson | time to run (this build) |\n|---|---|\n" + rows + "\n", encoding="utf-8")


def build_site(build: Path, paths: Sequence[Path]) -> Path:
    """Write ``mkdocs.yml``, run ``mkdocs build`` and copy MathJax beside the pages; returns the
    site folder. Fails when a page would still load something from the network."""
    mathjax = mathjax_folder()
    nav = "\n".join(["  - Lessons: index.md"] + [f"  - {p.stem.replace('_', ' ')}: {p.name}" for p in paths])
    (build / "mkdocs.yml").write_text(MKDOCS_YML.format(nav=nav, mathjax_url=MATHJAX_URL), encoding="utf-8")
    site = build / "site"
    shutil.rmtree(site, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                           str(build / "mkdocs.yml")], cwd=build, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build failed:\n{done.stdout}\n{done.stderr}")
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        if _MERMAID_LOADER.search(text) and 'class="jp-Mermaid' not in text:   # no diagram on the page
            page.write_text(_MERMAID_LOADER.sub("", text), encoding="utf-8")
    shutil.copytree(mathjax, site / MATHJAX_DIR, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (site / MATHJAX_DIR / "config" / "local").mkdir(parents=True, exist_ok=True)
    (site / MATHJAX_DIR / "config" / "local" / "userlab.js").write_text(MATHJAX_LOCAL_CONFIG, encoding="utf-8")
    remote = network_references(site)
    if remote:
        raise SystemExit("the book would load from the network:\n" + "\n".join(remote))
    return site


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "build" / "book"), help="build folder")
    p.add_argument("--smoke", action="store_true", help="tiny data and few steps (USERLAB_SMOKE=1)")
    p.add_argument("--only", nargs="+", help="notebooks whose names start with these (e.g. 01 03)")
    p.add_argument("--no-execute", action="store_true", help="render the executed copies in --out")
    p.add_argument("--teacher", action="store_true",
                   help="build from notebooks/ with the exercise solutions (default: the student release)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    for name in PARAMETER_NAMES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=f"the notebooks' {name} parameter")
    args = p.parse_args(argv)
    build = Path(args.out).resolve()
    lessons = build / "lessons"
    edition = "teacher" if args.teacher else "student"
    paths = notebook_paths(args.only)          # which lessons; the student copies have the same names
    timings_path = build / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    params = {name: getattr(args, name) for name in PARAMETER_NAMES}
    if args.no_execute:
        missing = [p.name for p in paths if not (lessons / p.name).is_file()]
        if missing:
            raise SystemExit(f"not executed yet: {', '.join(missing)} (run without --no-execute)")
        other = [p.name for p in paths if executed_edition(lessons / p.name) != edition]
        if other:
            raise SystemExit(f"{', '.join(other)} in {lessons} were not executed as the {edition} version "
                             f"(run without --no-execute{'' if args.teacher else ', or with --teacher'})")
    else:
        lessons.mkdir(parents=True, exist_ok=True)
        sources = NOTEBOOKS if args.teacher else student_notebooks(build)
        for path in paths:
            load = os.getloadavg()[0]
            print(f"executing {path.name} ({edition} version) ...", flush=True)
            seconds, cpu = execute(sources / path.name, lessons / path.name, args.smoke, params, args.timeout,
                                   edition)
            timings[path.stem] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "smoke": args.smoke,
                                  "edition": edition,
                                  "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                                  "cpus": os.cpu_count()}
            print(f"  {seconds:.1f} s wall, {cpu:.1f} s CPU (load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
            build.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    write_index(lessons, paths, timings, args.smoke, edition)
    site = build_site(build, paths)
    print(f"book ({edition} version): {site / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
