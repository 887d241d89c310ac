"""Tests of userlab.data.precomp: layouts, im_div, truncation, validation errors, batches."""
from __future__ import annotations

import pickle
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_precomp_files
from userlab.data.precomp import (CaptionView, ImageView, PrecompDataset, _sample_rows,
                                  collate_batch, describe, find_precomp_dir, list_splits,
                                  write_precomp_split)
from userlab.data.text import WordTokenizer, build_vocab
from userlab.errors import DataError


# ---------------------------------------------------------------------------------------------
# find_precomp_dir
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["f30k_precomp", "precomp", "."])
def test_find_precomp_dir_layouts(tmp_path, write_precomp, sub):
    target = (tmp_path / sub).resolve()
    write_precomp(target, split="test", n_images=2)
    assert find_precomp_dir(tmp_path, "f30k").resolve() == target


def test_find_precomp_dir_prefers_named_folder(tmp_path, write_precomp):
    write_precomp(tmp_path / "precomp", n_images=2)
    write_precomp(tmp_path / "coco_precomp", n_images=2)
    assert find_precomp_dir(tmp_path, "coco") == tmp_path / "coco_precomp"
    assert find_precomp_dir(tmp_path) == tmp_path / "precomp"


def test_find_precomp_dir_error_lists_candidates(tmp_path):
    (tmp_path / "precomp").mkdir()
    with pytest.raises(DataError) as info:
        find_precomp_dir(tmp_path, "f30k")
    msg = str(info.value)
    assert "f30k_precomp (no such folder)" in msg
    assert "precomp (exists, but holds no *_ims.npy)" in msg
    assert "*_ims.npy" in msg


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("im_div", [5, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip(tmp_path, write_precomp, im_div, dtype):
    src = write_precomp(tmp_path, split="train", n_images=6, regions=4, dim=8, im_div=im_div,
                        dtype=dtype)
    ds = PrecompDataset(tmp_path, "train")
    assert ds.im_div == im_div
    assert (ds.num_images, ds.num_captions, len(ds)) == (6, 30, 30)
    assert ds.num_rows == (6 if im_div == 5 else 30)
    assert (ds.num_regions, ds.feature_dim) == (4, 8)
    assert isinstance(ds.ims, np.memmap)  # mapped, never read whole
    assert ds.captions == [c.strip() for c in src.captions]
    np.testing.assert_array_equal(ds.ids, src.ids)
    expected = src.per_image.astype(dtype).astype(np.float32)
    for c in range(ds.num_captions):
        item = ds[c]
        assert item["caption_index"] == c and item["image_index"] == c // 5
        assert item["image_id"] == 1000 + 7 * (c // 5)
        assert item["caption"] == src.captions[c].strip()
        assert item["regions"].dtype == torch.float32
        np.testing.assert_array_equal(item["regions"].numpy(), expected[c // 5])
        assert "tokens" not in item and "guide" not in item


def test_ids_one_per_row_and_absent(tmp_path, write_precomp):
    write_precomp(tmp_path / "a", im_div=1, ids="per_row")
    ds = PrecompDataset(tmp_path / "a", "train")
    np.testing.assert_array_equal(ds.ids, 1000 + 7 * np.arange(6))
    write_precomp(tmp_path / "b", ids=None)
    ds = PrecompDataset(tmp_path / "b", "train")
    np.testing.assert_array_equal(ds.ids, np.arange(6))
    assert ds[17]["image_id"] == 3


@pytest.mark.parametrize("im_div", [5, 1])
def test_dev_truncation(tmp_path, write_precomp, im_div):
    src = write_precomp(tmp_path, split="dev", n_images=9, im_div=im_div, guide_dim=3, boxes=True,
                        image_list=True)
    ds = PrecompDataset(tmp_path, "dev", max_images=4)
    assert (ds.num_images, ds.num_captions, len(ds)) == (4, 20, 20)
    assert ds.num_rows == (4 if im_div == 5 else 20)
    assert len(ds.captions) == 20 and len(ds.ids) == 4 and len(ds.image_paths) == 4
    assert ds.boxes.shape == (4, 4, 4)
    np.testing.assert_array_equal(ds[19]["regions"].numpy(), src.per_image[3])
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(IndexError):
        ds.image_item(4)
    # Asking for more images than exist keeps them all.
    assert PrecompDataset(tmp_path, "dev", max_images=100).num_images == 9


def test_extras_guide_boxes_image_paths(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=3, guide_dim=5, boxes=True, image_list=True)
    ds = PrecompDataset(tmp_path, "train")
    assert ds.has_guide and ds.guide_dim == 5
    item = ds.image_item(2)
    assert set(item) == {"regions", "guide", "image_index", "image_id"}
    np.testing.assert_array_equal(item["guide"].numpy(), src.guide[2])
    np.testing.assert_array_equal(np.asarray(ds.boxes), src.boxes)
    assert ds.image_paths[1] == (tmp_path / "img" / "1.jpg").resolve()
    assert all(p.is_absolute() for p in ds.image_paths)
    plain = write_precomp(tmp_path / "plain", n_images=3)
    ds = PrecompDataset(plain.folder, "train")
    assert not ds.has_guide and ds.guide is None and ds.boxes is None and ds.image_paths is None


@settings(max_examples=15, deadline=None)
@given(n_images=st.integers(1, 7), regions=st.integers(1, 5), dim=st.integers(1, 6),
       im_div=st.sampled_from([1, 5]), dtype=st.sampled_from([np.float16, np.float32]),
       max_images=st.one_of(st.none(), st.integers(1, 8)))
def test_round_trip_property(n_images, regions, dim, im_div, dtype, max_images):
    with tempfile.TemporaryDirectory() as folder:
        src = write_precomp_files(folder, n_images=n_images, regions=regions, dim=dim,
                                  im_div=im_div, dtype=dtype, seed=n_images * 31 + dim)
        ds = PrecompDataset(folder, "train", max_images=max_images)
        kept = n_images if max_images is None else min(n_images, max_images)
        assert ds.num_images == kept and len(ds) == 5 * kept
        images = ImageView(ds)
        for i in range(len(images)):
            np.testing.assert_array_equal(images[i]["regions"].numpy(),
                                          src.per_image[i].astype(dtype).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------
def _raises(folder, split, file_name, *keywords, **kwargs):
    with pytest.raises(DataError) as info:
        PrecompDataset(folder, split, **kwargs)
    msg = str(info.value)
    assert file_name in msg, msg
    for key in keywords:
        assert key in msg, msg
    return msg


def test_missing_files(tmp_path, write_precomp):
    write_precomp(tmp_path, split="train")
    _raises(tmp_path, "test", "test_ims.npy", "missing")
    (tmp_path / "train_caps.txt").unlink()
    _raises(tmp_path, "train", "train_caps.txt", "missing")
    with pytest.raises(DataError, match="precomp folder not found"):
        PrecompDataset(tmp_path / "nowhere", "train")


def test_caption_count_not_five_per_image(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=3)
    (tmp_path / "train_caps.txt").write_text("\n".join(src.captions[:14]) + "\n")
    _raises(tmp_path, "train", "train_caps.txt", "14 captions", "5 per image")


def test_rows_neither_images_nor_captions(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=3)
    np.save(tmp_path / "train_ims.npy", np.zeros((4, 4, 8), np.float32))
    _raises(tmp_path, "train", "train_ims.npy", "4 rows", "15 captions", "3 images")


def test_ids_count_mismatch(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    (tmp_path / "train_ids.txt").write_text("1\n2\n")
    _raises(tmp_path, "train", "train_ids.txt", "2 ids", "one per image (3)")


def test_ids_not_integer(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    (tmp_path / "train_ids.txt").write_text("1\nx7\n3\n")
    _raises(tmp_path, "train", "train_ids.txt", "line 2", "not an integer")


def test_ids_per_row_disagree_within_image(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=2, im_div=1, ids="per_row")
    (tmp_path / "train_ids.txt").write_text("".join(f"{v}\n" for v in [1] * 5 + [2] * 4 + [3]))
    _raises(tmp_path, "train", "train_ids.txt", "image 1", "different ids")


def test_guide_rows_mismatch(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    np.save(tmp_path / "train_guide.npy", np.zeros((2, 5), np.float32))
    _raises(tmp_path, "train", "train_guide.npy", "2 rows", "one per image (3)")


def test_boxes_shape_mismatch(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3, regions=4)
    np.save(tmp_path / "train_boxes.npy", np.zeros((3, 5, 4), np.float32))
    _raises(tmp_path, "train", "train_boxes.npy", "(3, 5, 4)", "expected (3, 4, 4)")


def test_image_list_count_mismatch(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    (tmp_path / "train_images.txt").write_text("a.jpg\nb.jpg\n")
    _raises(tmp_path, "train", "train_images.txt", "2 images", "(3)")


@pytest.mark.parametrize("array, keywords", [
    (np.zeros((3, 32), np.float32), ("ndim 2", "expected 3")),
    (np.zeros((3, 4, 8), np.int64), ("dtype int64",)),
    (np.zeros((3, 4, 8), bool), ("dtype bool",)),
    (np.zeros((3, 4, 8), np.complex64), ("dtype complex64",)),
])
def test_wrong_ndim_or_dtype(tmp_path, write_precomp, array, keywords):
    write_precomp(tmp_path, n_images=3)
    np.save(tmp_path / "train_ims.npy", array)
    _raises(tmp_path, "train", "train_ims.npy", *keywords)


def test_object_dtype(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    arr = np.empty((3, 4, 8), dtype=object)
    np.save(tmp_path / "train_ims.npy", arr, allow_pickle=True)
    _raises(tmp_path, "train", "train_ims.npy", "dtype object")


def test_truncated_npy(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3)
    path = tmp_path / "train_ims.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _raises(tmp_path, "train", "train_ims.npy", "truncated", f"{3 * 4 * 8 * 4} bytes")
    path.write_bytes(data[:40])  # cut inside the header
    _raises(tmp_path, "train", "train_ims.npy", "not a readable .npy")
    path.write_bytes(b"definitely not numpy")
    _raises(tmp_path, "train", "train_ims.npy", "not a readable .npy")


def test_empty_caption_line(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=2)
    lines = list(src.captions)
    lines[6] = "   "
    (tmp_path / "train_caps.txt").write_text("\n".join(lines) + "\n")
    _raises(tmp_path, "train", "train_caps.txt", "empty line", "line 7")


def test_non_utf8_captions(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=2)
    raw = "\n".join(src.captions).encode() + b"\n"
    first_break = raw.index(b"\n", raw.index(b"\n") + 1)  # end of line 2
    raw = raw[: first_break + 3] + b"\xff\xfe" + raw[first_break + 3:]
    (tmp_path / "train_caps.txt").write_bytes(raw)
    _raises(tmp_path, "train", "train_caps.txt", "not valid UTF-8", "line 3",
            f"byte offset {first_break + 3}")


def test_windows_line_endings_and_bom_are_fine(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=2)
    (tmp_path / "train_caps.txt").write_bytes(
        b"\xef\xbb\xbf" + "\r\n".join(src.captions).encode())
    ds = PrecompDataset(tmp_path, "train")
    assert ds.captions == [c.strip() for c in src.captions]


# ---------------------------------------------------------------------------------------------
# NaN / Inf rows
# ---------------------------------------------------------------------------------------------
def _put_nan(folder, row, value=np.nan, name="train_ims.npy"):
    arr = np.load(folder / name)
    arr[row].flat[3] = value
    np.save(folder / name, arr)


def test_nan_in_sampled_row_fails_on_open(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=40)
    _put_nan(tmp_path, 39, np.inf)  # the last row is always in the sample
    _raises(tmp_path, "train", "train_ims.npy", "row 39", "NaN or Inf")
    # ... unless content checks are switched off.
    assert PrecompDataset(tmp_path, "train", validate=False).num_images == 40


@pytest.mark.parametrize("im_div", [5, 1])
def test_nan_outside_sample_caught_lazily_and_by_full_scan(tmp_path, write_precomp, im_div):
    write_precomp(tmp_path, n_images=40, im_div=im_div)
    n_rows = 40 * 5 // im_div
    bad_row = next(r for r in range(n_rows // 2, n_rows) if r not in _sample_rows(n_rows))
    _put_nan(tmp_path, bad_row)
    ds = PrecompDataset(tmp_path, "train")  # the sample misses it
    bad_image = bad_row * im_div // 5
    ds.image_item(bad_image - 1)  # neighbours are fine
    with pytest.raises(DataError, match=f"row {bad_row} "):
        ds.image_item(bad_image)
    with pytest.raises(DataError, match=f"row {bad_row} ") as info:
        ds.validate_rows(chunk_rows=7)
    assert "train_ims.npy" in str(info.value)
    _raises(tmp_path, "train", "train_ims.npy", f"row {bad_row} ", full_check=True)


def test_nan_in_guide(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=3, guide_dim=4)
    _put_nan(tmp_path, 1, name="train_guide.npy")
    _raises(tmp_path, "train", "train_guide.npy", "row 1", "NaN or Inf")


def test_validate_rows_counts_only_used_rows(tmp_path, write_precomp):
    write_precomp(tmp_path, n_images=10, im_div=1)
    _put_nan(tmp_path, 49)  # last row: outside the first 3 images
    ds = PrecompDataset(tmp_path, "train", max_images=3)
    assert ds.validate_rows(chunk_rows=4) == 15


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tokenized(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=4, regions=3, dim=5, guide_dim=6)
    tok = WordTokenizer(build_vocab(src.captions, threshold=1), seed=0)
    return src, tok, PrecompDataset(tmp_path, "train", tokenizer=tok)


def test_collate_full_items(tokenized):
    src, tok, ds = tokenized
    items = [ds[c] for c in (0, 1, 7, 19)]
    batch = collate_batch(items)
    assert set(batch) == {"regions", "guide", "tokens", "lengths", "attention_mask",
                          "image_index", "caption_index", "image_id"}
    lengths = [len(tok.encode(ds.captions[c])) for c in (0, 1, 7, 19)]
    width = max(lengths)
    assert batch["regions"].shape == (4, 3, 5) and batch["regions"].dtype == torch.float32
    assert batch["guide"].shape == (4, 6)
    assert batch["tokens"].shape == (4, width) and batch["tokens"].dtype == torch.long
    assert batch["lengths"].tolist() == lengths
    for row, c in enumerate((0, 1, 7, 19)):
        ids = tok.encode(ds.captions[c])
        assert batch["tokens"][row, : len(ids)].tolist() == ids
        assert batch["tokens"][row, len(ids):].eq(0).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))
    assert batch["image_index"].tolist() == [0, 0, 1, 3]
    assert batch["caption_index"].tolist() == [0, 1, 7, 19]
    assert batch["image_id"].tolist() == [1000, 1000, 1007, 1021]
    np.testing.assert_array_equal(batch["regions"][2].numpy(), src.per_image[1])


def test_collate_image_only_and_caption_only(tokenized):
    _, _, ds = tokenized
    images = collate_batch([ImageView(ds)[i] for i in range(3)])
    assert set(images) == {"regions", "guide", "image_index", "image_id"}
    assert images["image_index"].tolist() == [0, 1, 2]
    captions = collate_batch([CaptionView(ds)[c] for c in range(6)])
    assert set(captions) == {"tokens", "lengths", "attention_mask", "image_index",
                             "caption_index", "image_id"}
    assert captions["image_index"].tolist() == [0] * 5 + [1]
    assert len(ImageView(ds)) == 4 and len(CaptionView(ds)) == 20


def test_collate_custom_pad_and_list_tokens():
    batch = collate_batch([{"tokens": [5, 6, 7]}, {"tokens": [8]}], pad_id=-1)
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate_batch([])


def test_dataloader_and_pickling(tokenized):
    _, _, ds = tokenized
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # arrays are re-mapped, not copied into the pickle
    again = pickle.loads(blob)
    torch.testing.assert_close(again[13]["regions"], ds[13]["regions"])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate_batch,
                                         generator=torch.Generator().manual_seed(0))
    seen = torch.cat([b["caption_index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(20))


def test_train_flag_reaches_tokenizer(tmp_path, write_precomp):
    src = write_precomp(tmp_path, n_images=4)
    tok = WordTokenizer(build_vocab(src.captions, threshold=1), augment_prob=0.5, seed=0)
    plain = PrecompDataset(tmp_path, "train", tokenizer=tok, train=False)
    train = PrecompDataset(tmp_path, "train", tokenizer=tok, train=True)
    clean = [tok.encode(c) for c in plain.captions]
    assert [plain[c]["tokens"].tolist() for c in range(20)] == clean
    assert sum(train[c]["tokens"].tolist() != clean[c] for c in range(20)) > 10


# ---------------------------------------------------------------------------------------------
# Writer and overview
# ---------------------------------------------------------------------------------------------
def test_writer_rejects_bad_input(tmp_path):
    ims = np.zeros((2, 3, 4), np.float32)
    caps = [f"caption {k}" for k in range(10)]
    with pytest.raises(DataError, match="need 5 per image"):
        write_precomp_split(tmp_path, "x", ims, caps[:9])
    with pytest.raises(DataError, match="line break"):
        write_precomp_split(tmp_path, "x", ims, caps[:9] + ["two\nlines"])
    with pytest.raises(DataError, match="rows must equal"):
        write_precomp_split(tmp_path, "x", np.zeros((3, 3, 4), np.float32), caps)
    with pytest.raises(DataError, match="x_ids.txt"):
        write_precomp_split(tmp_path, "x", ims, caps, ids=[1, 2, 3])
    with pytest.raises(DataError, match="x_boxes.npy"):
        write_precomp_split(tmp_path, "x", ims, caps, boxes=np.zeros((2, 4, 4)))
    assert list(tmp_path.iterdir()) == []  # nothing written when the input is bad
    write_precomp_split(tmp_path, "x", ims, caps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_caps.txt", "x_ims.npy"]


def test_describe(tmp_path, write_precomp):
    write_precomp(tmp_path, split="train", n_images=6, regions=4, dim=8, guide_dim=3)
    write_precomp(tmp_path, split="dev", n_images=2, im_div=1, dtype=np.float16)
    (tmp_path / "broken_ims.npy").write_bytes(b"junk")
    assert list_splits(tmp_path) == ["broken", "dev", "train"]
    table = describe(tmp_path).set_index("split")
    assert table.loc["train", "rows"] == 6 and table.loc["train", "captions"] == 30
    assert table.loc["train", "guide_dim"] == 3 and table.loc["train", "im_div"] == 5
    assert table.loc["dev", "rows"] == 10 and table.loc["dev", "dtype"] == "float16"
    assert table.loc["dev", "R"] == 4 and table.loc["dev", "F"] == 8
    assert "broken_caps.txt" in table.loc["broken", "problem"]
    expected_mb = sum((tmp_path / f"train{s}").stat().st_size
                      for s in ("_ims.npy", "_caps.txt", "_ids.txt", "_guide.npy")) / 2**20
    assert table.loc["train", "size_mb"] == pytest.approx(expected_mb, abs=1e-3)
