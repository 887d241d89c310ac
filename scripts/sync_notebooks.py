"""Regenerate notebooks/*.ipynb from their paired py:percent scripts (outputs stripped).

The ``.py`` file is the source a person edits and reviews; run this after editing it:
``.venv/bin/python scripts/sync_notebooks.py``. ``tests/test_notebooks.py`` fails when a pair is
out of sync or a committed notebook carries outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1] / "notebooks"


def build(py: Path):
    nb = jupytext.read(py)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "jupytext": {"formats": "ipynb,py:percent"}}
    for i, cell in enumerate(nb.cells):
        # only tags survive (the parameters cell's "parameters" tag is what papermill looks for)
        cell.metadata = {"tags": cell.metadata["tags"]} if cell.metadata.get("tags") else {}
        cell["id"] = f"cell-{i:02d}"  # deterministic ids keep diffs quiet
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def main() -> int:
    for py in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        jupytext.write(build(py), py.with_suffix(".ipynb"), fmt="ipynb")
        print(f"wrote {py.with_suffix('.ipynb').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
