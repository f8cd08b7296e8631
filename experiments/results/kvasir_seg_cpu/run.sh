#!/usr/bin/env bash
# Kvasir-SEG at CPU scale: U-Net (features 32, 30 epochs) and UNet++ (features 16, 20 epochs) at 128x128, float32,
# batch 8, on the official 880/120 split (best checkpoint chosen on a 10% validation holdout of the 880; the 120 test images
# are scored once, at the end, with `evaluate --split=test --checkpoint=best`). Run from the repository root:
#
#   KV=../shared/kvasir_seg DATA=$HOME/tensorflow_datasets ROOT=runs/kvasir_cpu bash experiments/results/kvasir_seg_cpu/run.sh
#
# About an hour of this 2-core CPU per model (UNet++ got 20 epochs to fit it; EPOCHS_UNET / EPOCHS_UNETPP change them).
# CPU-scale: narrow models, 128 px, 20-30 epochs on a 2-core CPU. These are NOT the method's figures (the published
# 256 px baselines train full-width models far longer on a GPU; see experiments/gpu/).
set -euo pipefail
KV=${KV:-../shared/kvasir_seg}
DATA=${DATA:-$HOME/tensorflow_datasets}
ROOT=${ROOT:-runs/kvasir_cpu}
OUT=${OUT:-experiments/results/kvasir_seg_cpu}
EPOCHS_UNET=${EPOCHS_UNET:-30}
EPOCHS_UNETPP=${EPOCHS_UNETPP:-20}
PY=${PY:-python}
COMMON=(--config.dataset.builder_kwargs.source_dir="$KV" --config.dataset.data_dir="$DATA" --config.compilation_cache_dir=)
train_and_score() {  # name config features epochs
  "$PY" -m anemia_jax.main --config="configs/$2.py:data=kvasir,size=128,batch=8,dtype=float32,epochs=$4" \
    --config.model.features="$3" "${COMMON[@]}" --workdir="$ROOT/$1"
  "$PY" -m anemia_jax.evaluate --workdir="$ROOT/$1" --split=test --checkpoint=best --out="$OUT/$1/test"
}
train_and_score unet unet 32 "$EPOCHS_UNET"
train_and_score unetpp unetpp 16 "$EPOCHS_UNETPP"
"$PY" -m experiments.training_curves --workdir="$ROOT/unet" --workdir="$ROOT/unetpp" --labels="U-Net (f32),UNet++ (f16)" \
  --metric=dice/mask --title="Kvasir-SEG, CPU scale: 128 px, batch 8" --out="$OUT/training_curves.png"
