"""The photos a screening model was fitted on, as a range a new photo must fall in: light, brightness and colour.

A colour regression knows nothing about photos unlike its training photos: a warm lamp, another phone's white balance
or a dim room move its Hb estimate with no sign of doubt (a warm cast of R x1.15, B x0.85 moved the phantom model's
estimates by about +1.1 g/dL). `ColourDomain` records, from the training photos' `colour.ColourFeatures`, three
checks, each with a limit chosen on the training photos themselves:

* ``brightness`` (mean luma of the whole photo, 0..1): the range from the 0.5th to the 99.5th percentile of the
  training photos. Darker is 'too_dark', brighter 'too_bright': exposure changes every colour feature.
* ``light`` (the log chromaticity of the photo's grey-world illuminant, estimated from the pixels outside the mask:
  a cast estimate): the squared Mahalanobis distance to the training photos' mean, with their covariance. Beyond the
  limit, or with no usable reference pixel, 'unusual_colour'.
* ``features`` (the model's colour features, after its colour constancy): the squared Mahalanobis distance with a
  Ledoit-Wolf shrunk covariance of the standardised features (Ledoit & Wolf 2004; the features are strongly
  correlated, and a plain inverse would amplify noise in their near-constant combinations). Beyond the limit,
  'unusual_colour'.

Limits: the 99th percentile (order statistic 'higher') of the training photos' OUT-OF-FOLD squared distances (fold
k's photos measured against the mean and covariance of the other folds, so each limit is what a new photo like the
training ones exceeds about 1% of the time), for the features at least the chi-square 99.9% point of their number
(with few training photos the out-of-fold percentile of a dozen correlated features is too low: on 80 phantom photos
it flagged 6 of 100 new ones). Fairness: a check that flags pale conjunctivas more often would hide the patients the
screen is for, so when the training photos' out-of-fold flags fall more on anemic subjects than on the others, all
the limits are relaxed together (`FAIR_LEVELS`: the 99.5th, 99.9th, 100th percentiles, brightness tails to match)
until they do not; `fit` reports, out of fold, the share of training photos each check and all together flag, for
anemic and non-anemic subjects apart, before and after. It is a check of the model's domain, not a correction: correcting a cast is the
colour constancy's job (`colour.CONSTANCY_METHODS`); this says when a photo lies beyond what either has seen.

Reference: Ledoit O., Wolf M. A well-conditioned estimator for large-dimensional covariance matrices. J. Multivariate
Anal. 88(2):365-411, 2004.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from anemia_jax.screening import colour

__all__ = ["FAIR_LEVELS", "FLAGS", "LIMIT_QUANTILE", "ColourDomain", "Gaussian", "fit", "from_json"]

LIMIT_QUANTILE = 0.99
# (distance quantile, brightness tail) levels tried in turn until the flags do not fall more on anemic subjects.
FAIR_LEVELS = ((LIMIT_QUANTILE, 0.005), (0.995, 0.0025), (0.999, 0.001), (1.0, 0.0))
# The features' limit is never below this chi-square quantile (D features): with few training photos the
# out-of-fold quantile of a dozen correlated features under-estimates how far new photos like them can lie.
FEATURE_FLOOR_QUANTILE = 0.999
BRIGHTNESS_QUANTILES = (0.005, 0.995)
# Per-photo flags, in the order they are reported (the first that applies is the photo's).
FLAGS = ("too_dark", "too_bright", "unusual_colour")


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Mean [D], scale [D] (standardisation), precision [D, D] of the standardised values, and the squared-distance
    ``limit`` beyond which a row is outside."""

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    limit: float

    def distance2(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances [N] of rows x [N, D] (NaN rows give NaN)."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return np.einsum("ij,jk,ik->i", z, self.precision, z)

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "precision": self.precision.tolist(),
                "limit": float(self.limit)}


def _shrunk_precision(z: np.ndarray, shrink: bool) -> np.ndarray:
    """Inverse of the (Ledoit-Wolf shrunk, if ``shrink``) covariance of standardised rows z [n, D]."""
    n, d = z.shape
    s = z.T @ z / n
    if shrink:
        mu = np.trace(s) / d
        delta = np.sum((s - mu * np.eye(d)) ** 2) / d
        beta = sum(np.sum((np.outer(row, row) - s) ** 2) for row in z) / n / n / d
        weight = min(beta, delta) / delta if delta > 0 else 1.0
        s = weight * mu * np.eye(d) + (1.0 - weight) * s
    return np.linalg.pinv(s, hermitian=True)


