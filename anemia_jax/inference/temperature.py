"""Temperature scaling of the segmentation's probabilities: a per-target temperature T fitted on validation pixels.

A model trained with cross-entropy (and Dice) is rarely calibrated: a pixel it calls 0.8 is not conjunctiva 80% of
the time. The quality verdict reads the ensemble's per-pixel uncertainty, so that uncertainty should mean what it
says. Temperature scaling (Guo et al. 2017) divides each member's logits by one number per target before the
sigmoid, ``p = sigmoid(logit / T)``, which keeps every mask of a single model (the sign of a logit, so ``p > 0.5``,
does not change) and only makes probabilities less (T > 1) or more (T < 1) confident. For an ensemble it is applied
to each member's logits, then the probabilities are averaged, as `probabilities.ensemble_fn` does.

`fit` chooses T per target by minimising the binary cross-entropy (negative log-likelihood) of the members' mean
calibrated probability against the reference masks, over the pixels of validation photos (at most ``max_pixels``
per target, drawn with a fixed seed; log T searched in [-3, 3] by bounded Brent). `expected_calibration_error`
measures it: equal-width probability bins, ECE = the pixel-weighted mean |observed frequency - mean probability|.

The file (`save`, `load`, ``temperature.json``) lives beside the runs like the quality thresholds: python -m
anemia_jax.calibrate_quality fits and writes it; `for_runs` finds it for ``predict``, the page, ``evaluate`` and
``export``, which apply it (`probabilities.probability_fn(..., temperature=)`).

Reference: Guo C., Pleiss G., Sun Y., Weinberger K.Q. On calibration of modern neural networks. ICML 2017.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.utils import paths

__all__ = ["FILE", "FORMAT", "apply", "bin_counts", "expected_calibration_error", "fit", "for_runs", "from_counts",
           "load", "reliability", "save"]

FORMAT = "anemia_jax.temperature"
FILE = "temperature.json"
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply(members: np.ndarray, temperature: Sequence[float] | None) -> np.ndarray:
    """Member probabilities ``[M, ..., C]`` (last axis the targets) with each target's logits divided by its
    temperature; float32, unchanged for None."""
    members = np.asarray(members, np.float32)
    if temperature is None:
        return members
    t = np.asarray(temperature, np.float64)
    return (1.0 / (1.0 + np.exp(-_logit(members) / t))).astype(np.float32)


def fit(members: Sequence[np.ndarray], truth: Sequence[np.ndarray], *, max_pixels: int = 400_000,
        seed: int = 0) -> list[float]:
    """Per-target temperatures [C] from photos' member probabilities (each ``[M, H, W, C]``) and their reference
    masks (each ``[H, W, C]``, > 0.5 inside; a target whose mask is missing can be passed as NaN and is skipped).

    Raises:
        ValueError: no pixel of a target to fit on.
    """
    import scipy.optimize  # noqa: PLC0415 -- calibration only

    num_targets = np.shape(truth[0])[-1]
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_targets):
        logits = np.concatenate([_logit(np.asarray(m)[..., c]).reshape(len(m), -1) for m in members], axis=1)
        y = np.concatenate([np.asarray(t, np.float64)[..., c].reshape(-1) for t in truth])
        keep = np.flatnonzero(np.isfinite(y))
        if not keep.size:
            raise ValueError(f"no reference pixel of target {c} to fit a temperature on.")
        if keep.size > max_pixels:
            keep = np.sort(rng.choice(keep, max_pixels, replace=False))
        z, y = logits[:, keep], (y[keep] > 0.5).astype(np.float64)

        def nll(log_t: float) -> float:
            p = np.clip((1.0 / (1.0 + np.exp(-z / math.exp(log_t)))).mean(axis=0), _EPS, 1.0 - _EPS)
            return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))

        best = scipy.optimize.minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded",
                                              options={"xatol": 1e-4})
        out.append(float(math.exp(best.x)))
    return out


def reliability(probabilities: np.ndarray, truth: np.ndarray, num_bins: int = 10) -> dict[str, Any]:
    """Reliability of pixels' probabilities ``[...]`` against reference masks ``[...]`` (> 0.5 inside; NaN pixels
    left out): per equal-width bin the ``count``, ``mean_probability`` and ``observed`` frequency (None where empty),
    and the ``ece``."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    y = np.asarray(truth, np.float64).reshape(-1)
    keep = np.isfinite(y) & np.isfinite(p)
    p, y = p[keep], (y[keep] > 0.5).astype(np.float64)
    return from_counts(*bin_counts(p, y, num_bins))


