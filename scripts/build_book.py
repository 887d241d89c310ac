"""Build the lessons into a static site: execute the notebooks, then ``mkdocs build`` (mkdocs-jupyter).

``make book`` runs ``python scripts/build_book.py``: every ``notebooks/NN_*.ipynb`` is executed top
to bottom (nbclient, in ``notebooks/``, so checkpoints are reused from ``runs/`` as in JupyterLab)
into ``build/book/lessons/``, with the values of the parameters cell given on the command line
injected right after it (as papermill does); then mkdocs renders them, figures inline as PNG
data, into ``build/book/site/`` (open ``index.html``; no server and no network needed). The
wall and CPU time of each notebook (kernel included), and the machine's load average, go to
``build/book/timings.json``.

    python scripts/build_book.py                      # full mode, demo data
    python scripts/build_book.py --smoke              # tiny data, seconds per notebook
    python scripts/build_book.py --only 01 03 --data-dir /data/f30k --runs-dir runs
    python scripts/build_book.py --no-execute         # render the executed copies already there
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PARAMETER_NAMES = ("data_dir", "runs_dir", "device")

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
"""


def notebook_paths(only: Optional[Sequence[str]] = None) -> list[Path]:
    """The lesson notebooks in order; ``only`` keeps those whose name starts with one of them."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook matches {list(only)} in {NOTEBOOKS}")
    return paths


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


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the kernels)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def execute(path: Path, out: Path, smoke: bool, params: dict, timeout: int) -> tuple[float, float]:
    """Execute notebook ``path`` into ``out``; returns its wall time and CPU time in seconds
    (the CPU time, kernel included, does not grow when other programs share the cores)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds, cpu


def write_index(lessons: Path, paths: Sequence[Path], timings: dict, smoke: bool) -> None:
    rows = "\n".join(f"| [{p.stem}]({p.name}) | {timings.get(p.stem, {}).get('seconds', float('nan')):.0f} s |"
                     for p in paths)
    (lessons / "index.md").write_text(
        "# userlab lessons\n\n"
        "The notebooks of `notebooks/`, executed top to bottom"
        f" ({'smoke mode: tiny data' if smoke else 'full mode'}) by `make book`. Every figure is"
        " the one the code above it drew. Open a notebook in JupyterLab (`userlab lab`) to change"
        " its parameters and rerun it; the interactive browsers only work there.\n\n"
        "| lesson | time to run (this build) |\n|---|---|\n" + rows + "\n", encoding="utf-8")


def build_site(build: Path, paths: Sequence[Path]) -> Path:
    """Write ``mkdocs.yml`` and run ``mkdocs build``; returns the site folder."""
    nav = "\n".join(["  - Lessons: index.md"] + [f"  - {p.stem.replace('_', ' ')}: {p.name}" for p in paths])
    (build / "mkdocs.yml").write_text(MKDOCS_YML.format(nav=nav), encoding="utf-8")
    site = build / "site"
    shutil.rmtree(site, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                           str(build / "mkdocs.yml")], cwd=build, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build failed:\n{done.stdout}\n{done.stderr}")
    return site


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "build" / "book"), help="build folder")
    p.add_argument("--smoke", action="store_true", help="tiny data and few steps (USERLAB_SMOKE=1)")
    p.add_argument("--only", nargs="+", help="notebooks whose names start with these (e.g. 01 03)")
    p.add_argument("--no-execute", action="store_true", help="render the executed copies in --out")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    for name in PARAMETER_NAMES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=f"the notebooks' {name} parameter")
    args = p.parse_args(argv)
    build = Path(args.out).resolve()
    lessons = build / "lessons"
    paths = notebook_paths(args.only)
    timings_path = build / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    params = {name: getattr(args, name) for name in PARAMETER_NAMES}
    if args.no_execute:
        missing = [p.name for p in paths if not (lessons / p.name).is_file()]
        if missing:
            raise SystemExit(f"not executed yet: {', '.join(missing)} (run without --no-execute)")
    else:
        lessons.mkdir(parents=True, exist_ok=True)
        for path in paths:
            load = os.getloadavg()[0]
            print(f"executing {path.name} ...", flush=True)
            seconds, cpu = execute(path, lessons / path.name, args.smoke, params, args.timeout)
            timings[path.stem] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "smoke": args.smoke,
                                  "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                                  "cpus": os.cpu_count()}
            print(f"  {seconds:.1f} s wall, {cpu:.1f} s CPU (load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
            build.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    write_index(lessons, paths, timings, args.smoke)
    site = build_site(build, paths)
    print(f"book: {site / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