def _gaussian(x: np.ndarray, shrink: bool, limit: float = math.inf) -> Gaussian:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return Gaussian(mean, scale, _shrunk_precision((x - mean) / scale, shrink), limit)


def _fit_check(x: np.ndarray, folds, shrink: bool) -> tuple[Gaussian, np.ndarray]:
    """The check on rows x [N, D] (NaN rows left out; its limit set later) and the out-of-fold squared distances [N]
    (NaN where none)."""
    finite = np.all(np.isfinite(x), axis=1)
    oof = np.full(len(x), np.nan)
    for train, test in folds:
        train = np.asarray(train)[finite[np.asarray(train)]]
        test = np.asarray(test)[finite[np.asarray(test)]]
        if len(train) > x.shape[1] and len(test):
            oof[test] = _gaussian(x[train], shrink).distance2(x[test])
    return _gaussian(x[finite], shrink), oof


def _limit(oof: np.ndarray, quantile: float, floor: float = 0.0) -> float:
    measured = oof[np.isfinite(oof)]
    return max(float(np.quantile(measured, quantile, method="higher")), floor) if measured.size else math.inf


@dataclasses.dataclass(frozen=True)
class ColourDomain:
    """The training photos' range (module docstring); ``light`` / ``brightness`` None when not measured."""

    features: Gaussian
    light: Gaussian | None
    brightness: tuple[float, float] | None
    report: dict[str, Any]

    def flags(self, features: colour.ColourFeatures, values: np.ndarray) -> list[tuple[str, str]]:
        """Per photo ``(flag, detail)``: the first of `FLAGS` that applies ('' if none) and the measurements behind
        it, for photos with colour ``features`` whose model-ordered values are ``values`` [N, F]."""
        n = len(values)
        bright = features.brightness if features.brightness is not None else np.full(n, np.nan)
        light = features.light if features.light is not None else np.full((n, 2), np.nan)
        d_feat = self.features.distance2(values)
        d_light = self.light.distance2(light) if self.light is not None else np.full(n, np.nan)
        out = []
        for i in range(n):
            if self.brightness is not None and np.isfinite(bright[i]) and bright[i] < self.brightness[0]:
                out.append(("too_dark", f"brightness {bright[i]:.2f}; training photos {self.brightness[0]:.2f}-"
                                        f"{self.brightness[1]:.2f}"))
            elif self.brightness is not None and np.isfinite(bright[i]) and bright[i] > self.brightness[1]:
                out.append(("too_bright", f"brightness {bright[i]:.2f}; training photos {self.brightness[0]:.2f}-"
                                          f"{self.brightness[1]:.2f}"))
            elif self.light is not None and features.light is not None and not np.isfinite(d_light[i]):
                out.append(("unusual_colour", "no neutral pixel outside the conjunctiva to estimate the light from"))
            elif self.light is not None and d_light[i] > self.light.limit:
                out.append(("unusual_colour", f"colour of the light {d_light[i]:.1f} (limit {self.light.limit:.1f})"))
            elif np.isfinite(d_feat[i]) and d_feat[i] > self.features.limit:
                out.append(("unusual_colour", f"colour distance {d_feat[i]:.1f} (limit {self.features.limit:.1f})"))
            else:
                out.append(("", ""))
        return out

    def distances(self, features: colour.ColourFeatures, values: np.ndarray) -> np.ndarray:
        """[N] the larger of the two distances relative to their limits (> 1: outside; NaN where not measured)."""
        ratio = self.features.distance2(values) / self.features.limit
        if self.light is not None and features.light is not None:
            ratio = np.fmax(ratio, self.light.distance2(features.light) / self.light.limit)
        return ratio

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features.to_json(), "light": None if self.light is None else self.light.to_json(),
                "brightness_range": None if self.brightness is None else list(self.brightness),
                "limit_rule": f"{LIMIT_QUANTILE:g} quantile of the training photos' out-of-fold squared Mahalanobis "
                              f"distances (features: at least the chi-square {FEATURE_FLOOR_QUANTILE:g} quantile); "
                              f"brightness between its {BRIGHTNESS_QUANTILES[0]:g} and "
                              f"{BRIGHTNESS_QUANTILES[1]:g} quantiles over the training photos; relaxed together "
                              f"through the levels {list(FAIR_LEVELS)} until the out-of-fold flags do not fall "
                              "more on anemic subjects (report.level: the one used)",
                "report": self.report}


