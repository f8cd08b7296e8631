#!/usr/bin/env bash
# Kvasir-SEG at CPU scale (issue 20): six model families, and the recipe questions on U-Net, on the official 880/120
# split at 128x128, float32, batch 8, every row with the SAME training budget: EPOCHS (12) epochs of the 792 training
# images (1188 steps), the configs' recipe (AdamW 1e-3, 2 warm-up epochs, cosine decay, combo loss, default
# augmentation) unless the row changes it, seed 0, every model from random initialisation (no pretrained weights are
# reachable here: the ResNet-34 encoder too starts from random init). Widths are chosen so that one train step costs
# about the same CPU time (0.97-1.49 CPU-s per step of 8 images, measured beforehand; see README.md). The best
# checkpoint is chosen on the 88-image validation holdout (evaluated every epoch); the 120 test images are scored once,
# at the end, with `evaluate --split=test --checkpoint=best`. Run from anywhere in the repository, niced:
#
#   nice -n 19 bash experiments/results/kvasir_seg_cpu_models/run.sh
#
# It continues where it stopped: a row with its test scores is skipped, a row whose training finished is only scored,
# an unfinished training resumes from its last checkpoint (same workdir). Every training and evaluation is wrapped in
# `experiments.run_record` (command, commit, machine, load, wall and CPU time, appended to <row>/runs.jsonl).
# ROWS="unet segformer" limits it to some rows (in this order); the table and figure are remade from what is finished.
# CPU-scale: narrow models, 128 px, 12 epochs on a 2-core CPU; NOT the method's figures (see experiments/gpu/).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
KV=$(realpath "${KV:-../shared/kvasir_seg}")
DATA=$(realpath -m "${DATA:-runs/tfds}")
ROOT=$(realpath -m "${ROOT:-runs/kvasir_cpu_models}")
OUT=${OUT:-experiments/results/kvasir_seg_cpu_models}
EPOCHS=${EPOCHS:-12}
PY=${PY:-python}
ALL="unet unetpp attention_unet unet_resnet34 segformer transunet unet_noaug unet_dice unet_focal_tversky unet_bce"
ROWS=${ROWS:-$ALL}
COMMON=(--config.dataset.builder_kwargs.source_dir="$KV" --config.dataset.data_dir="$DATA"
        --config.compilation_cache_dir= --config.eval_every_epochs=1 --config.checkpoint_every_epochs=1)
# TransUNet reduced as in ../phantom_cpu_models/ (R50 stages (2, 2, 2) of width 32, ViT 4 layers, hidden 192).
TRANSUNET=(--config.model.hidden_size=192 --config.model.num_layers=4 --config.model.num_heads=3
           --config.model.mlp_dim=768 "--config.model.resnet_layers=(2, 2, 2)" --config.model.resnet_width=32
           "--config.model.decoder_channels=(128, 64, 32, 16)" --config.model.head_channels=256)

record() {  # row label command...
  local row=$1 label=$2
  shift 2
  "$PY" -m experiments.run_record --out="$OUT/$row/runs.jsonl" --label="$label" -- "$@"
}
trained() {  # workdir: has the training completed?
  "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "completed")' \
    "$1/summary.json" 2>/dev/null
}
row() {  # name config overrides...
  local name=$1 config=$2
  shift 2
  if [ -f "$OUT/$name/test/per_image.csv" ]; then echo "$name: scored, skipped"; return; fi
  if ! trained "$ROOT/$name"; then
    record "$name" train "$PY" -m anemia_jax.main \
      --config="configs/$config.py:data=kvasir,size=128,batch=8,dtype=float32,epochs=$EPOCHS" "${COMMON[@]}" "$@" \
      --workdir="$ROOT/$name"
  fi
  trained "$ROOT/$name" || { echo "$name: training did not complete; rerun this script to resume it" >&2; exit 1; }
  mkdir -p "$OUT/$name"
  cp "$ROOT/$name/config.json" "$ROOT/$name/metrics.jsonl" "$OUT/$name/"
  cp "$ROOT/$name/summary.json" "$OUT/$name/training_summary.json"
  record "$name" evaluate "$PY" -m anemia_jax.evaluate --workdir="$ROOT/$name" --split=test --checkpoint=best \
    --out="$OUT/$name/test"
}
for name in $ROWS; do
  case $name in
    unet) row unet unet --config.model.features=24 ;;
    unetpp) row unetpp unetpp --config.model.features=12 ;;
    attention_unet) row attention_unet attention_unet --config.model.features=24 ;;
    unet_resnet34) row unet_resnet34 unet_resnet34 ;;
    segformer) row segformer segformer ;;
    transunet) row transunet transunet "${TRANSUNET[@]}" ;;
    unet_noaug) row unet_noaug unet --config.model.features=24 --config.augment.enabled=False ;;
    unet_dice) row unet_dice unet --config.model.features=24 --config.loss.name=dice ;;
    unet_focal_tversky) row unet_focal_tversky unet --config.model.features=24 --config.loss.name=focal_tversky ;;
    unet_bce) row unet_bce unet --config.model.features=24 --config.loss.name=sigmoid_cross_entropy ;;
    *) echo "unknown row $name (rows: $ALL)" >&2; exit 2 ;;
  esac
done
"$PY" -m experiments.kvasir_table --results="$OUT" --workdir_root="$ROOT"
