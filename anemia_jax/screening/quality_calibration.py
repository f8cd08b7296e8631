"""Choosing the quality verdict's thresholds on photos with reference masks (``python -m anemia_jax.calibrate_quality``).

`measure_split` segments every photo of a split with the runs and measures what the verdict reads (area, mean
uncertainty, brightness, washed-out pixels) beside the Dice against the reference mask; `calibrate` picks
``min_area_fraction`` and ``max_uncertainty`` so that each keeps ``keep_good`` of the photos segmented well (Dice >=
``good_dice``; `quality.choose_thresholds`) and reports what the rule catches among the poor ones and how often it
would send anemic and non-anemic subjects to retake.

Which uncertainty the thresholds fit matters, since an ensemble is more uncertain where its members disagree:
on ``split='val'`` each run alone on its own validation split (``mode: per_run``, for predicting with one run); on
any other split the ensemble of the runs on images none of them trained on (``mode: ensemble``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import finished_runs
from anemia_jax.inference import segmenter
from anemia_jax.screening import quality

__all__ = ["calibrate", "measure_split"]

_MEASURES = ("area_fraction", "mean_uncertainty", "brightness", "clipped_fraction")


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def measure_split(runs, config, split: str, *, threshold: float, transforms, prune_level, channel: int,
                  builder=None) -> dict[str, np.ndarray]:
    """Segments every photo of ``split`` (cut by ``config``) with ``runs`` (one run, or an ensemble) and returns
    [N] ``area_fraction``, ``mean_uncertainty``, ``brightness``, ``clipped_fraction`` and ``dice`` (photos with a
    reference mask of the target only), and ``anemic`` (1/0, -1 unknown)."""
    builder, tfds_split, indices = loading.eval_split(config, split, builder)
    first = runs[0]
    host = input_pipeline.read_examples(builder, tfds_split, indices, image_size=first.image_size,
                                        targets=first.targets)
    keep = host.mask_weights[:, channel] > 0
    segs = segmenter.Segmenter(runs, threshold=threshold, transforms=transforms,
                               prune_level=prune_level).segment(list(host.images[keep]))
    rows = []
    for photo, truth, seg in zip(host.images[keep], host.masks[keep], segs):
        m = quality.measure(photo, seg, channel)
        rows.append([m.area_fraction, m.mean_uncertainty, m.brightness, m.clipped_fraction,
                     _dice(seg.probs_model[..., channel] > threshold, truth[..., channel] > 0)])
    names = ("area_fraction", "mean_uncertainty", "brightness", "clipped_fraction", "dice")
    table = np.asarray(rows, np.float64).reshape(-1, len(names))
    anemic = np.asarray(host.metadata.get("anemic", np.full(len(keep), -1)), np.int64)[keep]
    return {**{name: table[:, k] for k, name in enumerate(names)}, "anemic": anemic}


def calibrate(runs: Sequence, split: str, settings: Mapping[str, Any], *, threshold: float = 0.5, transforms=None,
              prune_level: int | None = None) -> tuple[quality.QualityThresholds, dict[str, Any]]:
    """``(thresholds, record)``: the verdict's thresholds chosen for ``runs`` on ``split`` (module docstring) and
    what to record beside them (mode, split, runs, steps, settings and the report).

    Args:
        runs: restored runs (one, or the members of an ensemble).
        split: 'val' (each run on its own validation split) or another split (the ensemble on it).
        settings: ``target``, ``good_dice``, ``keep_good``, ``min_brightness``, ``max_clipped_fraction``.

    Raises:
        ValueError: an ensemble scored on images its runs trained on, or no photo with a reference mask.
    """
    channel = quality.target_channel(runs[0].targets, settings["target"])
    target = runs[0].targets[channel]
    kwargs = dict(threshold=threshold, transforms=transforms, prune_level=prune_level, channel=channel)
    if split == "val":
        mode = "per_run"
        parts = [measure_split([r], r.config, "val", **kwargs) for r in runs]
        measured = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        mode = "ensemble"
        builder, tfds_split, indices = loading.eval_split(runs[0].config, split)
        overlap = finished_runs.training_overlap(runs, builder, tfds_split, indices)
        if any(overlap):
            raise ValueError(f"The runs trained on {overlap} of the {len(indices)} images of split {split!r} (per "
                             "run): choose the ensemble's thresholds on images none of them trained on (see --help).")
        measured = measure_split(runs, runs[0].config, split, builder=builder, **kwargs)
    if not len(measured["dice"]):
        raise ValueError(f"No photo of split {split!r} has a reference {target!r} mask to calibrate on.")
    chosen = quality.choose_thresholds(measured["area_fraction"], measured["mean_uncertainty"], measured["dice"],
                                       good_dice=settings["good_dice"], keep_good=settings["keep_good"])
    thresholds = dataclasses.replace(
        quality.thresholds_from_record(settings), min_area_fraction=chosen["min_area_fraction"],
        max_uncertainty=chosen["max_uncertainty"], target=target,
        source=f"chosen by calibrate_quality on split {split!r} ({mode})")
    verdicts = [quality.verdict(quality.QualityMeasures(*values), thresholds)
                for values in zip(*(measured[k] for k in _MEASURES))]
    report = {**chosen["report"], "usable": int(sum(v.usable for v in verdicts)),
              "retake_by_reason": {code: int(sum(code in v.codes for v in verdicts)) for code in
                                   ("too_dark", "no_conjunctiva", "region_too_small", "uncertain", "overexposed")},
              # A verdict that rejects anemic patients' (paler) photos more often would bias the screening.
              "retake_share_by_anemia": {
                  label: float(np.mean([not v.usable for v, a in zip(verdicts, measured["anemic"]) if a == flag]))
                  if np.any(measured["anemic"] == flag) else None
                  for label, flag in (("anemic", 1), ("not_anemic", 0))},
              "brightness_range": [float(measured["brightness"].min()), float(measured["brightness"].max())],
              "clipped_fraction_max": float(measured["clipped_fraction"].max())}
    record = {"mode": mode, "split": split, "runs": [str(r.workdir) for r in runs], "steps": [r.step for r in runs],
              "mask_threshold": threshold, "tta": [t.name for t in transforms] if transforms else None,
              "prune_level": prune_level, "settings": dict(settings), "report": report}
    return thresholds, record
