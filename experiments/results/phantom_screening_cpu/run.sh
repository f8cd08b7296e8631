#!/usr/bin/env bash
# PHANTOM, CPU-scale. 5-fold patient-level CV of U-Net (features=16) on the conjunctiva phantom at 64 px for 20
# epochs, then: the screening table (ground-truth vs predicted masks, colour constancy, and the fold ensemble vs each
# single fold on held-out phantom patients) with its plots and the screening model; evaluate's ensemble-vs-single-fold
# segmentation scores on the held-out patients; the quality thresholds (per run, and for the ensemble); a folder of
# new phantom photos screened end to end. Run from the repo root.
#
# Step 1 made the runs at commit 59f2c1b. The training config has gained fields since (e.g. `quality`,
# `optimizer.encoder_lr_multiplier`), so at a later commit step 1 refuses to reuse runs/phantom_screening_cpu/cv
# ("holds a run of a different config"): pass another --workdir_root to retrain (20 min on 2 cores), or skip it and
# run steps 2-5 on the existing runs (as done for the tables here).
set -eu
ARG=data=phantom,size=64,epochs=20,dtype=float32
COMMON="--config.dataset.data_dir=/tmp/anemia_phantom_tfds --config.warmup_epochs=1 --config.eval_every_epochs=5 --config.checkpoint_every_epochs=20"
R=experiments/results/phantom_screening_cpu
W=runs/phantom_screening_cpu
CV=$W/cv/unet
FOLDS=$(for f in 0 1 2 3 4; do echo --workdir=$CV/fold_$f; done)
# Phantom patients of another seed, which no fold trained on (a test split for the ensemble of the folds).
HELDOUT="--config.dataset.builder_config=res256_heldout --config.dataset.test_split=train --split=test"

# 1. Cross-validation.
nice -n 10 python -m experiments.protocols --mode=cv --config=configs/unet.py:$ARG --folds=5 --out=$R --name=cv_unet \
    --workdir_root=$W/cv $COMMON --config.model.features=16

# 2. Screening table, plots and the screening model (screening_unet*), with the held-out ensemble-vs-fold part.
nice -n 10 python -m experiments.screening_run --runs=$CV --feature_size=256,192 --out=$R --name=screening_unet \
    --heldout_data=res256_heldout \
    "--note=phantom, CPU-scale (U-Net features=16 at 64 px, 20 epochs; runs trained at 59f2c1b). Held-out photos: conjunctiva_phantom/res256_heldout (seed 1)"

# 3. Segmentation: the fold ensemble and each fold alone on the held-out patients.
nice -n 10 python -m anemia_jax.evaluate $FOLDS --checkpoint=latest $HELDOUT --out=$R/eval_ensemble_heldout

# 4. Quality thresholds: each fold on its own validation fold (for predicting with one fold), and the ensemble on
#    the held-out patients (written to $CV/quality.json, where predict finds it for these runs).
nice -n 10 python -m anemia_jax.calibrate_quality $FOLDS --out=$CV/quality_per_run.json
nice -n 10 python -m anemia_jax.calibrate_quality $FOLDS --checkpoint=latest $HELDOUT
cp $CV/quality_per_run.json $R/quality_per_run.json
cp $CV/quality.json $R/quality_ensemble_heldout.json

# 5. Screen a folder of new phantom photos (seed 2) with the fold ensemble and the screening model.
python -m experiments.phantom_photos --out=/tmp/photos --count=8
nice -n 10 python -m anemia_jax.predict $FOLDS --checkpoint=latest /tmp/photos --out=/tmp/screened \
    --screening=$R/screening_unet_model.json
mkdir -p $R/screen_demo
cp /tmp/screened/predictions.csv /tmp/screened/predictions.json /tmp/screened/phantom_s2_4_overlay.png \
    /tmp/screened/phantom_s2_4_uncertainty.png /tmp/screened/phantom_s2_0_overlay.png /tmp/photos/truth.csv \
    $R/screen_demo/
