"""The held-out part of the screening experiment: fold ensemble vs single folds on photos none of the folds saw.

In a K-fold cross-validation every photo of the training set was trained on by K-1 of the K fold models, so the
out-of-fold rows of ``experiments/screening_run.py`` can compare ground-truth with predicted masks but never the
ensemble of the folds (what ``predict`` uses) with a single fold. This module segments a data set that NONE of the runs
trained on -- another builder config of the same data set, e.g. the phantom's ``res256_heldout`` (other patients) --
with each fold model alone and with their ensemble (mean probability, `anemia_jax.inference.segmenter`), so that the
screening table can put them side by side on the same photos (its regressors then cross-validated on those photos'
patient-level folds), and checks the SAVED screening model (fitted on the training set's out-of-fold features) on them:
an external test of its estimates, calls and prediction intervals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import finished_runs
from anemia_jax.inference import segmenter
from anemia_jax.runs import restore
from anemia_jax.screening import clinical_stats
from anemia_jax.screening.features import FeatureSpec
from anemia_jax.screening.photo_report import screening_features

ENSEMBLE = "fold ensemble"


def heldout_masks(run_dirs: Sequence, spec: FeatureSpec, *, builder_config: str, tfds_split: str,
                  checkpoint: str) -> dict[str, Any]:
    """Ground-truth, per-fold and ensemble masks of ``spec.target`` for every photo of ``builder_config``'s
    ``tfds_split``, made as ``spec`` makes them (`FeatureSpec.masks`: at its feature size and threshold).

    Returns:
        dict with [N] ``index``, ``patient_id``, ``hgb``, ``anemic``, ``has_mask``, ``run`` (zeros: one held-out
        set), [N, H, W, 3] ``images`` and [N, H, W] ``truth`` at the feature size, ``members`` {run name: [N, H, W]
        bool}, ``ensemble`` [N, H, W] bool, ``segs`` (the `PhotoSegmentation` of each photo at the runs'
        resolution), ``model_images`` (the photos at that resolution), ``feature_size``, ``checkpoints``, ``data``.

    Raises:
        ValueError: some run trained on some of these photos (then they are not held out).
    """
    restored = restore.load_runs(list(run_dirs), checkpoint=checkpoint, split="test")
    config = restored[0].config.copy_and_resolve_references()
    config.dataset.builder_config = builder_config
    config.dataset.test_split = tfds_split
    builder, split, indices = loading.eval_split(config, "test")
    first = dataclasses.replace(restored[0], config=config)
    overlap = finished_runs.training_overlap([first, *restored[1:]], builder, split, indices)
    if any(overlap):
        raise ValueError(f"The runs trained on {overlap} of the {len(indices)} photos of {builder_config!r} "
                         f"{split!r}: they are not held out. Pass a data set none of them trained on.")
    target, size = spec.target, spec.feature_size
    if target not in first.targets:
        raise ValueError(f"The runs were trained on {first.targets}, not {target!r}; pass --target.")
    c = first.targets.index(target)
    host = input_pipeline.read_examples(builder, split, indices, image_size=first.image_size, targets=(target,))
    segs = segmenter.Segmenter(restored).segment(list(host.images))
    feat = host if size == first.image_size else input_pipeline.read_examples(builder, split, indices,
                                                                              image_size=size, targets=(target,))

    members = {r.workdir.name: np.stack(spec.masks([s.members_model[m, ..., c] for s in segs]))
               for m, r in enumerate(restored)}
    return {"index": feat.indices, "patient_id": feat.metadata["patient_id"], "hgb": feat.metadata["hgb"],
            "anemic": feat.metadata["anemic"], "has_mask": feat.mask_weights[:, 0] > 0,
            "run": np.zeros(len(indices), np.int64), "images": feat.images, "truth": feat.masks[..., 0] > 0,
            "members": members, "ensemble": np.stack(spec.masks([s.probs_model[..., c] for s in segs])),
            "segs": segs, "model_images": host.images, "targets": first.targets, "feature_size": size,
            "checkpoints": [r.step for r in restored],
            "data": {"builder": config.dataset.builder, "builder_config": builder_config, "split": split,
                     "num_photos": int(len(indices))}}


def predicted_sources(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{label: [N, H, W] bool}``: each fold's masks, then the ensemble's."""
    return {**{f"{name} mask": m for name, m in masks["members"].items()}, f"{ENSEMBLE} mask": masks["ensemble"]}


