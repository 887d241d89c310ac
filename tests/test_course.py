"""The course tooling: solution markers, the student release (``make course``), the solutions.

The exercise section of every notebook (from its ``## Exercises`` heading to the end) depends
only on numpy, pandas and torch, so it runs here on its own in seconds:

- in the **release** every check reports "not implemented" and nothing crashes;
- in the teacher's notebooks (``notebooks/``, the solutions between markers) every check passes.

``make test`` also runs the whole release notebooks in smoke mode (nbmake on ``course/release``).
A class copy whose ``notebooks/`` came from the release holds no solutions: the solutions test
then skips with a message instead of failing.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import jupytext
import pytest

from userlab import teach

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
PREAMBLE = "import numpy as np\nimport pandas as pd\nimport torch\n"   # what the notebooks import first
# Library functions that solve an exercise: never importable by name in a student's notebook.
SOLVERS = {"batch_hal_loss", "unified_objective", "ema_update_", "retrieval_ranks", "i2t_ranks",
           "t2i_ranks", "recall_metrics", "evaluate_sims", "region_attention", "relative_boost",
           "absolute_boost", "supremum_margin", "infimum_margin"}

spec = importlib.util.spec_from_file_location("make_course", ROOT / "scripts" / "make_course.py")
course = importlib.util.module_from_spec(spec)
spec.loader.exec_module(course)


def _cells(path: Path) -> tuple[list, list]:
    """``(cells before the Exercises heading, exercise cells)`` of a py:percent notebook."""
    cells = jupytext.read(path).cells
    start = next((i for i, c in enumerate(cells)
                  if c.cell_type == "markdown" and c.source.startswith("## Exercises")), None)
    assert start is not None, f"{path.name} has no '## Exercises' section"
    return cells[:start], cells[start:]


def _run_exercises(path: Path) -> list[teach.Feedback]:
    """Execute the exercise section alone; return every feedback its checks printed."""
    teach.session_log(clear=True)
    namespace: dict = {}
    exec(PREAMBLE, namespace)
    for cell in _cells(path)[1]:
        if cell.cell_type == "code":
            exec(compile(cell.source, f"{path.name} (exercises)", "exec"), namespace)
    return teach.session_log(clear=True)


def _check_calls(path: Path) -> int:
    code = "\n".join(c.source for c in _cells(path)[1] if c.cell_type == "code")
    return len(re.findall(r"^\s*teach\.(?:check_\w+|reveal)\(", code, flags=re.M))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("course") / "release"
    counts = course.build_release(out)
    assert set(counts) == {p.stem for p in SOURCES}
    return out


# -- the marker processing ---------------------------------------------------------------------------
def test_strip_solutions_replaces_bodies_and_answers():
    text = ("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n"
            "    ### END SOLUTION\n\n### BEGIN SOLUTION\nprediction = \"b\"\n### END SOLUTION\nkeep = 1\n")
    out, removed = course.strip_solutions(text)
    assert removed == ["    y = x + 1\n    return y\n", "prediction = \"b\"\n"]
    assert out == ("def f(x):\n    \"\"\"Doc.\"\"\"\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\n"
                   "prediction = None  # YOUR ANSWER HERE\nkeep = 1\n")
    namespace: dict = {}
    exec(out, namespace)                      # the release still runs
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    assert namespace["prediction"] is None


@pytest.mark.parametrize("text, where", [
    ("### BEGIN SOLUTION\nx = 1\n", "x.py:1: ### BEGIN SOLUTION is never closed"),
    ("x = 1\n### END SOLUTION\n", "x.py:2: ### END SOLUTION without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n", "x.py:2: ### BEGIN SOLUTION inside the block opened on line 1"),
    ("### BEGIN SOLUTION\nprint(1)\n### END SOLUTION\n", "x.py:1: a top-level solution block must assign"),
])
def test_bad_markers_are_named(text, where):
    with pytest.raises(course.MarkerError, match=re.escape(where)):
        course.strip_solutions(text, "x.py")


def test_make_course_command_writes_the_release(tmp_path, capsys):
    assert course.main(["--out", str(tmp_path / "rel")]) == 0
    assert "student release written" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "rel" / "notebooks").iterdir()) == sorted(
        [p.name for p in SOURCES] + [p.with_suffix(".ipynb").name for p in SOURCES])
    assert (tmp_path / "rel" / "README.md").is_file()


# -- the release ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_release_holds_no_solutions(release, source):
    text = source.read_text(encoding="utf-8")
    if course.BEGIN not in text:
        pytest.skip(f"{source.name} holds no solutions (a class copy made from the release)")
    released_py = (release / "notebooks" / source.name).read_text(encoding="utf-8")
    released_nb = "".join("".join(c["source"]) for c in json.loads(
        (release / "notebooks" / source.with_suffix(".ipynb").name).read_text(encoding="utf-8"))["cells"])
    for released in (released_py, released_nb):
        assert "BEGIN SOLUTION" not in released and "END SOLUTION" not in released
    # independent of the script: every solution line that occurs nowhere else must be gone
    outside = re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION", "", text, flags=re.S)
    blocks = re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", text, flags=re.S)
    assert blocks
    lines = {ln.strip() for b in blocks for ln in b.splitlines() if len(ln.strip()) > 8}
    lines = {ln for ln in lines if ln not in outside}
    assert lines, "solution blocks should hold code of their own"
    for released in (released_py, released_nb):
        leaked = [ln for ln in lines if ln in released]
        assert not leaked, f"solution code in the release of {source.name}: {leaked[:3]}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_release_changes_only_the_exercises(release, source):
    before_src, ex_src = _cells(source)
    before_rel, ex_rel = _cells(release / "notebooks" / source.name)
    assert [(c.cell_type, c.source) for c in before_rel] == [(c.cell_type, c.source) for c in before_src]
    assert len(ex_rel) == len(ex_src)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_release_exercises_report_not_implemented(release, source):
    released = release / "notebooks" / source.name
    feedback = _run_exercises(released)
    assert len(feedback) == _check_calls(released) > 0
    assert all(fb.status == teach.NOT_IMPLEMENTED and not fb.correct for fb in feedback), \
        [fb.message for fb in feedback if fb.status != teach.NOT_IMPLEMENTED]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_no_solver_in_the_student_namespace(release, source):
    """Library functions that solve an exercise are not imported by name, or are dropped first."""
    before, exercises = _cells(release / "notebooks" / source.name)
    imported = set()
    for cell in before + exercises:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(_python(cell.source))):
            if isinstance(node, ast.ImportFrom):
                imported |= {alias.asname or alias.name for alias in node.names}
    first = next(c.source for c in exercises if c.cell_type == "code")
    dropped = set(re.findall(r"\"(\w+)\"", first.split("globals().pop")[0])) if "globals().pop" in first else set()
    in_exercises = {alias.asname or alias.name for cell in exercises if cell.cell_type == "code"
                    for node in ast.walk(ast.parse(_python(cell.source))) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
    assert not (in_exercises & SOLVERS), f"{source.name}: the exercises import {in_exercises & SOLVERS}"
    assert not ((imported & SOLVERS) - dropped), \
        f"{source.name}: {(imported & SOLVERS) - dropped} stay importable in the exercises"


def _python(source: str) -> str:
    """Cell source without IPython magics / shell lines (not valid Python)."""
    return "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!")))


# -- the solutions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solutions_pass_every_check(source):
    if course.BEGIN not in source.read_text(encoding="utf-8"):
        pytest.skip(f"{source.name} holds no solutions (a class copy made from the release): "
                    "nothing to check against")
    feedback = _run_exercises(source)
    assert len(feedback) == _check_calls(source) > 0
    assert all(fb.correct for fb in feedback), [fb.message for fb in feedback if not fb.correct]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_exercises_close_the_notebook(source):
    """The exercises come last: no other level-2 section follows their heading."""
    _, exercises = _cells(source)
    headings = [ln for c in exercises if c.cell_type == "markdown"
                for ln in c.source.splitlines() if ln.startswith("## ")]
    assert len(headings) == 1 and "Exercises" in headings[0], headings
