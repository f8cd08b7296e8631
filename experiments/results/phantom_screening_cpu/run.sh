#!/usr/bin/env bash
# PHANTOM, CPU-scale. 5-fold patient-level CV of U-Net (features=16) on the conjunctiva phantom at 64 px for 20
# epochs, then: the screening table (ground-truth vs predicted masks, colour constancy, and the fold ensemble vs each
# single fold on held-out phantom patients) with its plots and the screening model (grey-world colour constancy, the
# default of fit_screening) and, for comparison, a model without colour constancy; the probabilities' temperature and
# the quality thresholds (per run; for the ensemble without and with the fairness constraint); evaluate's
# ensemble-vs-single-fold segmentation scores and calibration on the held-out patients; the robustness measurements
# (new, bad, colour-cast and dimmed photos); a folder of new phantom photos screened end to end; the README's
# screenshot of the page. Run from the repo root.
#
# Step 1 made the runs at commit 5a65443 (the runs of the first version of this folder, at 59f2c1b, were not kept).
set -eu
ARG=data=phantom,size=64,epochs=20,dtype=float32
COMMON="--config.dataset.data_dir=/tmp/anemia_phantom_tfds --config.warmup_epochs=1 --config.eval_every_epochs=5 --config.checkpoint_every_epochs=20"
R=experiments/results/phantom_screening_cpu
W=runs/phantom_screening_cpu
CV=$W/cv/unet
FOLDS=$(for f in 0 1 2 3 4; do echo --workdir=$CV/fold_$f; done)
# Phantom patients of another seed, which no fold trained on (a test split for the ensemble of the folds).
HELDOUT="--config.dataset.builder_config=res256_heldout --config.dataset.test_split=train --split=test"
NOTE="phantom, CPU-scale (U-Net features=16 at 64 px, 20 epochs; runs trained at 5a65443)"

# 1. Cross-validation.
nice -n 19 python -m experiments.protocols --mode=cv --config=configs/unet.py:$ARG --folds=5 --out=$R --name=cv_unet \
    --workdir_root=$W/cv $COMMON --config.model.features=16

# 2. Screening table, plots and the screening model (screening_unet*; grey-world), with the held-out part; and the
#    same model without colour constancy (the warm-cast comparison of step 6).
nice -n 19 python -m experiments.screening_run --runs=$CV --feature_size=256,192 --out=$R --name=screening_unet \
    --heldout_data=res256_heldout --artifact_constancy=grey_world \
    "--note=$NOTE. Held-out photos: conjunctiva_phantom/res256_heldout (seed 1)"
nice -n 19 python -m anemia_jax.fit_screening --runs=$CV --feature_size=256,192 --constancy=none \
    --out=$R/screening_unet_model_none.json

# 3. Temperature and quality thresholds: each fold on its own validation fold (for predicting with one fold), then
#    the ensemble on the held-out patients without and with the fairness constraint (the last writes $CV/quality.json
#    and $CV/temperature.json, where predict, evaluate and the page find them for these runs).
nice -n 19 python -m anemia_jax.calibrate_quality $FOLDS --out=$CV/quality_per_run.json
cp $CV/temperature.json $R/temperature_per_run.json
nice -n 19 python -m anemia_jax.calibrate_quality $FOLDS --checkpoint=latest $HELDOUT --fairness_margin=-1 \
    --out=$CV/quality_plain.json
nice -n 19 python -m anemia_jax.calibrate_quality $FOLDS --checkpoint=latest $HELDOUT
cp $CV/quality_per_run.json $R/quality_per_run.json
cp $CV/quality_plain.json $R/quality_ensemble_heldout_no_fairness.json
cp $CV/quality.json $R/quality_ensemble_heldout.json
cp $CV/temperature.json $R/temperature_ensemble_heldout.json

# 4. Segmentation and calibration: the fold ensemble and each fold alone on the held-out patients.
nice -n 19 python -m anemia_jax.evaluate $FOLDS --checkpoint=latest $HELDOUT --out=$R/eval_ensemble_heldout

# 5. Robustness: 60 new phantom photos (seed 2), 4 bad photos, 10 warm-cast and 10 dimmed photos.
nice -n 19 python -m experiments.screening_robustness $FOLDS --checkpoint=latest \
    --screening=$R/screening_unet_model.json --screening_before=$R/screening_unet_model_none.json \
    --quality=$CV/quality.json --quality_before=$CV/quality_plain.json --out=$R "--note=$NOTE"

# 6. Screen a folder of new phantom photos (seed 2) with the fold ensemble and the screening model.
python -m experiments.phantom_photos --out=/tmp/photos --count=8
nice -n 19 python -m anemia_jax.predict $FOLDS --checkpoint=latest /tmp/photos --out=/tmp/screened \
    --screening=$R/screening_unet_model.json
mkdir -p $R/screen_demo
cp /tmp/screened/predictions.csv /tmp/screened/predictions.json /tmp/screened/phantom_s2_[014]_overlay.png \
    /tmp/screened/phantom_s2_4_uncertainty.png /tmp/photos/truth.csv $R/screen_demo/

# 7. The README's screenshot: a usable photo and a photo to retake (the first new photo dimmed to x0.45).
python -c "import numpy as np, PIL.Image; im = np.asarray(PIL.Image.open('/tmp/photos/phantom_s2_0.jpg')); \
PIL.Image.fromarray((im * 0.45).round().astype(np.uint8)).save('/tmp/phantom_s2_0_dimmed.jpg', quality=92)"
nice -n 19 python -m experiments.page_screenshot --out=docs/screening_page.png /tmp/phantom_s2_0_dimmed.jpg \
    /tmp/photos/phantom_s2_4.jpg -- $FOLDS --checkpoint=latest --screening=$R/screening_unet_model.json
