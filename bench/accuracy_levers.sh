#!/usr/bin/env bash
# Equal-accuracy check for the training-speed levers (issue 15): the demo's USER and VSE++ runs on
# a reduced but fixed budget (first 1500 train images, the preset's 2 epochs, full 500-image dev
# set), with optim.amp=off (fp32) and optim.amp=auto (bf16 on CPUs with native bf16), seeds 1-3.
# Writes <out>/<preset>_<amp>_s<seed>/ (eval_log.csv holds dev rSum per epoch) and <out>/times.txt.
# Usage: [AMPS="off auto"] bench/accuracy_levers.sh OUT PRESET [SEEDS...]   (from the repository root)
set -euo pipefail
out=$1; preset=$2; shift 2
seeds=${*:-1 2 3}
amps=${AMPS:-off auto}
mkdir -p "$out"
for seed in $seeds; do
  for amp in $amps; do
    run="$out/${preset}_${amp}_s${seed}"
    start=$(date +%s)
    OMP_NUM_THREADS=1 nice -n 10 "${PY:-python}" -m userlab train --preset "$preset" --data data/demo \
      --run-dir "$run" --no-resume --no-progress \
      --set data.train_max_images=1500 --set optim.seed="$seed" --set optim.amp="$amp" > "$run.log" 2>&1
    echo "$preset amp=$amp seed=$seed wall_s=$(( $(date +%s) - start )) $(tail -1 "$run.log")" >> "$out/times.txt"
  done
done
