#!/usr/bin/env bash
# The one-call GPU sitting (issue 13): in under 9 minutes of one device call,
#   1. python -m experiments.benchmark beside the PyTorch peer (eager and torch.compile) for UNet++ and U-Net
#      (configs/unetpp.py, configs/unet.py; one head, as the peer): train step at batch 32, 256x256, bfloat16, with
#      the time to first step cold and with the compilation cache warm;
#   2. U-Net and UNet++ trained at once on Kvasir-SEG's official 880/120 split at 256x256 (best checkpoint chosen on
#      the trainer's validation holdout of the 880) for as many steps as the minutes left allow, then the 120 test
#      images scored with `python -m anemia_jax.evaluate --split=test --checkpoint=best`;
#   3. a short table printed LAST (ratios, first step, Kvasir test Dice/IoU, epochs), targets beside the figures.
# Runbook (how to prepare, the exact device call, where the figures go): experiments/gpu/NOTES.md.
#
#   bash experiments/gpu/run_device.sh        # from the repository root, with .whl/ and .device/ carried
#
# Everything lands under $OUT (6 files, within the device's 8-file limit): log.txt (every stage's output),
# bench_unetpp.json and bench_unet.json (the benchmark's own rows), kvasir.tar.gz (each run's metrics.jsonl,
# summary.json, config.json, TensorBoard events, last panel, trainer log, and the test split's per_image.csv and
# summary), sitting.json (the record to commit: card, versions, commands, git state, every figure, the targets) and
# table.txt. Nothing stops the script before the table: a stage that fails is logged and shows as missing.
#
# Knobs (environment), defaults for the device: BUDGET_S=525 (seconds the whole script may take, wheel unpacking
# included), STAGES=bench,kvasir, SKIP_WHEELS= (1: use the Python environment as it is), WHEEL_DIR=.whl,
# PROTOBUF_MIN=6.33.5 (an older protobuf on the device is replaced by the carried one in .whl/fallback),
# PEER=.device/peer_bench.py ('' skips the peer), BENCH_CONFIG=size=256,batch=32,dtype=bfloat16 (the benchmarks'
# config argument: --config=configs/<model>.py:$BENCH_CONFIG), BENCH_ARGS (extra benchmark flags, e.g.
# --config.model.features=8 --steps=1; last wins), BENCH_MAX_S=260
# (each benchmark's time limit), KVASIR_MIN_S=200 (seconds kept for Kvasir when sizing the benchmarks),
# KVASIR_SIZE=256, KVASIR_BATCH=16, KVASIR_ARGS (extra trainer flags), KVASIR_STEPS (fixed steps instead of the
# time-based plan), KVASIR_RATE_FACTOR=0.35, KVASIR_EVAL_S=50, KVASIR_DATA_DIR=.device/tfds, MEM_FRACTION=0.45 (of
# the card per Kvasir process), WORK (scratch, default /tmp/gpu_sitting). A CPU rehearsal: NOTES.md ("Rehearsal").
set -u -o pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
knobs=""  # the knobs given (before defaults), for the recorded command
for v in BUDGET_S STAGES SKIP_WHEELS WHEEL_DIR PROTOBUF_MIN PEER BENCH_CONFIG BENCH_ARGS BENCH_MAX_S KVASIR_MIN_S \
         KVASIR_SIZE KVASIR_BATCH KVASIR_ARGS KVASIR_STEPS KVASIR_RATE_FACTOR KVASIR_EVAL_S KVASIR_DATA_DIR \
         MEM_FRACTION; do
  if [ -n "${!v+x}" ]; then
    if [[ ${!v} =~ ^[A-Za-z0-9_.,:/=+-]+$ ]]; then knobs+="$v=${!v} "; else knobs+="$v=$(printf %q "${!v}") "; fi
  fi
done
COMMAND="${knobs}bash experiments/gpu/run_device.sh"
BUDGET_S=${BUDGET_S:-525}
STAGES=${STAGES:-bench,kvasir}
OUT=${OUT:-/tmp/gpu_sitting_out}
WORK=${WORK:-/tmp/gpu_sitting}
PEER=${PEER-.device/peer_bench.py}
KVASIR_MIN_S=${KVASIR_MIN_S:-200}
KVASIR_DATA_DIR=$(realpath -m "${KVASIR_DATA_DIR:-.device/tfds}")
export KVASIR_DATA_DIR
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1

now() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(now) )); }
log() { echo "[$(now)s] $*" | tee -a "$OUT/log.txt"; }
stage_done() { echo "$1 $(( $(date +%s) - $2 ))" >> "$WORK/stages.txt"; }
min() { echo $(( $1 < $2 ? $1 : $2 )); }
log "sitting: $COMMAND (budget ${BUDGET_S}s; out $OUT)"

# Wheels are zip archives: extracting them is an install that cannot half-fail (a pip --target install of
# ml_collections there once failed without a word). They come first on the path, before the device's own packages,
# which is why prepare.sh carries only packages that the device's image lacks.
if [ -z "${SKIP_WHEELS:-}" ]; then
  t=$(date +%s)
  python3 -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$WORK/site" "${WHEEL_DIR:-.whl}"/*.whl 2>&1 | tee -a "$OUT/log.txt"
  # TFDS's metadata protos need protobuf >= PROTOBUF_MIN; the device's own is kept unless it is older.
  fallback=$(ls "${WHEEL_DIR:-.whl}"/fallback/protobuf-*.whl 2>/dev/null | head -n 1)
  if [ -n "$fallback" ] && ! python3 -c 'import sys, google.protobuf as p
sys.exit(tuple(int(x) for x in p.__version__.split(".")[:3]) < tuple(int(x) for x in sys.argv[1].split(".")))' \
      "${PROTOBUF_MIN:-6.33.5}" 2>/dev/null; then
    log "the device's protobuf is older than ${PROTOBUF_MIN:-6.33.5}: using the carried $(basename "$fallback")"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[2]).extractall(sys.argv[1])' "$WORK/site" "$fallback"
  fi
  export PYTHONPATH=$WORK/site:$PWD
  stage_done wheels "$t"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
t=$(date +%s)
python3 experiments/gpu/sitting.py env --out="$WORK/env.json" 2>&1 | tail -n 3 | tee -a "$OUT/log.txt"
stage_done environment "$t"

# ---------------------------------------------------------------------------------------------- 1. benchmark
bench() {  # model, peer runs (comma list), warm (1: also the warm-cache first step), time limit in seconds
  local m=$1 runs=$2 warm=$3 limit=$4 t
  if (( limit < 30 )); then log "benchmark $m skipped: ${limit}s is too little"; return; fi
  t=$(date +%s)
  local extra=()
  [ -n "$PEER" ] && [ -n "$runs" ] && extra+=(--peer="$PEER" --peer_runs="$runs")
  [ "$warm" = 1 ] || extra+=(--no_warm)
  log "benchmark $m beside torch ${runs:-(no peer)}, warm cache: $warm, at most ${limit}s"
  # shellcheck disable=SC2086 -- BENCH_ARGS is a list of flags
  timeout -k 10 "$limit" python3 -m experiments.benchmark \
    "--config=configs/$m.py:${BENCH_CONFIG:-size=256,batch=32,dtype=bfloat16}" \
    ${BENCH_ARGS:-} "${extra[@]}" --out="$OUT/bench_$m.json" >> "$OUT/log.txt" 2>&1 \
    || log "benchmark $m failed or ran out of time (exit $?); the rows it had not finished are missing"
  stage_done "bench_$m" "$t"
}
if [[ ,$STAGES, == *,bench,* ]]; then
  bench unetpp eager,compile 1 "$(min "${BENCH_MAX_S:-260}" $(( $(left) - KVASIR_MIN_S )))"
  # U-Net gets what keeps KVASIR_MIN_S for Kvasir: everything if there is ample room (a benchmark killed at its
  # limit loses the rows it had not finished), else our run and the peer's eager run alone (U-Net's target is the
  # ratio to eager), else nothing.
  room=$(( $(left) - KVASIR_MIN_S ))
  if (( room >= 200 )); then bench unet eager,compile 1 "$(min "${BENCH_MAX_S:-260}" "$room")"
  elif (( room >= 100 )); then bench unet eager 0 "$room"
  else log "benchmark unet skipped: ${room}s beyond the Kvasir reserve"; fi
fi

