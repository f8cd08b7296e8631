"""The per-photo quality verdict (usable / retake) and its thresholds, host NumPy.

The uncertainty behind the verdict is `anemia_jax.inference.uncertainty`'s (the entropy of the ensemble's mean
probability, per pixel).

Per-photo measures (`measure`), on the quality target (default: the run's first target; the screening target when a
screening model is used):

* ``area_fraction``: the predicted mask's share of the photo, at the photo's own size (the scale of every area a
  health worker sees: the page's areas and ``predict``'s ``fraction/<target>`` columns).
* ``mean_uncertainty``: the mean entropy (bits, 0..1) over the pixels that any member calls the target (the
  predicted mask for a single run; for an ensemble the union of the members' masks, so that pixels only some
  members include count too). A confident mask scores near 0; an unsure one, or one the members disagree on, near
  1. It is measured where the colour will be read rather than over the whole image, so a model whose background
  probabilities are merely soft (common after short training: p ~ 0.3 everywhere) is not penalised for it; on the
  phantom's validation folds it separated poor segmentations (Dice < 0.65) from good ones better than the
  entropy per mask pixel over the whole image (ROC AUC 0.72 vs 0.62, CPU-scale U-Net). NaN when no member finds
  the target.
* ``brightness``: mean luma (Rec. 709 weights on the encoded values, 0..1) of the whole photo.
* ``clipped_fraction``: share of the mask's pixels (at the photo's size) with every channel at or above 250/255:
  washed out to white by glare or overexposure, so their colour is lost. (A single saturated channel is common in
  a well exposed deep-red conjunctiva, so it does not count.) 0 when the mask is empty.

`verdict` turns them into a `Verdict` with `QualityThresholds` (`DEFAULTS`; or chosen
on validation data by ``python -m anemia_jax.calibrate_quality``, which uses `choose_thresholds` and writes them to a
JSON file that `load_thresholds` reads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.utils import conversions, input_files, paths

__all__ = ["CALIBRATION_DEFAULTS", "CLIPPED_VALUE", "CODES", "DEFAULTS", "FORMAT", "HGB_BANDS", "THRESHOLDS_FILE",
           "QualityMeasures", "QualityThresholds", "Verdict", "choose_thresholds", "load_thresholds", "measure",
           "retake_shares", "save_thresholds", "target_channel", "thresholds_for_export", "thresholds_for_runs",
           "thresholds_from_record", "verdict"]

FORMAT = "anemia_jax.quality_thresholds"
CLIPPED_VALUE = 250  # 8-bit value at or above which a channel counts as clipped by the camera (white: all three)
_LUMA = np.array([0.2126, 0.7152, 0.0722])


# Calibration (python -m anemia_jax.calibrate_quality): a validation photo's segmentation is 'good' at Dice >=
# good_dice, and each chosen threshold keeps the share keep_good of the good photos (so about 1 - keep_good of the
# good photos are sent to retake per rule).
CALIBRATION_DEFAULTS = {"good_dice": 0.6, "keep_good": 0.975, "fairness_margin": 0.0}
# The Hb bands (g/dL, [low, high)) the calibration reports retake shares for.
HGB_BANDS = ((-math.inf, 8.0), (8.0, 10.0), (10.0, 12.0), (12.0, 14.0), (14.0, math.inf))
# Every retake reason, in the order a photo's reasons are listed.
CODES = ("too_dark", "too_bright", "no_conjunctiva", "region_too_small", "uncertain", "overexposed", "unusual_colour",
         "no_colour")


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
    """What a photo must meet to be usable, and where the values came from.

    The two segmentation thresholds are placeholders until chosen on validation data (``python -m
    anemia_jax.calibrate_quality``); the exposure thresholds are fixed physical limits, not calibrated.

    Attributes:
        min_area_fraction: the mask must cover at least this share of the photo.
        max_uncertainty: the largest mean entropy (bits, 0..1) over the target's pixels (`measure`).
        min_brightness: the smallest mean luma of the photo, 0..1.
        max_clipped_fraction: the largest share of the mask's pixels washed out to white by glare.
        target: the mask the verdict judges ('' = the runs' first target, or the screening model's).
        source: where the values came from (shown in outputs).
    """

    min_area_fraction: float = 0.005
    max_uncertainty: float = 0.5
    min_brightness: float = 0.12
    max_clipped_fraction: float = 0.2
    target: str = ""
    source: str = "defaults (not calibrated)"


DEFAULTS = QualityThresholds()
_FIELDS = ("min_area_fraction", "max_uncertainty", "min_brightness", "max_clipped_fraction")


def thresholds_from_record(block: Mapping[str, Any] | None, *, source: str = "") -> QualityThresholds:
    """`QualityThresholds` of a recorded block: a thresholds file's ``thresholds``, or the ``config.quality`` that
    runs trained before the verdict's settings left the training config carry. Missing keys take `DEFAULTS`."""
    block = dict(block or {})
    values = {f: float(block.get(f, getattr(DEFAULTS, f))) for f in _FIELDS}
    return QualityThresholds(**values, target=str(block.get("target", "")),
                             source=source or ("the run's recorded config.quality (not calibrated)" if block
                                               else DEFAULTS.source))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a photo can be used, and if not why.

    Attributes:
        usable: False when any reason applies (the photo should be retaken).
        reasons: one sentence per problem, for the health worker (what is wrong, what to do).
        codes: the same problems as short identifiers, in the same order (`CODES`' order): 'too_dark',
            'too_bright', 'no_conjunctiva', 'region_too_small', 'uncertain', 'overexposed', and those the
            screening step adds (`photo_report`): 'unusual_colour' (colour or light unlike the screening model's
            training photos), 'no_colour' (no colour could be read).
    """

    usable: bool
    reasons: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """'usable' or 'retake'."""
        return "usable" if self.usable else "retake"

    def with_reason(self, code: str, reason: str) -> Verdict:
        """This verdict with one more problem (then not usable), in `CODES`' order (exposure first: a dark photo
        also segments badly, and 'too dark' is what to fix); a code it already has is not repeated."""
        if code in self.codes:
            return self
        items = sorted([*zip(self.codes, self.reasons), (code, reason)],
                       key=lambda item: CODES.index(item[0]) if item[0] in CODES else len(CODES))
        return Verdict(False, tuple(r for _, r in items), tuple(c for c, _ in items))


@dataclasses.dataclass(frozen=True)
class QualityMeasures:
    """The per-photo numbers the verdict reads (module docstring)."""

    area_fraction: float
    mean_uncertainty: float
    brightness: float
    clipped_fraction: float


def measure(photo: np.ndarray, seg, channel: int) -> QualityMeasures:
    """`QualityMeasures` of one photo (uint8 ``[H, W, 3]``) and its `segmenter.PhotoSegmentation` ``seg``, for
    target channel ``channel``."""
    region = np.any(seg.members_model[..., channel] > seg.threshold, axis=0)
    unc = float(seg.uncertainty_model[..., channel][region].mean()) if region.any() else math.nan
    luma = np.asarray(photo, np.float32) @ _LUMA.astype(np.float32) / 255.0
    mask = seg.masks[..., channel]
    clipped = (np.asarray(photo)[mask].min(axis=-1) >= CLIPPED_VALUE).mean() if mask.any() else 0.0
    return QualityMeasures(area_fraction=float(mask.mean()), mean_uncertainty=unc,
                           brightness=float(luma.mean()), clipped_fraction=float(clipped))


def verdict(m: QualityMeasures, t: QualityThresholds) -> Verdict:
    """The `Verdict` of measures ``m`` under thresholds ``t`` (every problem that applies, in `CODES`' order), in
    plain words for a health worker: the measures and thresholds themselves are in ``predict``'s CSV."""
    v = Verdict(True)
    if m.brightness < t.min_brightness:
        v = v.with_reason("too_dark", "photo too dark: retake with more light")
    if m.area_fraction == 0:
        v = v.with_reason("no_conjunctiva", "no conjunctiva found: retake with the lower eyelid pulled down and its "
                                            "inner surface in view")
    elif m.area_fraction < t.min_area_fraction:
        share = f"{m.area_fraction:.1%}" if m.area_fraction >= 0.001 else "under 0.1%"
        v = v.with_reason("region_too_small", f"inner eyelid too small in the photo ({share} of it): retake closer")
    if math.isfinite(m.mean_uncertainty) and m.mean_uncertainty > t.max_uncertainty:
        v = v.with_reason("uncertain", "the inner eyelid's outline is unclear: retake sharper, steadier and evenly "
                                       "lit")
    if m.clipped_fraction > t.max_clipped_fraction:
        v = v.with_reason("overexposed", f"overexposed: {m.clipped_fraction:.0%} of the inner eyelid is washed out "
                                         "to white: retake without flash glare")
    return v


def _quantile(values: np.ndarray, q: float, method: str) -> float:
    return float(np.quantile(values, q, method=method))


def _rule(area: np.ndarray, unc: np.ndarray, good: np.ndarray, keep: float) -> tuple[float, float, np.ndarray]:
    """``(min_area, max_uncertainty, rejected [N])`` of the rule keeping the share ``keep`` of the good photos."""
    finite = good & np.isfinite(unc)
    max_unc = _quantile(unc[finite], keep, "higher") if finite.any() else math.inf
    min_area = _quantile(area[good], 1.0 - keep, "lower")
    return min_area, max_unc, (area < min_area) | (area == 0) | (np.isfinite(unc) & (unc > max_unc))


def retake_shares(rejected: np.ndarray, anemic: np.ndarray | None = None, hgb: np.ndarray | None = None
                  ) -> dict[str, Any]:
    """The share of photos sent to retake among anemic and non-anemic subjects' (``anemic`` 1/0, -1 unknown), and
    per Hb band (`HGB_BANDS`, g/dL): ``{'anemic', 'not_anemic', 'by_hgb': {band: {'n', 'retake'}}}`` (None where no
    photo)."""
    rejected = np.asarray(rejected, bool)
    out: dict[str, Any] = {}
    if anemic is not None:
        anemic = np.asarray(anemic)
        for label, flag in (("anemic", 1), ("not_anemic", 0)):
            where = anemic == flag
            out[label] = float(rejected[where].mean()) if where.any() else None
    if hgb is not None:
        hgb = np.asarray(hgb, np.float64)
        out["by_hgb"] = {}
        for lo, hi in HGB_BANDS:
            where = np.isfinite(hgb) & (hgb >= lo) & (hgb < hi)
            band = f"{lo:g}-{hi:g}" if math.isfinite(lo) and math.isfinite(hi) else (
                f"< {hi:g}" if math.isfinite(hi) else f">= {lo:g}")
            out["by_hgb"][band] = {"n": int(where.sum()),
                                   "retake": float(rejected[where].mean()) if where.any() else None}
    return out


def choose_thresholds(area_fraction: np.ndarray, mean_uncertainty: np.ndarray, dice: np.ndarray, *,
                      good_dice: float, keep_good: float, anemic: np.ndarray | None = None,
                      hgb: np.ndarray | None = None, fairness_margin: float | None = 0.0) -> dict[str, Any]:
    """Chooses ``min_area_fraction`` and ``max_uncertainty`` on validation photos with reference masks.

    A photo's segmentation is good when its Dice with the reference is at least ``good_dice``. Each threshold is
    the order statistic of the good photos that keeps the share ``keep_good`` of them: ``max_uncertainty`` the
    ``keep_good`` quantile of their ``mean_uncertainty`` (method 'higher'), ``min_area_fraction`` the
    ``1 - keep_good`` quantile of their area (method 'lower'). What the rule catches among the bad photos, and how
    well each measure separates bad from good (ROC AUC, bad = positive), are reported, not optimised.

    Fairness (with ``anemic`` and ``fairness_margin`` not None): a rule that sends anemic subjects' photos to retake
    more often than the others' hides the patients the screen is for (pale conjunctivas segment less surely). When
    the share of anemic subjects' photos it rejects exceeds the non-anemic subjects' share plus
    ``fairness_margin``, both thresholds are relaxed together, one good photo's order statistic at a time (the kept
    share of good photos rises from ``keep_good`` towards 1), until it no longer does; the report gives the shares
    before and after (and per Hb band with ``hgb``), the share kept and whether the constraint was met.

    Args:
        area_fraction, mean_uncertainty, dice: [N] per validation photo (``mean_uncertainty`` NaN for empty masks).
        good_dice: Dice at or above which a segmentation counts as good; keep_good: in (0, 1].
        anemic: [N] 1/0/-1 (unknown) per photo; hgb: [N] g/dL (NaN unknown), for the report's bands.
        fairness_margin: how much larger the anemic subjects' retake share may be (None: no constraint).

    Returns:
        ``{'min_area_fraction', 'max_uncertainty', 'report': {...}}``.

    Raises:
        ValueError: no good photo (the model is too poor to calibrate on) or bad arguments.
    """
    from anemia_jax.screening import clinical_stats  # noqa: PLC0415 -- scipy only when calibrating

    area, unc, dice = (np.asarray(a, np.float64) for a in (area_fraction, mean_uncertainty, dice))
    if not (area.shape == unc.shape == dice.shape and area.ndim == 1):
        raise ValueError(f"area_fraction, mean_uncertainty and dice must be [N] alike; got {area.shape}, "
                         f"{unc.shape}, {dice.shape}.")
    if not 0.0 < keep_good <= 1.0:
        raise ValueError(f"keep_good must lie in (0, 1]; got {keep_good}.")
    good = dice >= good_dice
    if not good.any():
        raise ValueError(f"none of the {len(dice)} validation photos has Dice >= {good_dice} (best "
                         f"{np.max(dice, initial=math.nan):.3f}): the model is too poor to choose quality thresholds "
                         "on; train longer or lower quality.good_dice.")
    min_area, max_unc, rejected = _rule(area, unc, good, keep_good)
    fairness = None
    if anemic is not None and fairness_margin is not None:
        labels = np.asarray(anemic)
        before = retake_shares(rejected, labels, hgb)
        keep = keep_good
        n_good = int(good.sum())
        steps = [keep_good] + [k / n_good for k in range(math.floor(keep_good * n_good) + 1, n_good + 1)]

        def unfair(shares):
            return (shares.get("anemic") is not None and shares.get("not_anemic") is not None
                    and shares["anemic"] > shares["not_anemic"] + fairness_margin)

        for keep in steps:
            min_area, max_unc, rejected = _rule(area, unc, good, keep)
            if not unfair(retake_shares(rejected, labels)):
                break
        after = retake_shares(rejected, labels, hgb)
        fairness = {"rule": "the share of anemic subjects' photos sent to retake may exceed the non-anemic "
                            f"subjects' by at most {fairness_margin:g}; otherwise both thresholds are relaxed one "
                            "good photo's order statistic at a time",
                    "margin": fairness_margin, "keep_good_asked": keep_good, "keep_good_used": keep,
                    "met": not unfair(after), "before": before, "after": after,
                    "thresholds_before": list(_rule(area, unc, good, keep_good)[:2])}
    bad = ~good

    def share(flags, where):
        return float(flags[where].mean()) if where.any() else math.nan

    labels = bad.astype(np.int64)
    report = {
        "n": int(len(dice)), "n_good": int(good.sum()), "n_bad": int(bad.sum()), "good_dice": good_dice,
        "keep_good": keep_good, "good_rejected": share(rejected, good), "bad_rejected": share(rejected, bad),
        "auc_uncertainty_bad_vs_good": clinical_stats.roc_auc(np.nan_to_num(unc, nan=np.inf), labels),
        "auc_small_area_bad_vs_good": clinical_stats.roc_auc(-area, labels),
        "mean_dice_usable": float(dice[~rejected].mean()) if (~rejected).any() else math.nan,
        "mean_dice_rejected": float(dice[rejected].mean()) if rejected.any() else math.nan,
        "quantiles": {name: {str(q): float(np.nanquantile(v, q)) if np.isfinite(v).any() else math.nan
                             for q in (0.0, 0.05, 0.5, 0.95, 1.0)}
                      for name, v in (("area_fraction", area), ("mean_uncertainty", unc), ("dice", dice))},
        **({"fairness": fairness} if fairness is not None else {}),
    }
    return {"min_area_fraction": min_area, "max_uncertainty": max_unc, "report": report}


def save_thresholds(path: str | os.PathLike, thresholds: QualityThresholds, record: Mapping[str, Any]) -> None:
    """Writes ``thresholds`` with their calibration ``record`` (protocol, runs, report) as JSON at ``path``."""
    from anemia_jax.utils import atomic

    data = {"format": FORMAT, "version": 1, "thresholds": dataclasses.asdict(thresholds), **record}
    atomic.write_text(path, json.dumps(conversions.jsonable(data), indent=2, sort_keys=True) + "\n")


def load_thresholds(path: str | os.PathLike) -> tuple[QualityThresholds, dict[str, Any]]:
    """``(thresholds, record)`` from a JSON written by `save_thresholds`.

    Raises:
        FileNotFoundError / ValueError: no such file, or not a quality-thresholds file (the message says which).
    """
    p = paths.as_path(path)
    if not input_files.is_regular_file(p):
        raise FileNotFoundError(f"No quality thresholds at {p}; choose them with `python -m "
                                "anemia_jax.calibrate_quality --workdir=RUN ...`.")
    try:  # a regular file only (a FIFO is never waited on), of a thresholds file's size
        data = json.loads(input_files.read_file(p, max_bytes=16 << 20, what="Quality thresholds file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}); re-create it with python -m anemia_jax.calibrate_quality.")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{p} is not a quality-thresholds file (its 'format' is not {FORMAT!r}).")
    t = {k: (float(v) if v in ("Infinity", "-Infinity", "NaN") else v)
         for k, v in dict(data.get("thresholds") or {}).items()}
    fields = {f.name for f in dataclasses.fields(QualityThresholds)}
    if set(t) != fields or not all(isinstance(t[k], (int, float)) for k in fields - {"target", "source"}):
        raise ValueError(f"{p}: 'thresholds' must hold numbers for {sorted(fields - {'target', 'source'})} and the "
                         "strings 'target', 'source'; re-create it with python -m anemia_jax.calibrate_quality.")
    record = {k: v for k, v in data.items() if k not in ("format", "version", "thresholds")}
    return QualityThresholds(**{**t, "source": f"{p} ({t['source']})"}), record


def target_channel(targets: Sequence[str], wanted: str) -> int:
    """The channel of target ``wanted`` ('' = the first) among ``targets``.

    Raises:
        ValueError: the runs do not predict ``wanted``.
    """
    if not wanted:
        return 0
    if wanted not in targets:
        raise ValueError(f"The quality target {wanted!r} is not predicted by the runs (targets {list(targets)}); "
                         "set the thresholds' 'target' (calibrate_quality --target) to one of them.")
    return list(targets).index(wanted)


THRESHOLDS_FILE = "quality.json"  # where calibrate_quality writes by default, and where predict looks


def _same_runs(a: Sequence[Any], b: Sequence[Any]) -> bool:
    def norm(p: Any) -> str:
        return str(p) if "://" in str(p) else os.path.realpath(str(p))

    return sorted(map(norm, a)) == sorted(map(norm, b))


def thresholds_for_runs(workdirs: Sequence[Any], recorded: Mapping[str, Any] | None = None,
                        path: str | os.PathLike | None = None) -> QualityThresholds:
    """The thresholds to judge photos segmented by the runs ``workdirs`` with.

    In order: the file ``path`` if given; else a `THRESHOLDS_FILE` in the first run's directory or in its parent
    (the folder of a K-fold set); else ``recorded`` (the ``config.quality`` that older runs carry); else
    `DEFAULTS`. A file chosen for other runs, or for single runs when an ensemble is used (an ensemble is more
    uncertain where its members disagree), is used with a warning saying so.
    """
    from absl import logging  # noqa: PLC0415

    if path is None:
        first = paths.as_path(workdirs[0])
        found = [p for p in (first / THRESHOLDS_FILE, first.parent / THRESHOLDS_FILE) if input_files.is_regular_file(p)]
        if not found:
            return thresholds_from_record(recorded) if recorded else DEFAULTS
        path = found[0]
    thresholds, record = load_thresholds(path)
    chosen_on = record.get("runs", [])
    mode = record.get("mode", "")
    if mode == "per_run" and len(workdirs) > 1:
        logging.warning("Quality thresholds %s were chosen for single runs, not for an ensemble of %d: its "
                        "uncertainty is higher where members disagree, so more photos may be sent to retake. "
                        "Choose them for the ensemble on a split none of its runs trained on (python -m "
                        "anemia_jax.calibrate_quality --split=test ...).", path, len(workdirs))
    elif mode == "per_run" and not any(_same_runs([w], [r]) for w in workdirs for r in chosen_on):
        logging.warning("Quality thresholds %s were chosen for other runs (%s).", path, ", ".join(chosen_on))
    elif mode == "ensemble" and not _same_runs(workdirs, chosen_on):
        logging.warning("Quality thresholds %s were chosen for the ensemble %s, not for these runs.", path,
                        ", ".join(chosen_on))
    return thresholds


def thresholds_for_export(model_path: str | os.PathLike, workdirs: Sequence[Any], recorded: Mapping[str, Any] | None = None,
                          path: str | os.PathLike | None = None) -> QualityThresholds:
    """`thresholds_for_runs` for an exported model at ``model_path`` made of the runs ``workdirs`` (as its card
    records them; they need not exist on this machine): ``path`` if given, else a `THRESHOLDS_FILE` beside the model
    file (copy the runs' one there when deploying it), else the runs' own as `thresholds_for_runs` finds them."""
    beside = paths.as_path(model_path).parent / THRESHOLDS_FILE
    if path is None and beside.is_file():
        path = beside
    return thresholds_for_runs(list(workdirs) or [paths.as_path(model_path).parent], recorded, path)
