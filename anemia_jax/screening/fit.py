"""Fitting a screening model on the photos that segmentation runs did not train on (``python -m anemia_jax.fit_screening``).

A screening model must learn colour from masks as the deployed segmentation will predict them, not from reference
masks, and never from masks a model predicted for photos it trained on. So:

1. `out_of_fold` restores each run of a K-fold set (or a single run) and segments the photos it did not train on:
   each fold's validation part (the left-out country for leave-one-country-out runs), every photo exactly once.
   It keeps each photo (read at the feature size), its target's probability map at the runs' resolution, its
   reference mask and its subject's Hgb, anemia label and patient id.
2. `fit` computes the features with the model's `FeatureSpec` (`FeatureSpec.compute`: the code serving runs too) and
   fits `screening_model.fit_screening_model` on the segmentation folds themselves (fold k's regressors never see
   fold k's photos, whose masks came from a model that did not see them either; a single run's photos are split into
   5 patient-level folds), recording where the model came from: the data set (and whether its photos are synthetic,
   i.e. the phantom), the split protocol, how many photos and subjects, the runs and checkpoints, the command, the
   commit and the date.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from anemia_jax.data import input_pipeline, loading
from anemia_jax.inference import segmenter
from anemia_jax.runs import restore
from anemia_jax.screening import colour, cross_validation, screening_model
from anemia_jax.screening.features import FeatureSpec
from anemia_jax.utils import provenance

__all__ = ["DEFAULT_CONSTANCY", "OutOfFold", "data_record", "find_runs", "fit", "folds_of", "out_of_fold"]

# Grey-world colour constancy by default: a camera's or lamp's colour cast otherwise moves the Hb estimate (a warm cast,
# R x1.15 and B x0.85, moved a phantom model's estimates by about +1.1 g/dL without constancy and by -0.1 with it;
# `colour_domain` flags the casts beyond what the training photos showed).
DEFAULT_CONSTANCY = "grey_world"


def find_runs(path: str | pathlib.Path) -> list[pathlib.Path]:
    """``path`` itself if it is a run (has config.json), else its subfolders that are runs, sorted.

    Raises:
        FileNotFoundError: neither.
    """
    path = pathlib.Path(path).expanduser()
    if (path / "config.json").is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob("*/config.json"))
    if not runs:
        raise FileNotFoundError(f"{path} is neither a run (config.json) nor a folder of runs (*/config.json).")
    return runs


@dataclasses.dataclass
class OutOfFold:
    """Every photo that a run did not train on, with that run's prediction.

    Attributes:
        index, patient_id, hgb, anemic, run, has_mask: [N] position in the TFDS split, patient, Hgb (g/dL, NaN
            unknown), anemia label (1/0/-1), which run (position in ``runs``) predicted it, whether it has a reference
            mask of the target.
        photos: uint8 [N, H, W, 3] at the feature size; truth: bool [N, H, W] reference masks at that size.
        probabilities: float32 [N, h, w] the target's probability at the runs' resolution.
        feature_size: (H, W); target: the mask; runs: the run directories; steps: the checkpoint step of each.
    """

    index: np.ndarray
    patient_id: np.ndarray
    hgb: np.ndarray
    anemic: np.ndarray
    run: np.ndarray
    has_mask: np.ndarray
    photos: np.ndarray
    truth: np.ndarray
    probabilities: np.ndarray
    feature_size: tuple[int, int]
    target: str
    runs: list[str]
    steps: list[int]


def out_of_fold(run_dirs: Sequence[str | pathlib.Path], *, target: str = "palpebral", checkpoint: str = "latest",
                feature_size: Sequence[int] | None = None) -> OutOfFold:
    """The photos each of ``run_dirs`` did not train on (module docstring, step 1).

    Args:
        run_dirs: the runs of ONE K-fold (or leave-one-country-out) set, or a single run.
        target: the mask the colour is read from; every run must predict it.
        checkpoint: 'latest' (the default: in K-fold runs 'best' was chosen on the very fold scored here), 'best'
            or a step.
        feature_size: (H, W) of the photos and masks kept; default the runs' training resolution.

    Raises:
        ValueError: a run that does not predict ``target``, or runs whose held-out parts overlap.
    """
    parts: dict[str, list] = {k: [] for k in ("index", "patient_id", "hgb", "anemic", "run", "has_mask", "photos",
                                               "truth", "probabilities")}
    steps, builder, size = [], None, None
    for r, workdir in enumerate(run_dirs):
        run = restore.load_run(workdir, checkpoint=checkpoint)
        if target not in run.targets:
            raise ValueError(f"{workdir} was trained on {run.targets}, not {target!r}; choose the target it predicts.")
        split = "test" if run.config.split.protocol == "loco" else "val"
        builder, tfds_split, indices = loading.eval_split(run.config, split, builder)
        size = tuple(int(s) for s in (feature_size or run.image_size)) if size is None else size
        host = input_pipeline.read_examples(builder, tfds_split, indices, image_size=run.image_size,
                                            targets=(target,))
        c = run.targets.index(target)
        parts["probabilities"].append(np.stack([s.probs_model[..., c]
                                                for s in segmenter.Segmenter([run]).segment(list(host.images))]))
        feat = host if size == tuple(run.image_size) else input_pipeline.read_examples(
            builder, tfds_split, indices, image_size=size, targets=(target,))
        parts["photos"].append(feat.images)
        parts["truth"].append(feat.masks[..., 0] > 0)
        parts["has_mask"].append(feat.mask_weights[:, 0] > 0)
        parts["index"].append(feat.indices)
        parts["run"].append(np.full(len(indices), r))
        for key in ("patient_id", "hgb", "anemic"):
            parts[key].append(feat.metadata[key])
        steps.append(run.step)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if len(np.unique(out["index"])) != len(out["index"]):
        raise ValueError("The runs' held-out parts overlap: pass the fold workdirs of ONE K-fold set (or one run).")
    return OutOfFold(**out, feature_size=size, target=target, runs=[str(d) for d in run_dirs], steps=steps)


def folds_of(run: np.ndarray, patient_id: np.ndarray, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds a screening model is fitted and checked on, from each photo's run (`OutOfFold.run`) and patient:
    the segmentation folds themselves for a K-fold set (fold k's test part = the photos run k predicted), else 5
    patient-level folds of the single run's photos."""
    run = np.asarray(run)
    runs = np.unique(run)
    if len(runs) > 1:
        return [(np.flatnonzero(run != r), np.flatnonzero(run == r)) for r in runs]
    return cross_validation.grouped_folds(patient_id, 5, seed=seed)


