"""Write the student release of the notebooks: every exercise solution removed.

The notebooks in ``notebooks/`` are the teacher's version. Their exercise cells hold the
solutions between nbgrader-style markers::

    def minibatch_term(sim, mu=90.0, gamma=0.5):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

The release replaces each marked block: inside a function by ``# YOUR CODE HERE`` and
``raise NotImplementedError()`` (the checkers report "not implemented" instead of crashing the
run); at the top level of a cell (a prediction such as ``prediction_alpha = "c"``) by the same
names set to None. Everything outside the markers is copied unchanged.

``make course`` runs ``python scripts/make_course.py`` and writes ``course/release/`` (git-ignored):
``notebooks/NN_*.py`` and their stripped ``.ipynb``, and a README for students. The folder is
rebuilt from scratch each time.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import shutil
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "# YOUR CODE HERE"
ANSWER = "# YOUR ANSWER HERE"

README = """\
# userlab notebooks: student release

Run the notebooks in order (01 to 05) in JupyterLab, from a checkout of userlab with its
environment installed (`make install`). Each notebook ends with exercises: write the function in
the cell, then run the cell; the check under it runs your function on hidden inputs and tells you
what is wrong, never the expected numbers. Predict-then-run questions ask for your prediction
before a cell measures the answer. `USERLAB_SMOKE=1` runs every notebook on tiny data in seconds.
"""


class MarkerError(ValueError):
    """Solution markers that do not pair up (names the file and line)."""


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "scripts" / "sync_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replacement(block: list[str], indent: str, where: str) -> list[str]:
    """What the student sees instead of a solution block."""
    if indent:
        return [f"{indent}{STUB}\n", f"{indent}raise NotImplementedError()\n"]
    try:
        tree = ast.parse(textwrap.dedent("".join(block)))
    except SyntaxError as err:
        raise MarkerError(f"{where}: the solution block does not parse ({err.msg})") from None
    names = [target.id for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name)]
    if not names:
        raise MarkerError(f"{where}: a top-level solution block must assign a name "
                          "(e.g. prediction = \"b\"); others belong inside a function")
    return [f"{name} = None  {ANSWER}\n" for name in dict.fromkeys(names)]


def strip_solutions(text: str, source: str = "<text>") -> tuple[str, list[str]]:
    """Replace every marked solution block.

    Args:
        text: a notebook source (py:percent).
        source: file name for error messages.

    Returns:
        ``(release text, removed blocks)``; each block is the code between its markers.

    Raises:
        MarkerError: a BEGIN without END, an END without BEGIN, or nested markers.
    """
    out: list[str] = []
    removed: list[str] = []
    block: list[str] | None = None
    indent, start = "", 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if block is not None:
                raise MarkerError(f"{source}:{number}: {BEGIN} inside the block opened on line {start}")
            block, indent, start = [], line[: len(line) - len(line.lstrip())], number
        elif stripped == END:
            if block is None:
                raise MarkerError(f"{source}:{number}: {END} without {BEGIN}")
            out.extend(_replacement(block, indent, f"{source}:{start}"))
            removed.append("".join(block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise MarkerError(f"{source}:{start}: {BEGIN} is never closed")
    return "".join(out), removed


def notebook_sources(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("[0-9][0-9]_*.py"))


def build_release(out: Path, notebooks: Path = ROOT / "notebooks") -> dict[str, int]:
    """Write the student release into ``out`` (emptied first).

    Returns:
        ``{notebook name: number of solution blocks removed}``.
    """
    out = Path(out)
    sources = notebook_sources(notebooks)
    if not sources:
        raise FileNotFoundError(f"no notebooks (NN_*.py) in {notebooks}")
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    sync = _sync_module()
    import jupytext

    counts = {}
    for py in sources:
        text, removed = strip_solutions(py.read_text(encoding="utf-8"), str(py.relative_to(notebooks.parent)))
        target = out / "notebooks" / py.name
        target.write_text(text, encoding="utf-8")
        jupytext.write(sync.build(target), target.with_suffix(".ipynb"), fmt="ipynb")
        counts[py.stem] = len(removed)
    (out / "README.md").write_text(README, encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "course" / "release",
                        help="release folder (default: course/release; rebuilt from scratch)")
    args = parser.parse_args(argv)
    try:
        counts = build_release(args.out)
    except (MarkerError, FileNotFoundError) as err:
        print(f"make_course: {err}", file=sys.stderr)
        return 1
    for name, n in counts.items():
        print(f"{name}: {n} solution blocks removed")
    print(f"student release written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
