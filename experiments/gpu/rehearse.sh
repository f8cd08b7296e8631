#!/usr/bin/env bash
# CPU rehearsal of the GPU sitting (run_device.sh), every stage, in a Python environment shaped like the device's:
#
#   bash experiments/gpu/prepare.sh && bash experiments/gpu/rehearse.sh     # ~20-25 min on 2 busy cores
#
# The device's image has JAX, Flax, Optax, Orbax, PyTorch, numpy, protobuf, etils, ... but none of the packages that
# prepare.sh puts in .whl/. So the rehearsal runs in $R/venv, a hard-linked copy of .venv with exactly those packages
# (and anemia_jax, which the device imports from the checkout) removed, and unpacks the same wheels downloaded for
# this machine's Python into $R/wheels (the 3.12 ones in .whl/ cannot load here): if the wheel list missed a package,
# the rehearsal fails where the sitting would. Tiny knobs (narrow models, 32 px benchmark, 64 px Kvasir) and a longer
# budget stand in for the GPU's speed; any knob of run_device.sh given in the environment wins.
#
# R (default /tmp/gpu_rehearsal) holds venv/, wheels/, out/ (what $OUT would bring back) and work/. VENV (default
# .venv) is the project's environment to copy; from a git worktree, name the main checkout's, e.g.
# VENV=/work/main/.venv bash experiments/gpu/rehearse.sh (prepare.sh then needs PY=$VENV/bin/python too).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
R=${R:-/tmp/gpu_rehearsal}
# A real folder, never a link to one: `cp -al` below must hard-link its files, so that removing the carried packages
# from the copy leaves the environment itself untouched (a copied symlink would delete them from it).
VENV=$(realpath "${VENV:-.venv}")
[ -x "$VENV/bin/python" ] || { echo "rehearse.sh: no Python environment at $VENV (set VENV=...)"; exit 1; }
mkdir -p "$R"
if [ ! -d "$R/wheels" ]; then
  version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  WHEEL_DEST="$R/wheels" WHEEL_PYTHON=$version PY="$VENV/bin/python" bash experiments/gpu/prepare.sh
fi
if [ ! -x "$R/venv/bin/python3" ]; then
  cp -al "$VENV" "$R/venv"  # hard links: removing files below leaves $VENV untouched
  "$R/venv/bin/python3" - "$R/venv" "$R/wheels" <<'PY'
import csv, pathlib, re, shutil, sys, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
emptied = set()
carried = {re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in pathlib.Path(sys.argv[2]).glob("*.whl")}
for dist in site.glob("*.dist-info"):
    name = re.sub(r"[-_.]+", "_", dist.name.split("-")[0]).lower()
    if name in carried or name == "anemia_jax":
        for row in csv.reader((dist / "RECORD").open()):
            f = (site / row[0]).resolve()
            if f.is_file() or f.is_symlink():
                f.unlink()
                emptied.update(p for p in f.parents if site in p.parents)
        shutil.rmtree(dist, ignore_errors=True)
# Folders left holding only bytecode would import as empty namespace packages and hide a missing wheel.
for d in sorted(emptied, key=lambda d: -len(d.parts)):
    if d.exists() and not any(f.is_file() and "__pycache__" not in f.parts for f in d.rglob("*")):
        shutil.rmtree(d)
print(f"{site}: removed {len(carried)} carried distributions and anemia_jax")
PY
fi
export PATH=$R/venv/bin:$PATH WHEEL_DIR=$R/wheels OUT=$R/out WORK=$R/work
export BUDGET_S=${BUDGET_S:-1500} BENCH_MAX_S=${BENCH_MAX_S:-600} KVASIR_MIN_S=${KVASIR_MIN_S:-400}
export BENCH_CONFIG=${BENCH_CONFIG:-size=32,batch=2,dtype=float32}
export BENCH_ARGS=${BENCH_ARGS:---config.model.features=8 --steps=1 --windows=2 --warmup=1}
export KVASIR_SIZE=${KVASIR_SIZE:-64} KVASIR_ARGS=${KVASIR_ARGS:---config.model.features=8}
rm -rf "$OUT"
start=$(date +%s)
nice -n 10 bash experiments/gpu/run_device.sh
echo "rehearsal: $(( $(date +%s) - start )) s; load $(cut -d' ' -f1-3 /proc/loadavg); files: $(ls "$OUT" | tr '\n' ' ')"
