#!/usr/bin/env bash
# PHANTOM, CPU-scale. 5-fold patient-level CV of U-Net (features=16) on the conjunctiva phantom at 64 px for 20
# epochs (the U-Net half of ../phantom_cpu_20ep/run.sh), then the screening table with the clinical statistics,
# colour constancy rows, PNG plots and the screening model artifact. Run from the repo root.
set -eu
ARG=data=phantom,size=64,epochs=20,dtype=float32
COMMON="--config.dataset.data_dir=/tmp/anemia_phantom_tfds --config.warmup_epochs=1 --config.eval_every_epochs=5 --config.checkpoint_every_epochs=20"
R=experiments/results/phantom_screening_cpu
W=runs/phantom_screening_cpu
nice -n 10 python experiments/protocols.py cv --config=configs/unet.py:$ARG --folds=5 --out=$R --name=cv_unet --workdir_root=$W/cv $COMMON --config.model.features=16
nice -n 10 python experiments/screening_run.py --runs=$W/cv/unet --feature_size=256,192 --out=$R --name=screening_unet