# ---------------------------------------------------------------------------------------------- 2. Kvasir-SEG
if [[ ,$STAGES, == *,kvasir,* ]]; then
  t=$(date +%s)
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.45}  # two processes share the card
  size=${KVASIR_SIZE:-256}; batch=${KVASIR_BATCH:-16}; eval_s=${KVASIR_EVAL_S:-50}
  declare -A pids
  for m in unet unetpp; do
    read -r steps every deadline < <(python3 experiments/gpu/sitting.py plan --model=$m --left="$(left)" \
      --bench_dir="$OUT" --batch="$batch" --rate_factor="${KVASIR_RATE_FACTOR:-0.35}" --eval_s="$eval_s" \
      --steps="${KVASIR_STEPS:-0}" --out="$WORK/plan_$m.json")
    if [ -z "${deadline:-}" ]; then log "kvasir $m: planning failed"; continue; fi
    cmd=(python3 -m anemia_jax.main "--config=configs/$m.py:data=kvasir,size=$size,batch=$batch,steps=$steps"
         "--workdir=$WORK/kvasir_$m" "--config.dataset.data_dir=$KVASIR_DATA_DIR"
         "--config.eval_every_steps=$every" "--config.checkpoint_every_steps=$every" --config.keep_checkpoints=1)
    # shellcheck disable=SC2206 -- KVASIR_ARGS is a list of flags
    cmd+=(${KVASIR_ARGS:-})
    log "kvasir $m: $steps steps ($(python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(
      f\"{p['epochs']} epochs, fixed by KVASIR_STEPS\" if p['steps_given'] else f\"{p['epochs']} epochs planned at \"
      f\"{p['rate_images_per_s']} img/s ({p['rate_source']}) after {p['overhead_s']}s of start-up and final \"
      f\"scoring\")" "$WORK/plan_$m.json")), SIGTERM after ${deadline}s"
    python3 experiments/gpu/sitting.py note "$WORK/commands_$m.json" trainer_command "${cmd[@]}"
    # SIGTERM makes the trainer save a checkpoint and stop; the best one is then still scored below.
    timeout -s TERM -k 30 "$deadline" "${cmd[@]}" > "$WORK/train_$m.log" 2>&1 &
    pids[$m]=$!
  done
  for m in "${!pids[@]}"; do
    wait "${pids[$m]}"; rc=$?
    case $rc in 0) why="finished";; 124) why="stopped by SIGTERM at its deadline";;
      137) why="killed: still running 30 s after its SIGTERM";; *) why="FAILED";; esac
    python3 experiments/gpu/sitting.py note "$WORK/commands_$m.json" trainer_exit "$rc"
    log "kvasir $m trainer exit $rc ($why): $( (grep -E 'First step|best test' "$WORK/train_$m.log" | tail -n 2
      [ "$rc" = 0 ] || tail -n 4 "$WORK/train_$m.log") | cut -c1-300)"
  done
  stage_done kvasir_train "$t"
  t=$(date +%s)
  # At least a minute even past the budget (525 s of the call's 600): a run without its test score is the worse loss.
  limit=$(( $(left) - 10 )); (( limit >= 60 )) || limit=60
  for m in "${!pids[@]}"; do
    if [ ! -f "$WORK/kvasir_$m/config.json" ]; then log "kvasir $m: no run to score"; continue; fi
    (
      ev=(python3 -m anemia_jax.evaluate "--workdir=$WORK/kvasir_$m" --split=test --checkpoint=best
          "--out=$WORK/kvasir_$m/eval_test")
      timeout -k 10 "$limit" "${ev[@]}" > "$WORK/eval_$m.log" 2>&1; rc=$?
      if (( rc != 0 && rc != 124 && rc != 137 )); then
        # A run stopped before any evaluation has no 'best'; its latest checkpoint is scored instead, and says so.
        ev[5]=--checkpoint=latest
        timeout -k 10 "$limit" "${ev[@]}" >> "$WORK/eval_$m.log" 2>&1
      fi
      python3 experiments/gpu/sitting.py note "$WORK/commands_$m.json" evaluate_command "${ev[@]}"
      tail -n 2 "$WORK/eval_$m.log"
    ) 2>&1 | tee -a "$OUT/log.txt" &
  done
  wait
  stage_done kvasir_test "$t"
  for m in unet unetpp; do cat "$WORK/train_$m.log" "$WORK/eval_$m.log" >> "$OUT/log.txt" 2>/dev/null; done
fi

# ---------------------------------------------------------------------------------------------- 3. report
python3 experiments/gpu/sitting.py bundle --work="$WORK" --out="$OUT/kvasir.tar.gz" 2>&1 | tee -a "$OUT/log.txt"
log "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')sitting.json table.txt"
python3 experiments/gpu/sitting.py report --work="$WORK" --out="$OUT" --budget_s="$BUDGET_S" --wall_s="$(now)" \
  --command="$COMMAND" 2>&1 | tee -a "$OUT/log.txt"
