"""Calibrating the segmentation for screening on photos with reference masks (``python -m anemia_jax.calibrate_quality``):
the probabilities' temperature, then the quality verdict's thresholds.

`segment_split` segments every photo of a split with the runs; `calibrate` then

1. fits the temperature of each target (`anemia_jax.inference.temperature.fit`: each member's logits divided by it, so
   that a pixel called 0.8 is the target about 80% of the time) on the photos' pixels, and reports the expected
   calibration error (ECE) of the runs' probabilities before and after;
2. measures, with the calibrated probabilities, what the verdict reads (area, mean uncertainty, brightness,
   washed-out pixels) beside the Dice against the reference mask;
3. picks ``min_area_fraction`` and ``max_uncertainty`` so that each keeps ``keep_good`` of the photos segmented well
   (Dice >= ``good_dice``), relaxed until the rule sends anemic subjects' photos to retake no more often than the
   others' (``fairness_margin``; `quality.choose_thresholds`), and reports what the rule catches among the poor ones
   and its retake shares by anemia status and Hb band, before and after the fairness constraint.

Which probabilities the calibration fits matters, since an ensemble is more uncertain where its members disagree:
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
from anemia_jax.inference import segmenter, temperature
from anemia_jax.screening import quality

__all__ = ["calibrate", "segment_split"]

_MEASURES = ("area_fraction", "mean_uncertainty", "brightness", "clipped_fraction")


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


@dataclasses.dataclass
class Segmented:
    """A split's photos (at the runs' resolution) with their reference masks (NaN where missing), metadata and
    segmentations (uncalibrated)."""

    photos: np.ndarray
    truth: np.ndarray
    anemic: np.ndarray
    hgb: np.ndarray
    segs: list


def segment_split(runs, config, split: str, *, threshold: float, transforms, prune_level, builder=None) -> Segmented:
    """Segments every photo of ``split`` (cut by ``config``) with ``runs`` (one run, or an ensemble)."""
    builder, tfds_split, indices = loading.eval_split(config, split, builder)
    first = runs[0]
    host = input_pipeline.read_examples(builder, tfds_split, indices, image_size=first.image_size,
                                        targets=first.targets)
    truth = np.where(host.mask_weights[:, None, None, :] > 0, (host.masks > 0).astype(np.float32), np.nan)
    segs = segmenter.Segmenter(runs, threshold=threshold, transforms=transforms,
                               prune_level=prune_level).segment(list(host.images))
    n = len(host.images)
    anemic = np.asarray(host.metadata.get("anemic", np.full(n, -1)), np.int64)
    hgb = np.asarray(host.metadata.get("hgb", np.full(n, np.nan)), np.float64)
    return Segmented(np.asarray(host.images), truth, anemic, hgb, segs)


def _scaled(seg, scale: Sequence[float] | None):
    """``seg`` with calibrated probabilities (photos at the runs' resolution: photo size = model size)."""
    if scale is None:
        return seg
    members = temperature.apply(seg.members_model, scale)
    probs = members.mean(axis=0)
    return segmenter.PhotoSegmentation(probs_model=probs, probs=probs, masks=probs > seg.threshold,
                                       members_model=members, threshold=seg.threshold)


def _measure(part: Segmented, channel: int, scale, threshold: float) -> dict[str, np.ndarray]:
    """The verdict's measures and the Dice of the photos with a reference mask of the target."""
    keep = np.isfinite(part.truth[:, 0, 0, channel])
    rows = []
    for photo, truth, seg in zip(part.photos[keep], part.truth[keep], [s for s, k in zip(part.segs, keep) if k]):
        seg = _scaled(seg, scale)
        m = quality.measure(photo, seg, channel)
        rows.append([m.area_fraction, m.mean_uncertainty, m.brightness, m.clipped_fraction,
                     _dice(seg.probs_model[..., channel] > threshold, truth[..., channel] > 0)])
    names = (*_MEASURES, "dice")
    table = np.asarray(rows, np.float64).reshape(-1, len(names))
    return {**{name: table[:, k] for k, name in enumerate(names)}, "anemic": part.anemic[keep], "hgb": part.hgb[keep]}


def _calibration(parts: Sequence[Segmented], targets: Sequence[str], fit: bool) -> tuple[list | None, dict]:
    """The temperatures (None without ``fit``) and the pixels' reliability before and after, per target."""
    members = [s.members_model for p in parts for s in p.segs]
    truth = [t for p in parts for t in p.truth]
    scale = temperature.fit(members, truth) if fit else None
    report: dict[str, Any] = {"temperature": None if scale is None else dict(zip(targets, scale))}
    for c, target in enumerate(targets):
        y = np.stack([t[..., c] for t in truth])
        before = np.stack([m.mean(axis=0)[..., c] for m in members])
        after = before if scale is None else np.stack([temperature.apply(m, scale).mean(axis=0)[..., c]
                                                       for m in members])
        report[target] = {"before": temperature.reliability(before, y), "after": temperature.reliability(after, y)}
    return scale, report


def calibrate(runs: Sequence, split: str, settings: Mapping[str, Any], *, threshold: float = 0.5, transforms=None,
              prune_level: int | None = None, fit_temperature: bool = True
              ) -> tuple[quality.QualityThresholds, dict[str, Any], list[float] | None]:
    """``(thresholds, record, temperatures)``: the verdict's thresholds chosen for ``runs`` on ``split`` with the
    probabilities calibrated by the temperatures fitted there (module docstring), what to record beside them (mode,
    split, runs, steps, settings, the calibration and the report), and the temperatures (None without
    ``fit_temperature``).

    Args:
        runs: restored runs (one, or the members of an ensemble).
        split: 'val' (each run on its own validation split) or another split (the ensemble on it).
        settings: ``target``, ``good_dice``, ``keep_good``, ``fairness_margin`` (None: no constraint),
            ``min_brightness``, ``max_clipped_fraction``.

    Raises:
        ValueError: an ensemble scored on images its runs trained on, or no photo with a reference mask.
    """
    channel = quality.target_channel(runs[0].targets, settings["target"])
    target = runs[0].targets[channel]
    kwargs = dict(threshold=threshold, transforms=transforms, prune_level=prune_level)
    if split == "val":
        mode = "per_run"
        parts = [segment_split([r], r.config, "val", **kwargs) for r in runs]
    else:
        mode = "ensemble"
        builder, tfds_split, indices = loading.eval_split(runs[0].config, split)
        overlap = finished_runs.training_overlap(runs, builder, tfds_split, indices)
        if any(overlap):
            raise ValueError(f"The runs trained on {overlap} of the {len(indices)} images of split {split!r} (per "
                             "run): choose the ensemble's thresholds on images none of them trained on (see --help).")
        parts = [segment_split(runs, runs[0].config, split, builder=builder, **kwargs)]
    if not any(np.isfinite(p.truth[:, 0, 0, channel]).any() for p in parts):
        raise ValueError(f"No photo of split {split!r} has a reference {target!r} mask to calibrate on.")
    scale, calibration = _calibration(parts, runs[0].targets, fit_temperature)
    measured_parts = [_measure(p, channel, scale, threshold) for p in parts]
    measured = {k: np.concatenate([m[k] for m in measured_parts]) for k in measured_parts[0]}
    chosen = quality.choose_thresholds(measured["area_fraction"], measured["mean_uncertainty"], measured["dice"],
                                       good_dice=settings["good_dice"], keep_good=settings["keep_good"],
                                       anemic=measured["anemic"], hgb=measured["hgb"],
                                       fairness_margin=settings.get("fairness_margin", 0.0))
    thresholds = dataclasses.replace(
        quality.thresholds_from_record(settings), min_area_fraction=chosen["min_area_fraction"],
        max_uncertainty=chosen["max_uncertainty"], target=target,
        source=f"chosen by calibrate_quality on split {split!r} ({mode})")
    verdicts = [quality.verdict(quality.QualityMeasures(*values), thresholds)
                for values in zip(*(measured[k] for k in _MEASURES))]
    retake = np.array([not v.usable for v in verdicts])
    report = {**chosen["report"], "usable": int(sum(v.usable for v in verdicts)),
              "retake_by_reason": {code: int(sum(code in v.codes for v in verdicts)) for code in
                                   ("too_dark", "no_conjunctiva", "region_too_small", "uncertain", "overexposed")},
              # A verdict that rejects anemic patients' (paler) photos more often would bias the screening.
              "retake_share_by_anemia": {k: v for k, v in quality.retake_shares(retake, measured["anemic"]).items()},
              "retake_share_by_hgb": quality.retake_shares(retake, hgb=measured["hgb"])["by_hgb"],
              "brightness_range": [float(measured["brightness"].min()), float(measured["brightness"].max())],
              "clipped_fraction_max": float(measured["clipped_fraction"].max())}
    record = {"mode": mode, "split": split, "runs": [str(r.workdir) for r in runs], "steps": [r.step for r in runs],
              "mask_threshold": threshold, "tta": [t.name for t in transforms] if transforms else None,
              "prune_level": prune_level, "settings": dict(settings), "calibration": calibration, "report": report}
    return thresholds, record, scale
