#!/usr/bin/env bash
# The "after" side of experiments/results/cpu_speed: the train step (batch 8, 128², float32) of UNet++ and U-Net
# beside the PyTorch peer (eager), each model twice, on this CPU; every run records its command, commit, machine,
# versions, XLA_FLAGS and the load average in its JSON. Usage, from the repository root:
#
#   bash experiments/results/cpu_speed/run.sh [OUT_DIR] [REPEATS]    # default experiments/results/cpu_speed/after, 2
#
# The peer script lives beside the checkout (../shared/tools/peer_bench.py); torch's CPU wheel must be installed.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=${1:-experiments/results/cpu_speed/after}
REPEATS=${2:-2}
PY=${PY:-.venv/bin/python}
PEER=${PEER:-../shared/tools/peer_bench.py}
mkdir -p "$OUT"
for rep in $(seq 1 "$REPEATS"); do
  for model in unetpp unet; do
    echo "== $model, run $rep; uptime: $(uptime)" | tee -a "$OUT/uptime.log"
    "$PY" -m experiments.benchmark "--config=configs/$model.py:size=128,batch=8,dtype=float32" --steps=4 \
      --windows=3 --warmup=1 --peer="$PEER" --peer_runs=eager --out="$OUT/${model}_run${rep}.json" \
      | tee "$OUT/${model}_run${rep}.log"
  done
done
echo "== done; uptime: $(uptime)" | tee -a "$OUT/uptime.log"
