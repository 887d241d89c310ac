"""Why is dev rSum higher than test rSum on the demo? Measure it.

Usage::

    python scripts/dev_test_gap.py RUN [RUN ...] [--data data/demo]

Prints, per run: rSum on dev (all of it, as the Trainer evaluates it), on the whole test split,
and on test cut to the dev size (first and second half of 500 images); and, for the data: split
sizes, twin pairs per split, and how many dev / test captions and object sets also occur in train.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from userlab.data.precomp import find_precomp_dir
from userlab.evaluate import evaluate_sims, similarity
from userlab.runs import encode_run, load_run


def data_facts(root: str) -> dict:
    folder = find_precomp_dir(root)
    scenes = {s: json.loads((folder / f"scenes_{s}.json").read_text())["scenes"] for s in ("train", "dev", "test")}
    train_caps = {c.lower().rstrip(".") for sc in scenes["train"] for c in sc["captions"]}
    train_sets = Counter(tuple(sorted((o["shape"], o["colour"], o["size"]) for o in sc["objects"]))
                         for sc in scenes["train"])
    out = {}
    for split in ("dev", "test"):
        sc = scenes[split]
        caps = [c.lower().rstrip(".") for s in sc for c in s["captions"]]
        sets = [tuple(sorted((o["shape"], o["colour"], o["size"]) for o in s["objects"])) for s in sc]
        out[split] = {"images": len(sc), "twin_pairs": sum(s["twin_of"] is not None for s in sc),
                      "captions_seen_in_train_%": 100 * sum(c in train_caps for c in caps) / len(caps),
                      "object_sets_seen_in_train_%": 100 * sum(s in train_sets for s in sets) / len(sets),
                      "mean_objects": sum(len(s["objects"]) for s in sc) / len(sc)}
    return out


def run_gap(run_dir: str, root: str) -> dict:
    run = load_run(run_dir)
    out = {}
    for split in ("dev", "test"):
        img, cap, _ = encode_run(run, split=split, data_root=root, progress=False)
        sims = similarity(img, cap).cpu()
        n = sims.shape[0]
        out[f"{split}_all_{n}"] = float(evaluate_sims(sims)["rsum"].iloc[0])
        if split == "test":
            half = n // 2
            out[f"test_first_{half}"] = float(evaluate_sims(sims[:half, :5 * half])["rsum"].iloc[0])
            out[f"test_last_{n - half}"] = float(evaluate_sims(sims[half:, 5 * half:])["rsum"].iloc[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*")
    p.add_argument("--data", default="data/demo")
    args = p.parse_args()
    print(json.dumps({"data": data_facts(args.data)}, indent=1))
    for r in args.runs:
        print(r, json.dumps({k: round(v, 1) for k, v in run_gap(r, args.data).items()}))


if __name__ == "__main__":
    main()
