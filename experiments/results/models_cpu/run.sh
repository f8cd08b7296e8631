#!/usr/bin/env bash
# CPU benchmark of the pretrained-encoder and transformer models (issue 10): the train step of UNet++-ResNet34,
# TransUNet (R50+ViT-B/16, full size), SegFormer-B0 and SegFormer-B2 at batch 4, 128x128, float32, on this machine's
# CPU, with images/s, GFLOPs, parameters, the process's peak resident memory and the cold/warm time to first step.
# No PyTorch peer here (segmentation_models_pytorch is not installed on this CPU; the smp peer runs in the GPU
# sitting). Run from the repository root on an otherwise idle machine:
#
#   bash experiments/results/models_cpu/run.sh [OUT_DIR]     # default experiments/results/models_cpu
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=${1:-experiments/results/models_cpu}
PY=${PY:-python}
ARG=size=128,batch=4,dtype=float32
mkdir -p "$OUT"
bench() {  # name config overrides...
  local name=$1 config=$2
  shift 2
  echo "== $name; uptime: $(uptime)" | tee -a "$OUT/uptime.log"
  "$PY" -m experiments.benchmark "--config=configs/$config.py:$ARG" "$@" --steps=2 --windows=2 --warmup=1 \
    --out="$OUT/$name.json" | tee "$OUT/$name.log"
}
bench unetpp_resnet34 unetpp_resnet34
bench segformer_b0 segformer
bench segformer_b2 segformer --config.model.variant=b2
bench transunet transunet
echo "== done; uptime: $(uptime)" | tee -a "$OUT/uptime.log"