def bin_counts(p: np.ndarray, y: np.ndarray, num_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, sum of p, sum of y)`` [num_bins] of pixels in equal-width probability bins."""
    bins = np.clip((np.asarray(p) * num_bins).astype(np.int64), 0, num_bins - 1)
    return (np.bincount(bins, minlength=num_bins).astype(np.float64), np.bincount(bins, p, minlength=num_bins),
            np.bincount(bins, y, minlength=num_bins))


def from_counts(count: np.ndarray, sum_p: np.ndarray, sum_y: np.ndarray) -> dict[str, Any]:
    """`reliability`'s dict from per-bin pixel counts and sums (e.g. accumulated over evaluation batches)."""
    count, sum_p, sum_y = (np.asarray(a, np.float64) for a in (count, sum_p, sum_y))
    total = count.sum()
    full = count > 0
    mean_p = np.where(full, sum_p / np.where(full, count, 1.0), np.nan)
    observed = np.where(full, sum_y / np.where(full, count, 1.0), np.nan)
    ece = float(np.sum(count[full] * np.abs(observed[full] - mean_p[full])) / total) if total else math.nan
    nb = len(count)
    return {"ece": ece, "num_pixels": int(total),
            "bins": [{"range": [k / nb, (k + 1) / nb], "count": int(count[k]),
                      "mean_probability": float(mean_p[k]) if full[k] else None,
                      "observed": float(observed[k]) if full[k] else None} for k in range(nb)]}


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, num_bins: int = 10) -> float:
    """The ECE of `reliability`."""
    return reliability(probabilities, truth, num_bins)["ece"]


def save(path: str | os.PathLike, temperature: Sequence[float], targets: Sequence[str],
         record: Mapping[str, Any]) -> None:
    """Writes the temperatures (one per target, in the runs' order) with how they were fitted (``record``)."""
    from anemia_jax.utils import atomic, conversions  # noqa: PLC0415

    data = {"format": FORMAT, "version": 1, "targets": list(targets),
            "temperature": [float(t) for t in temperature], **record}
    atomic.write_text(path, json.dumps(conversions.jsonable(data), indent=2, sort_keys=True) + "\n")


def load(path: str | os.PathLike, targets: Sequence[str] | None = None) -> tuple[list[float], dict[str, Any]]:
    """``(temperatures, record)`` of a file written by `save`, checked against the runs' ``targets``.

    Raises:
        FileNotFoundError / ValueError: no such file, not a temperature file, or one for other targets.
    """
    p = paths.as_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No temperature file at {p}; fit one with python -m anemia_jax.calibrate_quality.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); re-create it with python -m anemia_jax.calibrate_quality.")
    values = data.get("temperature") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{p} is not a temperature file (format {FORMAT!r} with positive temperatures).")
    if targets is not None and list(data.get("targets", [])) != list(targets):
        raise ValueError(f"{p} holds temperatures for the targets {data.get('targets')}, not these runs' "
                         f"{list(targets)}; re-fit it with python -m anemia_jax.calibrate_quality.")
    return [float(v) for v in values], {k: v for k, v in data.items() if k not in ("format", "version")}


def for_runs(workdirs: Sequence[Any], path: str | os.PathLike | None = None, targets: Sequence[str] | None = None
             ) -> tuple[list[float] | None, str]:
    """``(temperatures or None, where from)`` for the runs ``workdirs``: the file ``path`` if given ('none': no
    scaling); else a `FILE` in the first run's directory or its parent (where calibrate_quality writes it); else
    None (probabilities as the models give them)."""
    if path is not None and str(path).lower() == "none":
        return None, "none (--temperature=none)"
    if path is None:
        first = paths.as_path(workdirs[0])
        found = [p for p in (first / FILE, first.parent / FILE) if p.is_file()]
        if not found:
            return None, "none (no temperature.json beside the runs)"
        path = found[0]
    values, _ = load(path, targets)
    return values, str(path)
