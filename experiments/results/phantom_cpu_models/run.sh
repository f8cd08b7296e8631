#!/usr/bin/env bash
# Phantom 5-fold patient-level CV of the five model families at 64 px, 10 epochs, float32, on a 2-core CPU
# (issue 10): U-Net (features 16), UNet++ (features 8, deep supervision), U-Net-ResNet34 (random init, full width),
# TransUNet (reduced: see TRANSUNET below) and SegFormer-B0 (full size), same folds, same recipe (the configs'
# AdamW, combo loss, 1 warm-up epoch, cosine decay, default augmentation). Run from the repository root:
#
#   bash experiments/results/phantom_cpu_models/run.sh [WORKDIR_ROOT]     # default /tmp/phantom_cpu_models
#
# Phantom and CPU-scale: small images, short training, models from scratch. The table shows that every family
# trains through the same protocol; it is not a ranking of the methods.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
W=${1:-/tmp/phantom_cpu_models}
R=experiments/results/phantom_cpu_models
PY=${PY:-python}
ARG=data=phantom,size=64,epochs=10,dtype=float32
COMMON=(--config.warmup_epochs=1 --config.eval_every_epochs=5 --config.checkpoint_every_epochs=10
        --config.compilation_cache_dir=)
[ -n "${DATA_DIR:-}" ] && COMMON+=(--config.dataset.data_dir="$DATA_DIR")
TRANSUNET=(--config.model.hidden_size=192 --config.model.num_layers=4 --config.model.num_heads=3
           --config.model.mlp_dim=768 "--config.model.resnet_layers=(2, 2, 2)" --config.model.resnet_width=32
           "--config.model.decoder_channels=(128, 64, 32, 16)" --config.model.head_channels=256)
cv() {  # name config-file overrides...
  local name=$1 config=$2
  shift 2
  "$PY" -m experiments.protocols --mode=cv "--config=configs/$config.py:$ARG" --folds=5 --out="$R" \
    --name="cv_$name" --workdir_root="$W" "${COMMON[@]}" "$@"
}
cv unet unet --config.model.features=16
cv unetpp unetpp --config.model.features=8
cv segformer segformer
cv unet_resnet34 unet_resnet34
cv transunet transunet "${TRANSUNET[@]}"
"$PY" -m experiments.protocols --mode=aggregate --runs="$W" --groups=unet,unetpp,unet_resnet34,transunet,segformer \
  --out="$R" --name=cv_models
