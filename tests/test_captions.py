"""Caption files as distributed: Karpathy JSON, Flickr token files + split lists, COCO JSON.

Every file here is written by the test in the real format, small enough to read by eye.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from userlab.data import captions as cap
from userlab.data.captions import (CaptionedImage, clean_caption, locate_images,
                                   read_caption_splits, read_coco_captions, read_flickr_tokens,
                                   read_karpathy)
from userlab.errors import ConfigError, DataError


def _sent(text: str) -> dict:
    return {"raw": text, "tokens": text.lower().split()}


def _karpathy_image(name: str, split: str, imgid: int, n_caps: int = 5, **extra) -> dict:
    return {"filename": name, "split": split, "imgid": imgid,
            "sentences": [_sent(f"{name} says {k}") for k in range(n_caps)], **extra}


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Karpathy
# ---------------------------------------------------------------------------------------------
def test_karpathy_flickr_splits_order_and_restval(tmp_path):
    images = [_karpathy_image("a.jpg", "train", 0), _karpathy_image("b.jpg", "val", 1),
              _karpathy_image("c.jpg", "restval", 2), _karpathy_image("d.jpg", "test", 3),
              _karpathy_image("e.jpg", "train", 4)]
    path = _write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    splits = read_karpathy(path)
    assert list(splits) == ["train", "dev", "test"]
    # restval joins train in file order
    assert [i.path for i in splits["train"]] == ["a.jpg", "c.jpg", "e.jpg"]
    assert [i.image_id for i in splits["train"]] == [0, 2, 4]
    assert splits["dev"][0] == CaptionedImage("b.jpg", 1, tuple(f"b.jpg says {k}" for k in range(5)))
    separate = read_karpathy(path, restval="separate")
    assert [i.path for i in separate["train"]] == ["a.jpg", "e.jpg"]
    assert [i.path for i in separate["restval"]] == ["c.jpg"]
    with pytest.raises(ConfigError, match="restval"):
        read_karpathy(path, restval="drop")


def test_karpathy_keeps_first_five_captions_and_cleans_them(tmp_path):
    seven = _karpathy_image("a.jpg", "train", 0, n_caps=7)
    seven["sentences"][0] = {"raw": "  A dog\truns\nfast  ", "tokens": []}
    seven["sentences"][1] = {"tokens": ["only", "tokens", "here"]}   # no raw: tokens joined
    path = _write_json(tmp_path / "k.json", {"images": [seven]})
    item = read_karpathy(path)["train"][0]
    assert item.captions == ("A dog runs fast", "only tokens here", "a.jpg says 2",
                             "a.jpg says 3", "a.jpg says 4")
    assert clean_caption(" x \r\n y\t") == "x y"


def test_karpathy_fewer_than_five_or_empty_captions_name_image_and_file(tmp_path):
    path = _write_json(tmp_path / "dataset_flickr8k.json", {"images": [
        _karpathy_image("ok.jpg", "train", 0), _karpathy_image("short.jpg", "test", 1, n_caps=4)]})
    with pytest.raises(DataError, match=r"short\.jpg \(4\)") as err:
        read_karpathy(path)
    assert "dataset_flickr8k.json" in str(err.value)
    bad = _karpathy_image("blank.jpg", "train", 0)
    bad["sentences"][3] = {"raw": " \n ", "tokens": []}
    path = _write_json(tmp_path / "k2.json", {"images": [bad]})
    with pytest.raises(DataError, match="blank.jpg"):
        read_karpathy(path)
    path = _write_json(tmp_path / "k3.json", {"images": [_karpathy_image("x.jpg", "holdout", 0)]})
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_karpathy(path)


def test_karpathy_coco_paths_ids_and_test_1k(tmp_path, monkeypatch):
    monkeypatch.setattr(cap, "COCO_TEST_1K", 3)   # the real 1000, scaled down
    images = [_karpathy_image(f"COCO_val2014_{k:012d}.jpg", "test", k, filepath="val2014",
                              cocoid=1000 + k) for k in range(5)]
    images.append(_karpathy_image("COCO_train2014_000000000009.jpg", "train", 5,
                                  filepath="train2014", cocoid=9))
    path = _write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    splits = read_karpathy(path)
    assert list(splits) == ["train", "test", "testall"]
    assert splits["train"][0].path == "train2014/COCO_train2014_000000000009.jpg"
    assert splits["train"][0].image_id == 9                       # cocoid, not imgid
    assert [i.image_id for i in splits["testall"]] == [1000, 1001, 1002, 1003, 1004]
    assert splits["test"] == splits["testall"][:3]


# ---------------------------------------------------------------------------------------------
# Flickr token files
# ---------------------------------------------------------------------------------------------
def _flickr_files(tmp_path: Path, n_caps: dict[str, int] | None = None) -> tuple[Path, dict]:
    names = ["10_aa.jpg", "11_bb.jpg", "12_cc.jpg", "13_dd.jpg", "99_extra.jpg"]
    n_caps = n_caps or {}
    lines = []
    for k in reversed(range(5)):   # written with sentence numbers descending
        for name in names:
            if k < n_caps.get(name, 5):
                lines.append(f"{name}#{k}\t{name[:2]} caption {k} ")
    for name, n in n_caps.items():   # extra sentences beyond 5, appended at the end
        lines += [f"{name}#{k}\t{name[:2]} caption {k}" for k in range(5, n)]
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lists = {}
    for split, chosen in (("train", ["12_cc.jpg", "10_aa.jpg"]), ("dev", ["11_bb.jpg"]),
                          ("test", ["13_dd.jpg"])):
        lists[split] = tmp_path / f"Flickr_8k.{split}Images.txt"
        lists[split].write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return token, lists


def test_flickr_tokens_split_lists_and_caption_order(tmp_path):
    token, lists = _flickr_files(tmp_path, n_caps={"10_aa.jpg": 7})
    splits = read_flickr_tokens(token, lists)
    assert list(splits) == ["train", "dev", "test"]
    assert [i.path for i in splits["train"]] == ["12_cc.jpg", "10_aa.jpg"]   # list order
    # sorted by the #n sentence number; 7 captions keep #0..#4
    assert splits["train"][1].captions == tuple(f"10 caption {k}" for k in range(5))
    # id = position of first appearance in the token file (file lists #4 lines first)
    assert [i.image_id for i in splits["train"]] == [2, 0]
    assert splits["dev"][0].image_id == 1
    # the image in no list is left out
    assert "99_extra.jpg" not in {i.path for s in splits.values() for i in s}
    # "val" is accepted for "dev"
    lists["val"] = lists.pop("dev")
    assert read_flickr_tokens(token, lists)["dev"][0].path == "11_bb.jpg"


def test_flickr_errors_name_the_problem(tmp_path):
    token, lists = _flickr_files(tmp_path, n_caps={"11_bb.jpg": 4})
    with pytest.raises(DataError, match=r"11_bb\.jpg \(4\)") as err:
        read_flickr_tokens(token, lists)
    assert "Flickr8k.token.txt" in str(err.value)
    token, lists = _flickr_files(tmp_path)
    lists["test"].write_text("13_dd.jpg\nghost.jpg\n", encoding="utf-8")
    with pytest.raises(DataError, match="ghost.jpg"):
        read_flickr_tokens(token, lists)
    lists["test"].write_text("13_dd.jpg\n10_aa.jpg\n", encoding="utf-8")
    with pytest.raises(DataError, match="also in the train list: 10_aa.jpg"):
        read_flickr_tokens(token, lists)
    lists["test"].write_text("13_dd.jpg\n", encoding="utf-8")
    token.write_text("10_aa.jpg#0\tfine\n10_aa.jpg a caption without tab\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        read_flickr_tokens(token, lists)
    with pytest.raises(ConfigError, match="split_files"):
        read_flickr_tokens(token, None)


def test_flickr_tokens_with_karpathy_split(tmp_path):
    token, _ = _flickr_files(tmp_path)
    kp = _write_json(tmp_path / "dataset_flickr8k.json", {"images": [
        _karpathy_image("13_dd.jpg", "train", 0), _karpathy_image("10_aa.jpg", "restval", 1),
        _karpathy_image("11_bb.jpg", "val", 2), _karpathy_image("12_cc.jpg", "test", 3)]})
    splits = read_caption_splits("flickr", token, kp)
    assert [i.path for i in splits["train"]] == ["13_dd.jpg", "10_aa.jpg"]
    assert splits["train"][0].captions[0] == "13 caption 0"   # captions from the token file
    assert [i.path for i in splits["dev"]] == ["11_bb.jpg"]


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
def _coco_file(path: Path, folder: str, ids: list[int], n_caps: dict[int, int] | None = None) -> Path:
    n_caps = n_caps or {}
    images = [{"id": i, "file_name": f"COCO_{folder}_{i:012d}.jpg", "height": 8, "width": 8}
              for i in ids]
    anns, ann_id = [], 0
    for k in range(7):               # annotations interleaved across images, as in COCO
        for i in ids:
            if k < n_caps.get(i, 5):
                anns.append({"id": ann_id, "image_id": i, "caption": f"img {i} cap {k}\n"})
                ann_id += 1
    return _write_json(path, {"info": {}, "images": images, "annotations": anns})


def test_coco_split_from_files(tmp_path):
    train = _coco_file(tmp_path / "captions_train2014.json", "train2014", [5, 3], n_caps={3: 7})
    val = _coco_file(tmp_path / "captions_val2014.json", "val2014", [8])
    splits = read_coco_captions([train, val])
    assert list(splits) == ["train", "dev"]
    assert [i.path for i in splits["train"]] == ["train2014/COCO_train2014_000000000005.jpg",
                                                 "train2014/COCO_train2014_000000000003.jpg"]
    assert splits["train"][1].captions == tuple(f"img 3 cap {k}" for k in range(5))
    assert splits["dev"][0].image_id == 8
    assert list(read_coco_captions([train, val], coco_val_split="test")) == ["train", "test"]


def test_coco_split_from_karpathy(tmp_path, monkeypatch):
    monkeypatch.setattr(cap, "COCO_TEST_1K", 2)
    train = _coco_file(tmp_path / "captions_train2014.json", "train2014", [1, 2])
    val = _coco_file(tmp_path / "captions_val2014.json", "val2014", [7, 8, 9, 10])
    kp_images = [_karpathy_image(f"COCO_val2014_{i:012d}.jpg", "test", 0, filepath="val2014",
                                 cocoid=i) for i in (9, 7, 10)]
    kp_images += [_karpathy_image("COCO_val2014_000000000008.jpg", "restval", 0,
                                  filepath="val2014", cocoid=8),
                  _karpathy_image("COCO_train2014_000000000002.jpg", "train", 0,
                                  filepath="train2014", cocoid=2),
                  _karpathy_image("COCO_train2014_000000000001.jpg", "val", 0,
                                  filepath="train2014", cocoid=1)]
    kp = _write_json(tmp_path / "dataset_coco.json", {"images": kp_images, "dataset": "coco"})
    splits = read_caption_splits("coco", [train, val], kp)
    assert list(splits) == ["train", "dev", "test", "testall"]
    assert [i.image_id for i in splits["train"]] == [8, 2]        # Karpathy order, restval in
    assert [i.image_id for i in splits["testall"]] == [9, 7, 10]
    assert [i.image_id for i in splits["test"]] == [9, 7]
    # captions come from the COCO files, in annotation order
    assert splits["dev"][0].captions == tuple(f"img 1 cap {k}" for k in range(5))
    # a Karpathy image absent from the COCO files
    kp_images.append(_karpathy_image("COCO_val2014_000000000077.jpg", "test", 0,
                                     filepath="val2014", cocoid=77))
    _write_json(kp, {"images": kp_images})
    with pytest.raises(DataError, match="id 77"):
        read_caption_splits("coco", [train, val], kp)


def test_coco_too_few_captions_and_unknown_images(tmp_path):
    val = _coco_file(tmp_path / "captions_val2014.json", "val2014", [4, 6], n_caps={6: 4})
    with pytest.raises(DataError, match=r"COCO_val2014_000000000006\.jpg \(4\)") as err:
        read_coco_captions(val)
    assert "captions_val2014.json" in str(err.value)
    data = json.loads(val.read_text())
    data["annotations"].append({"image_id": 123, "caption": "lost"})
    _write_json(val, data)
    with pytest.raises(DataError, match="image id 123"):
        read_coco_captions(val)
    with pytest.raises(ConfigError, match="format"):
        read_caption_splits("flickr30k", val)


# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------
def test_locate_images_reports_all_missing_and_skips_on_request(tmp_path):
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "a.jpg").write_bytes(b"x")
    (root / "b.jpg").write_bytes(b"x")              # flat layout fallback
    five = tuple("c" for _ in range(5))
    items = [CaptionedImage("val2014/a.jpg", 0, five), CaptionedImage("val2014/b.jpg", 1, five)]
    items += [CaptionedImage(f"val2014/gone{k:02d}.jpg", 2 + k, five) for k in range(23)]
    splits = {"train": items[:3], "test": items[3:]}
    with pytest.raises(DataError) as err:
        locate_images(splits, root, "captions_val2014.json")
    msg = str(err.value)
    assert "23 image(s) named in captions_val2014.json are missing" in msg
    assert "val2014/gone00.jpg" in msg and "val2014/gone19.jpg" in msg
    assert "gone20" not in msg and "(and 3 more)" in msg
    found, missing = locate_images(splits, root, "c.json", skip_missing=True)
    assert len(missing) == 23
    assert list(found) == ["train"]                  # test lost every image
    assert [i.path for i in found["train"]] == ["val2014/a.jpg", "b.jpg"]
    with pytest.raises(DataError, match="image folder not found"):
        locate_images(splits, tmp_path / "nowhere", "c.json")
