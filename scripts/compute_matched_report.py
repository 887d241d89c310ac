"""Equal epochs vs equal compute on the demo: full USER and VSE++ at 2 and 4 epochs (the table in
docs/ablation-components.md). Run from the project root after the ablation folders it reads exist."""
import pandas as pd
from pathlib import Path
from userlab import ablation
frames=[]
for folder, suffix in (("runs/ablation_ladder_demo", ""), ("runs/ablation_vsepp_4ep", ", 4 epochs"), ("runs/ablation_user_4ep", ", 4 epochs")):
    df = ablation.read_results(Path(folder) / ablation.RESULTS_FILE)
    df = df[df["strategy"] == "none"].copy()
    df["backbone"] = df["backbone"] + suffix
    frames.append(df)
df = pd.concat(frames, ignore_index=True)
g = df.groupby("backbone")
print("| arm | seeds | test rSum | per seed |")
print("|---|---:|---:|---|")
for b in ("VSE++", "full USER", "VSE++, 4 epochs", "full USER, 4 epochs"):
    r = df[df.backbone == b].sort_values("seed")
    print(f"| {b} | {len(r)} | {r.rsum.mean():.1f} ± {r.rsum.std():.1f} | {' '.join(f'{v:.1f}' for v in r.rsum)} |")
print()
steps = ablation.component_steps(df, steps=(("full USER, 4 epochs", "VSE++, 4 epochs"), ("VSE++, 4 epochs", "full USER"),
                                            ("full USER, 4 epochs", "full USER")))
print(ablation.format_steps(steps))
