#!/usr/bin/env bash
# One H100 sitting: the throughput benchmark beside the PyTorch peer, then Kvasir-SEG training of U-Net and
# UNet++ on the official 880/120 split, sized to the time left. Run from the repository root on the device
# machine, with `.whl` (TFDS, ml_collections and their small dependencies as wheels) and `.device`
# (peer_bench.py and the prepared `image_mask_folder/kvasir_seg_256` TFDS data) carried beside the checkout.
#
#   bash experiments/h100/run_device.sh            # writes results under $OUT (default /tmp/out)
#
# Environment knobs (used to rehearse the script on a CPU first): SKIP_WHEELS=1, BENCH_ARGS (extra
# benchmark flags), BUDGET_S (seconds the whole script may take, default 560), KVASIR_EXTRA (extra trainer
# flags), PEER (path of peer_bench.py, '' to skip the peer).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
START=$(date +%s); BUDGET_S=${BUDGET_S:-560}
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }
if [ -z "${SKIP_WHEELS:-}" ]; then
  # Wheels are zip files: unpacking them is an install that cannot half-fail (a pip --target install of
  # ml_collections there once failed without a word).
  for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site || { echo "cannot unpack $w"; exit 1; }; done
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import jax, flax, optax, orbax.checkpoint, tensorflow_datasets, ml_collections, numpy
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax",
      orbax.checkpoint.__version__, "tfds", tensorflow_datasets.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/log.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/log.txt"

PEER=${PEER-.device/peer_bench.py}
peer_flag() { [ -n "$PEER" ] && echo "--peer=$PEER --peer_runs=$1"; }
log "benchmark unetpp"
python3 experiments/benchmark.py --model=unetpp $(peer_flag eager,compile) ${BENCH_ARGS:-} \
  --out="$OUT/bench_unetpp.json" 2>&1 | tail -n 12 | tee -a "$OUT/log.txt"
log "benchmark unet"
python3 experiments/benchmark.py --model=unet --no_warm $(peer_flag eager) ${BENCH_ARGS:-} \
  --out="$OUT/bench_unet.json" 2>&1 | tail -n 12 | tee -a "$OUT/log.txt"

# Kvasir-SEG: both models at once (the GPU has room for two), each given the time that is left.
left=$(( BUDGET_S - ($(date +%s) - START) ))
# Epochs that fit: ~150 s for start-up, compilation and the final evaluation, then a conservative 300 img/s
# per run for the 792 training images (two runs share the GPU); KVASIR_EPOCHS overrides.
epochs=${KVASIR_EPOCHS:-$(python3 -c "print(max(10, min(150, int(($left - 150) * 300 / 792))))")}
log "kvasir: ${left}s left, ${epochs} epochs"
for m in unet unetpp; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout -s TERM $(( left - 15 )) python3 -m anemia_jax.main \
    --config=configs/$m.py:data=kvasir,size=256,batch=16,epochs=$epochs \
    --config.dataset.data_dir=.device/tfds --config.checkpoint_every_epochs=10 ${KVASIR_EXTRA:-} \
    --workdir=/tmp/kvasir_$m > "/tmp/kvasir_$m.log" 2>&1 &
done
wait
for m in unet unetpp; do
  tail -n 5 "/tmp/kvasir_$m.log" | tee -a "$OUT/log.txt"
  cp "/tmp/kvasir_$m/metrics.jsonl" "$OUT/kvasir_${m}_metrics.jsonl" 2>/dev/null
  cp "/tmp/kvasir_$m/summary.json" "$OUT/kvasir_${m}_summary.json" 2>/dev/null
done
log "done"
python3 - "$OUT" <<'PY' | tee -a "$OUT/log.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("bench_*.json")):
    for r in json.loads(f.read_text()):
        print(f"{r['framework']:<20} {r['arch']:<7} {r.get('images_per_s') or float('nan'):8.1f} img/s  "
              f"first step {r.get('first_step_cold_s', r.get('compile_s', float('nan'))):6.1f}s"
              + (f" (warm {r['first_step_warm_s']:.1f}s)" if 'first_step_warm_s' in r else ""))
for f in sorted(out.glob("kvasir_*_summary.json")):
    s = json.loads(f.read_text())
    print(f.name, json.dumps({k: s[k] for k in s if k in ("best", "final", "test", "steps")})[:600])
PY