def _with_probs(segs: Sequence, probs: Sequence[np.ndarray]) -> list:
    return [dataclasses.replace(s, probs_model=p) for s, p in zip(segs, probs)]


def artifact_check(model, masks: Mapping[str, Any], *, num_bootstrap: int, seed: int = 0) -> list[dict[str, Any]]:
    """The saved screening ``model`` on the held-out photos, its features computed exactly as ``predict`` computes
    them (`photo_report.screening_features`) from each fold model's probabilities and from the ensemble's.

    Returns:
        One dict per source: ``source``, ``n`` (photos screened), ``agreement`` (`clinical_stats.Agreement` of
        its Hgb estimates), ``detection`` (`clinical_stats.Detection` of its calls at its own threshold),
        ``coverage`` (share of measured Hgb inside the prediction interval) and ``median_width`` (g/dL).
    """
    segs, images, targets = masks["segs"], list(masks["model_images"]), masks["targets"]
    sources = {f"{name} mask": _with_probs(segs, [s.members_model[m] for s in segs])
               for m, name in enumerate(masks["members"])}
    sources[f"{ENSEMBLE} mask"] = segs
    hgb, anemic = np.asarray(masks["hgb"], np.float64), np.asarray(masks["anemic"], np.int64)
    groups = np.asarray(masks["patient_id"]).astype(str)
    out = []
    for name, source_segs in sources.items():
        pred = model.predict(screening_features(model, images, source_segs, targets))
        ok = np.isfinite(pred.hgb) & np.isfinite(hgb)
        inside = (hgb[ok] >= pred.hgb_lo[ok]) & (hgb[ok] <= pred.hgb_hi[ok])
        stats = dict(num_bootstrap=num_bootstrap, seed=seed)
        out.append({
            "source": name, "n": int(ok.sum()),
            "agreement": clinical_stats.agreement(np.where(ok, pred.hgb, np.nan), hgb, groups, **stats),
            "detection": clinical_stats.detection(np.where(np.isfinite(pred.p_anemia), pred.p_anemia, np.nan),
                                                  anemic, pred.anemic.clip(0), groups, **stats),
            "coverage": float(inside.mean()) if inside.size else float("nan"),
            "median_width": float(np.median((pred.hgb_hi - pred.hgb_lo)[ok])) if ok.any() else float("nan"),
            "flagged": int(sum(bool(r) for r in pred.reason))})
    return out


def _ci(value: float, interval, digits: int) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not np.all(np.isfinite(interval)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({interval[0]:.{digits}f}, {interval[1]:.{digits}f})"


def format_artifact_check(rows: Sequence[Mapping[str, Any]], coverage: float) -> str:
    """The `artifact_check` rows as a markdown table."""
    lines = [f"| masks the saved model read | n | MAE (g/dL) | bias (g/dL) | 95% limits of agreement (g/dL) | ROC AUC | "
             f"sensitivity / specificity at the model's threshold | {coverage:.0%} interval coverage | median "
             "interval width (g/dL) | flagged: colour out of range |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, d = r["agreement"], r["detection"]
        lines.append(f"| {r['source']} | {r['n']} | {_ci(a.mae, a.mae_ci, 2)} | {_ci(a.bias, a.bias_ci, 2)} | "
                     f"{a.loa[0]:.2f} to {a.loa[1]:.2f} | {_ci(d.auc, d.auc_ci, 3)} | "
                     f"{_ci(d.sensitivity, d.sensitivity_ci, 3)} / {_ci(d.specificity, d.specificity_ci, 3)} | "
                     f"{r['coverage']:.1%} | {r['median_width']:.2f} | {r['flagged']} |")
    return "\n".join(lines) + "\n"


def record_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`artifact_check` rows as JSON-ready dicts."""
    return [{**{k: v for k, v in r.items() if k not in ("agreement", "detection")},
             "agreement": dataclasses.asdict(r["agreement"]), "detection": dataclasses.asdict(r["detection"])}
            for r in rows]
