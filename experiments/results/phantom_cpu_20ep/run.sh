#!/usr/bin/env bash
# 5-fold patient-level CV of U-Net and UNet++ on the phantom at 64 px for 20 epochs (4x the tiny runs in
# ../phantom_cpu), then the screening tables from their out-of-fold predicted masks. Run from the repo root.
set -eu
ARG=data=phantom,size=64,epochs=20,dtype=float32
COMMON="--config.dataset.data_dir=/tmp/anemia_phantom_tfds --config.warmup_epochs=1 --config.eval_every_epochs=5 --config.checkpoint_every_epochs=20"
R=experiments/results/phantom_cpu_20ep
W=/tmp/apr20
python experiments/protocols.py cv --config=configs/unet.py:$ARG --folds=5 --out=$R --name=cv_unet --workdir_root=$W/cv $COMMON --config.model.features=16
python experiments/protocols.py cv --config=configs/unetpp.py:$ARG --folds=5 --out=$R --name=cv_unetpp --workdir_root=$W/cv $COMMON --config.model.features=8
python experiments/protocols.py aggregate --runs=$W/cv --groups=unet,unetpp --out=$R --name=cv_models
python experiments/screening_run.py --runs=$W/cv/unet --feature_size=256,192 --out=$R --name=screening_unet
python experiments/screening_run.py --runs=$W/cv/unetpp --feature_size=256,192 --out=$R --name=screening_unetpp
