#!/usr/bin/env bash
# Prepares, on this CPU machine, everything that experiments/gpu/run_device.sh needs and the GPU machine lacks,
# into two git-ignored folders that the device call carries beside the checkout:
#
#   .whl/     wheels for the device's Python 3.12 (x86-64 manylinux): TFDS, ml_collections, array_record,
#             tensorboardX and the small dependencies of these that the device's image does not hold (checked
#             against /work/.library/device/KINDS.md's package list; numpy, protobuf, etils, pyarrow, absl, ...
#             are there already and are NOT carried, so that nothing shadows the device's own versions)
#   .device/  peer_bench.py (the PyTorch peer), tfds/: Kvasir-SEG prepared as TFDS array_record data
#             (image_mask_folder/kvasir_seg_256, the official 880/120 split, long side 256), and git_state.json:
#             the commit and a digest of the working tree, since the device's copy has no .git (run this script
#             again right before the device call, after the last commit, so that the stamp is that commit's)
#
#   bash experiments/gpu/prepare.sh          # from the repository root; about a minute on 2 cores; rerunnable
#
# Knobs: PY (python with anemia_jax installed, default .venv/bin/python), KVASIR_SOURCE (default
# ../shared/kvasir_seg), PEER_BENCH (default ../shared/tools/peer_bench.py). It ends by printing both folders'
# sizes and the total that a device call would carry (the working tree travels too: 64 MiB in all).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
KVASIR_SOURCE=${KVASIR_SOURCE:-../shared/kvasir_seg}
PEER_BENCH=${PEER_BENCH:-../shared/tools/peer_bench.py}

# One version of each: two versions of one package stop the whole unpacking on the device.
WHEELS=(
  tensorflow-datasets==4.9.10 ml-collections==1.1.0 array-record==0.8.6 tensorboardX==2.6.5
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  importlib-resources==7.1.0
)
partial=$(mktemp -d)  # outside the checkout: a half-finished download must not travel with the working tree
trap 'rm -rf "$partial"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$partial" "${WHEELS[@]}"
# promise (needed by TFDS) is published as a source archive only; it is pure Python, so a wheel built here runs there.
"$PY" -m pip wheel -q --no-deps -w "$partial" promise==2.3
count=$(ls "$partial"/*.whl | wc -l)
if [ "$count" != $(( ${#WHEELS[@]} + 1 )) ]; then
  echo "prepare.sh: expected $(( ${#WHEELS[@]} + 1 )) wheels, got $count:"; ls "$partial"; exit 1
fi
rm -rf .whl && mkdir .whl && mv "$partial"/*.whl .whl/

# Rebuilt every time (30 s): data prepared by an older builder must not travel under the same version.
rm -rf .device && mkdir .device
cp "$PEER_BENCH" .device/peer_bench.py
[ -d "$KVASIR_SOURCE/images" ] || { echo "prepare.sh: no Kvasir-SEG at $KVASIR_SOURCE (set KVASIR_SOURCE)"; exit 1; }
# Prepared exactly as the trainer prepares it (array_record).
"$PY" - "$KVASIR_SOURCE" <<'PY'
import sys
from anemia_jax import datasets
b = datasets.get_builder("image_mask_folder", data_dir=".device/tfds", config="kvasir_seg_256", source_dir=sys.argv[1])
b.download_and_prepare(file_format="array_record")
print("kvasir_seg_256", b.version, {k: v.num_examples for k, v in b.info.splits.items()})
PY
# TFDS leaves its downloads/extraction scratch beside the data; the device needs only the prepared dataset.
rm -rf .device/tfds/downloads
# The device's copy of the checkout has no .git: the sitting records this commit and checks this digest there.
"$PY" experiments/gpu/sitting.py stamp

du -sh .whl .device
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
carry_bytes=$(du -cb .whl .device | tail -n 1 | cut -f1)
echo "working tree $(( tree_bytes / 1024 )) KiB + carried $(( carry_bytes / 1024 )) KiB =" \
     "$(( (tree_bytes + carry_bytes) / 1048576 )) MiB of the 64 MiB a device call may send"
