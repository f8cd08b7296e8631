#!/usr/bin/env bash
# bfloat16 on the CPU (issue 21): does XLA run bf16 convolutions on this CPU's AMX-BF16 units, is the bf16 train step
# faster than the float32 one, how does it compare with PyTorch's CPU autocast, and what does bf16 cost in accuracy?
# Run from the repository root (about 25 min on 2 cores); TORCH_PY is a Python with PyTorch (not a dependency).
#
#   TORCH_PY=/path/to/torch/venv/bin/python bash experiments/results/cpu_bf16/run.sh
#
# 1. experiments.cpu_bf16: one U-Net level's 3x3 convolution (8x128x128x64) and its two gradients, float32 against
#    bfloat16, under each CPU convolution route of XLA (Eigen, YNNPACK, oneDNN, oneDNN custom calls), with the
#    element type each convolution is computed in read from the compiled HLO; PyTorch's oneDNN beside it.
# 2. experiments.benchmark: the U-Net and UNet++ train steps (batch 8, 128 px) in float32 and in bfloat16 (the
#    config's dtype: bf16 activations and matmuls, float32 parameters), each beside the PyTorch peer in eager mode
#    (float32; bfloat16 = torch.autocast on the CPU).
# 3. Accuracy: U-Net (features 16) on the phantom at 64 px, 300 steps, float32 and bfloat16, same seed; the test
#    validation fold (fold 0, never trained on) scored at the last step with `evaluate` (CPU-scale, phantom: a check
#    of the cost of bf16, not the method's figures).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=experiments/results/cpu_bf16
TORCH_PY=${TORCH_PY:?set TORCH_PY to a Python with PyTorch}
PY=${PY:-python}
RUNS=${RUNS:-runs/cpu_bf16}
STAGES=${STAGES:-probe,bench,accuracy}
if [[ $STAGES == *probe* ]]; then
  "$PY" -m experiments.cpu_bf16 --out="$OUT" --torch_python="$TORCH_PY" --rounds=2 --repeats=7 2>&1 | tee "$OUT/cpu_bf16.log"
fi
if [[ $STAGES == *bench* ]]; then
  for model in unet unetpp; do
    for dtype in float32 bfloat16; do
      "$PY" -m experiments.benchmark --config="configs/$model.py:size=128,batch=8,dtype=$dtype" --steps=4 --windows=3 \
        --warmup=1 --peer=../shared/tools/peer_bench.py --peer_runs=eager --peer_python="$TORCH_PY" \
        --out="$OUT/bench_${model}_${dtype}.json" 2>&1 | tee "$OUT/bench_${model}_${dtype}.log"
    done
  done
fi
if [[ $STAGES == *accuracy* ]]; then
  for dtype in float32 bfloat16; do
    "$PY" -m anemia_jax.main --config="configs/unet.py:data=phantom,size=64,steps=300,dtype=$dtype" \
      --config.model.features=16 --config.dataset.data_dir="$RUNS/tfds" --workdir="$RUNS/unet_$dtype"
    "$PY" -m anemia_jax.evaluate --workdir="$RUNS/unet_$dtype" --split=val --checkpoint=latest \
      --out="$OUT/accuracy_$dtype"
    cp "$RUNS/unet_$dtype/summary.json" "$OUT/accuracy_$dtype/training_summary.json"
  done
fi
