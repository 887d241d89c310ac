"""Tables for docs/ablation-components.md from finished ablation folders.

    python scripts/component_report.py runs/ablation_components [more ablation folders ...]
        [--data data/demo] [--diagnostics-only]

Reads each folder's ``ablation.csv``; computes (and caches as ``diagnostics.json`` in every cell)
the diagnostics of each cell's tested checkpoint; prints markdown: the cells (mean ± sd over
seeds, with key diagnostics), the component steps with paired bootstrap intervals
(:func:`userlab.ablation.component_steps`), t2i R@1 by caption kind, twin confusion and the
one-caption-per-image recall of each backbone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from userlab import ablation
from userlab import diagnostics as dg


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def cell_report(run_dir: str, data_root: str, tag: str) -> dict:
    path = Path(run_dir) / dg.DIAGNOSTICS_FILE
    if path.is_file():
        report = json.loads(path.read_text())
        if all(k in report for k in ("single_caption", "centred", "twins", "recall_by_group")):
            return report
    report = dg.diagnose_run(run_dir, split="test", data_root=data_root, tag=tag)
    dg.write_report(report, path)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--diagnostics-only", action="store_true")
    args = p.parse_args()
    frames = []
    for folder in args.folders:
        df = ablation.read_results(Path(folder) / ablation.RESULTS_FILE)
        df["grid"] = Path(folder).name
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    # variants run in their own folders get their own names, so that steps can pair them
    variant = {"ablation_attention_l2": "+SGE, l2 attention (lambda 10)",
               "ablation_dbl_alpha": "full USER + DBL absolute (alpha 1/64)",
               "ablation_dbl_alpha4096": "full USER + DBL absolute (alpha 1/4096)",
               "ablation_ladder_l2": "full USER, l2 attention (lambda 10)"}
    for grid, name in variant.items():
        df.loc[df["grid"] == grid, "backbone"] = name
        df.loc[df["grid"] == grid, "strategy"] = "none"
    df = df[df["strategy"] == "none"]   # DBL / distillation / mutual cells: scripts/dbl_report.py
    rows = []
    for _, r in df.iterrows():
        rep = cell_report(r["run_dir"], args.data, r["tag"])
        key = dg.key_numbers(rep)
        rg = {f"R@1 {x['group']}": x["R@1"] for x in rep["recall_by_group"]["rows"]}
        sc = rep["single_caption"]
        rows.append({"grid": r["grid"], "backbone": r["backbone"], "strategy": r["strategy"], "seed": r["seed"],
                     "rsum": r["rsum"], "i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"],
                     "train_s": r["train_seconds"], **key, **rg,
                     "i2t_R@1_1cap": sc["i2t_R@1"], "t2i_R@1_1cap": sc["t2i_R@1"],
                     "t2i_R@1_centred": rep["centred"]["t2i_R@1"], "i2t_R@1_centred": rep["centred"]["i2t_R@1"],
                     "twin_share_i2t": rep["twins"]["i2t"]["share_of_errors"],
                     "beta_top": rep["attention"].get("beta", {}).get("max_weight", np.nan),
                     "region_change_%": 100 * rep["attention"].get("beta", {}).get("max_region_change", np.nan)})
    cells = pd.DataFrame(rows)
    if args.diagnostics_only:
        print(cells.to_string())
        return
    group = cells.groupby(["grid", "backbone", "strategy"], sort=False)
    mean, std, n = group.mean(numeric_only=True), group.std(numeric_only=True), group.size()

    def pm(col, d=1):
        return [f"{m:.{d}f} ± {s:.{d}f}" if not np.isnan(s) else f"{m:.{d}f}" for m, s in zip(mean[col], std[col])]

    out = pd.DataFrame({"seeds": n})
    for col, d in (("rsum", 1), ("i2t_R@1", 1), ("t2i_R@1", 1), ("hub_skew_t2i", 2), ("hub_skew_i2t", 2),
                   ("modality_gap", 3), ("pos_sim", 3), ("neg_sim", 3), ("collapse", 2), ("beta_entropy", 2),
                   ("beta_top", 2), ("region_change_%", 1), ("alpha_entropy", 2), ("train_s", 0)):
        if col in mean:
            out[col] = pm(col, d)
    print("## cells\n")
    print(markdown(out.reset_index()))
    kinds = [c for c in mean.columns if c.startswith("R@1 ")]
    print("\n## t2i R@1 by caption kind, twin confusion, one caption per image (means over seeds)\n")
    print(markdown(mean[kinds + ["twin_share_t2i", "twin_share_i2t", "i2t_R@1_1cap", "t2i_R@1_1cap",
                                   "t2i_R@1_centred", "i2t_R@1_centred"]]
                   .reset_index()))
    steps = ablation.component_steps(df, steps=ablation.COMPONENT_STEPS + (
        ("+SGE, l2 attention (lambda 10)", "+SGE"), ("+SGE, l2 attention (lambda 10)", "VSE++"),
        ("full USER + DBL absolute (alpha 1/64)", "full USER"),
        ("full USER + DBL absolute (alpha 1/4096)", "full USER"),
        ("full USER, l2 attention (lambda 10)", "full USER"), ("full USER, l2 attention (lambda 10)", "+CGE")))
    if len(steps):
        print("\n## component steps\n")
        print(ablation.format_steps(steps))
    cells.to_csv(Path(args.folders[0]) / "cells_with_diagnostics.csv", index=False)


if __name__ == "__main__":
    main()
