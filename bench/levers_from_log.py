"""Table of a bench_train_step.py run from its progress lines (for a run stopped before its end).

    python bench/levers_from_log.py bench_grid.out     # markdown: median CPU and wall s/step per lever

Reads the ``repeat N SIZE BACKBONE LEVER: cpu X s/step, wall Y, load ...`` lines the benchmark
prints after each (size, backbone) group; peak RSS is not in those lines, so it is not reported.
"""
from __future__ import annotations

import re
import statistics
import sys

LINE = re.compile(r"repeat (\d+) (\S+) (USER|VSE\+\+) (.+?): cpu ([\d.]+) s/step, wall ([\d.]+), load (.+)$")


def main(path: str) -> int:
    runs: dict[tuple, list[tuple[float, float]]] = {}
    loads = []
    for line in open(path, encoding="utf-8"):
        m = LINE.search(line.strip())
        if m:
            runs.setdefault((m[2], m[3], m[4]), []).append((float(m[5]), float(m[6])))
            loads.append(m[7])
    print(f"load averages seen: {loads[0]} ... {loads[-1]}" if loads else "no progress lines")
    print("| size | backbone | lever (cumulative) | repeats | CPU s/step | speed-up (CPU) | runs (CPU s/step) | wall s/step |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for (size, backbone, lever), vals in runs.items():
        base = statistics.median(v[0] for v in runs[(size, backbone, "fp32 (before)")])
        cpu = statistics.median(v[0] for v in vals)
        print(f"| {size} | {backbone} | {lever} | {len(vals)} | {cpu:.3f} | {base / cpu:.2f}x | "
              f"{', '.join('%.3f' % v[0] for v in vals)} | {statistics.median(v[1] for v in vals):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