def fit(features: colour.ColourFeatures, folds, anemic: np.ndarray | None = None) -> ColourDomain:
    """The `ColourDomain` of training photos' ``features`` (their brightness and light where measured) with
    out-of-fold limits over ``folds`` (module docstring). With ``anemic`` [N] (1/0/-1) the limits are fair: when the
    training photos' out-of-fold flags fall more on anemic subjects than on the others, every limit is relaxed
    together (`FAIR_LEVELS`) until they do not; the report gives the shares before and after."""
    values = np.asarray(features.values, np.float64)
    n = len(values)
    floor = float(scipy.stats.chi2.ppf(FEATURE_FLOOR_QUANTILE, values.shape[1]))
    feat, d_feat = _fit_check(values, folds, shrink=True)
    light = d_light = b = None
    if features.light is not None and np.isfinite(features.light).all(axis=1).sum() > 3:
        light, d_light = _fit_check(np.asarray(features.light, np.float64), folds, shrink=False)
    if features.brightness is not None:
        b = np.asarray(features.brightness, np.float64)
    labels = np.full(n, -1) if anemic is None else np.asarray(anemic)

    def share(flags: np.ndarray, where: np.ndarray) -> float | None:
        return float(flags[where].mean()) if where.any() else None

    def level(quantile: float, tail: float) -> tuple[dict[str, np.ndarray], tuple]:
        limits = (_limit(d_feat, quantile, floor), None if light is None else _limit(d_light, quantile),
                  None if b is None else tuple(float(q) for q in np.quantile(b[np.isfinite(b)], (tail, 1 - tail))))
        flagged = {"features": d_feat > limits[0]}
        if light is not None:
            flagged["light"] = (d_light > limits[1]) | ~np.isfinite(d_light)
        if b is not None:
            flagged["brightness"] = (b < limits[2][0]) | (b > limits[2][1])
        flagged["any"] = np.any(np.stack(list(flagged.values())), axis=0)
        return flagged, limits

    def shares(flagged):
        return {check: {"all": share(f, np.ones(n, bool)), "anemic": share(f, labels == 1),
                        "not_anemic": share(f, labels == 0)} for check, f in flagged.items()}

    def unfair(s):
        a, o = s["any"]["anemic"], s["any"]["not_anemic"]
        return a is not None and o is not None and a > o

    first = shares(level(*FAIR_LEVELS[0])[0])
    for quantile, tail in FAIR_LEVELS:
        flagged, limits = level(quantile, tail)
        if not unfair(shares(flagged)):
            break
    report = {"flagged_out_of_fold": shares(flagged), "flagged_out_of_fold_before_fairness": first,
              "level": {"quantile": quantile, "brightness_tail": tail}}
    feat = dataclasses.replace(feat, limit=limits[0])
    light = None if light is None else dataclasses.replace(light, limit=limits[1])
    return ColourDomain(feat, light, limits[2], report)


def _gaussian_json(data: Mapping[str, Any], size: int, read) -> Gaussian:
    mean, scale = read(data, "mean", size), read(data, "scale", size)
    precision = np.asarray(data.get("precision"), np.float64)
    # null: too few training photos to measure a limit (the check is off), written so by the strict-JSON writer.
    limit = math.inf if data.get("limit", 0) is None else float(data.get("limit", math.nan))
    if precision.shape != (size, size) or not np.all(np.isfinite(precision)) or not limit > 0 or np.any(scale <= 0):
        raise ValueError(f"needs a [{size}, {size}] finite precision, positive scales and a positive limit")
    return Gaussian(mean, scale, precision, limit)


def from_json(data: Mapping[str, Any], num_features: int) -> ColourDomain:
    """The `ColourDomain` of `ColourDomain.to_json`.

    Raises:
        ValueError: a missing or malformed part (the message names it).
    """
    def read(d: Mapping[str, Any], key: str, size: int) -> np.ndarray:
        value = np.asarray(d.get(key) if isinstance(d, Mapping) else None, np.float64)
        if value.shape != (size,) or not np.all(np.isfinite(value)):
            raise ValueError(f"{key} must hold {size} finite numbers")
        return value

    if not isinstance(data, Mapping) or not isinstance(data.get("features"), Mapping):
        raise ValueError("needs 'features'")
    features = _gaussian_json(data["features"], num_features, read)
    light = _gaussian_json(data["light"], 2, read) if isinstance(data.get("light"), Mapping) else None
    brightness = data.get("brightness_range")
    if brightness is not None:
        if not (isinstance(brightness, Sequence) and len(brightness) == 2
                and all(isinstance(v, (int, float)) for v in brightness) and 0 <= brightness[0] <= brightness[1]):
            raise ValueError("brightness_range must be [low, high] with 0 <= low <= high")
        brightness = (float(brightness[0]), float(brightness[1]))
    return ColourDomain(features, light, brightness, dict(data.get("report") or {}))
