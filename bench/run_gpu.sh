#!/usr/bin/env bash
# The GPU checks of issue 15 in one command, on a CUDA machine, from the repository root:
# F30K-sized training per AMP mode (features resident vs from disk), COCO-5K evaluation, and the
# training step at the original authors' sizes (batch 128, 36 x 2048, embed 1024, queue 2048).
# Both append their sections to bench/RESULTS.md. About 10 minutes on an H200 (estimate: not yet run).
set -euo pipefail
PY=${PY:-python}
"$PY" bench/bench_gpu.py "$@"
"$PY" bench/bench_train_step.py --device cuda --sizes issue --steps 20 --warmup 5 --repeats 3 --threads 4