def data_record(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """What the runs were trained on, from the first run's config.json: data set, builder config, split protocol,
    image size, and whether the photos are synthetic (the phantom)."""
    from anemia_jax.data import datasets  # noqa: PLC0415 -- the dataset registry, for the synthetic flag

    config = json.loads((pathlib.Path(run_dir) / "config.json").read_text())
    dataset, split = config.get("dataset", {}), config.get("split", {})
    name = dataset.get("name", "")
    synthetic = bool(datasets.DATASETS.get(name).synthetic) if name in datasets.DATASETS else None
    return {"dataset": {k: dataset.get(k) for k in ("name", "builder", "builder_config")},
            "synthetic_photos": synthetic,
            "split": {k: v for k, v in split.items() if k != "fold"}, "image_size": config.get("image_size")}


def fit(oof: OutOfFold, spec: FeatureSpec, *, coverage: float = 0.9, target_sensitivity: float = 0.9,
        seed: int = 0, num_bootstrap: int = 2000, checkpoint: str = "latest", command: str = ""
        ) -> tuple[screening_model.ScreeningModel, colour.ColourFeatures, list]:
    """``(model, features, folds)``: the screening model fitted on ``oof`` with features computed by ``spec`` (module
    docstring, step 2), the features (N rows, NaN where a photo has none) and the folds used.

    Raises:
        ValueError: ``spec`` reads another mask than ``oof`` holds, or too few photos to fit.
    """
    if spec.target != oof.target:
        raise ValueError(f"the feature spec reads {spec.target!r} but the out-of-fold masks are of {oof.target!r}.")
    features = spec.compute(oof.photos, oof.probabilities)
    folds = folds_of(oof.run, oof.patient_id, seed=seed)
    groups = np.asarray(oof.patient_id).astype(str)
    training = {
        "features_from": "masks predicted by segmentation runs that did not train on the photo (out-of-fold)",
        "data": data_record(oof.runs[0]), "runs": oof.runs, "checkpoint": checkpoint, "steps": oof.steps,
        "num_photos": int(len(groups)), "num_subjects": int(len(np.unique(groups))),
        "command": command, **provenance.checkout_git_state(), "date_utc": provenance.date_utc()}
    model = screening_model.fit_screening_model(
        features, hgb=oof.hgb, anemic=oof.anemic, groups=groups, folds=folds, coverage=coverage,
        target_sensitivity=target_sensitivity, seed=seed, num_bootstrap=num_bootstrap, feature_spec=spec,
        training=training)
    return model, features, folds
