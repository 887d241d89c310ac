"""Notebooks 01-04 run in smoke mode on grid features made by ``userlab extract``, not only the demo.

A small Flickr-style dataset of generated photos (a coloured block on a coloured background,
captions that name both colours) is extracted by the CLI at a 96-px backbone input (3x3 grid,
guide features from the backbone). The image files are then moved away, so the notebooks must
work without them. Each notebook is executed with nbclient from a sandbox project folder, its
parameters given through ``USERLAB_DATA`` / ``USERLAB_RUNS`` / ``USERLAB_DEVICE`` (what the
parameters cell falls back to); the runs folder is shared, so 03 reuses the model 02 trained.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from userlab.notebook import feature_info

ROOT = Path(__file__).resolve().parents[1]
SIDE = 96                      # backbone input: (96 / 32)^2 = 9 grid cells
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20)}
PLACES = {"left": (0.05, 0.45), "right": (0.5, 0.9)}
SPLITS = {"train": 40, "dev": 8, "test": 8}


def _photo(rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    fg, bg = names[fg], names[bg]
    place = str(rng.choice(list(PLACES)))
    w, h = int(rng.integers(80, 140)), int(rng.integers(80, 140))
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = COLOURS[bg]
    x0, x1 = (int(f * w) for f in PLACES[place])
    pixels[h // 4: 3 * h // 4, x0:x1] = COLOURS[fg]
    pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)  # sensor noise
    captions = [f"a {fg} block on a {bg} background", f"the {fg} square is on the {place}",
                f"a {bg} picture with a {fg} block", f"{fg} on {bg}", f"a photo of a {fg} square on the {place}"]
    return Image.fromarray(pixels), captions


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """(precomp folder made by ``userlab extract``, its image folder, now empty)."""
    base = tmp_path_factory.mktemp("own_data")
    images = base / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines, lists = [], {}
    for split, n in SPLITS.items():
        names = []
        for k in range(n):
            name = f"{split}_{k:03d}.jpg"
            photo, captions = _photo(rng)
            photo.save(images / name, quality=92)
            lines += [f"{name}#{j}\t{c}" for j, c in enumerate(captions)]
            names.append(name)
        lists[split] = base / f"{split}_list.txt"
        lists[split].write_text("\n".join(names) + "\n")
    (base / "captions.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "userlab", "extract", "--format", "flickr", "--images", str(images),
           "--captions", str(base / "captions.txt"), "--out", str(base / "features"),
           "--train-list", str(lists["train"]), "--dev-list", str(lists["dev"]),
           "--test-list", str(lists["test"]), "--input-size", str(SIDE), "--workers", "0",
           "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    precomp = base / "features" / "precomp"
    # the lessons must not need the image files: take them away
    images.rename(base / "photos_moved_away")
    return precomp, images


def test_extracted_folder_is_read_as_grid_features(own_data):
    precomp, images = own_data
    info = feature_info(precomp)
    assert (info.layout, info.grid, info.num_regions) == ("grid", (3, 3), 9)
    assert info.feature_dim == 1280 and info.guide_dim == 1280
    assert not images.exists()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder that looks like the project root to the notebooks (figures land here)."""
    box = tmp_path_factory.mktemp("nb_project")
    (box / "pyproject.toml").write_text("# marker: userlab.notebook.repo_root() stops here\n")
    (box / "userlab").symlink_to(ROOT / "userlab", target_is_directory=True)
    (box / "notebooks").mkdir()
    return box


# test-only cells appended to a notebook: what it must have done on these features
CHECKS = {
    "01_features": "assert lesson.features.layout == 'grid' and not lesson.demo and scenes is None",
    "02_train": "assert run.trained and len(run.history) == cfg.optim.epochs",
    "03_evaluate": "assert tuple(sims.shape) == (8, 40)",
    "04_attention_and_margins": (
        "assert set(variants) == {'SGE', 'CGE', 'none'}\n"
        "assert all(lesson.image(test, i) is None for i in range(test.num_images))  # no image files\n"
        "_fig = lesson.draw_attention(test, 0, sge['beta'])\n"
        "assert len(_fig.axes[0].images) == 2 and _fig.axes[0].images[1].get_array().shape == (3, 3)\n"
        "assert records['epoch'].nunique() == 2 and set(records['model']) == set(variants)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_notebook_runs_on_extracted_grid_features(name, own_data, sandbox, monkeypatch):
    from nbclient import NotebookClient
    precomp, _ = own_data
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    for key, value in {"USERLAB_SMOKE": "1", "USERLAB_DATA": str(precomp.parent),
                       "USERLAB_RUNS": str(sandbox / "runs"), "USERLAB_DEVICE": "cpu",
                       "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}.items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(sandbox / "notebooks")}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "(grid, R=9)" in text, "the parameters did not reach the notebook"
