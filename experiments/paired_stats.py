"""Confidence intervals and paired tests for per-image scores of models scored on the same test images.

Pure NumPy (and SciPy for the Wilcoxon test); no JAX. Used by `experiments.kvasir_table`:

* `bootstrap_mean_ci`: the mean of per-image scores with a percentile bootstrap confidence interval over images
  (resampling the images with replacement; the interval says how far the mean could move with another draw of test
  images of the same kind, not how far another training run could move it).
* `paired_comparison`: model A against model B on the SAME images: the mean per-image difference A - B with a paired
  bootstrap interval (the images resampled once for both, so that what the two share cancels), the two-sided
  Wilcoxon signed-rank test of the differences, and how many images A wins, ties and loses.
* `holm`: Holm's step-down adjustment of a family of p-values (several models compared with one reference).

Conventions: scores are 1-D arrays of finite floats, one per image, aligned (same image at the same position) for
paired functions; ``level`` is the two-sided coverage (0.95); ``seed`` makes the resampling reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_RESAMPLES", "MeanCI", "PairedComparison", "bootstrap_mean_ci", "holm", "paired_comparison"]

DEFAULT_RESAMPLES = 10_000
_CHUNK = 2_000  # resamples drawn at once (memory: chunk x images indices)


@dataclasses.dataclass(frozen=True)
class MeanCI:
    """A mean with its bootstrap interval ``[low, high]`` at ``level``, over ``n`` values."""

    mean: float
    low: float
    high: float
    level: float
    n: int

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (a difference whose interval excludes 0 is resolved)."""
        return value < self.low or value > self.high


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """A - B on the same images: mean difference with its paired bootstrap interval, Wilcoxon signed-rank p-value
    (two-sided; 1.0 when every difference is 0), and the images where A scores higher / the same / lower."""

    difference: MeanCI
    wilcoxon_p: float
    wins: int
    ties: int
    losses: int


def _as_scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-image scores; got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite value(s); per-image Dice and IoU are "
                         "always finite, distances (HD95) are not: summarise those by their median instead.")
    return x


def _bootstrap_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        means[start:start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    return means


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, level: float = 0.95,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> MeanCI:
    """The mean of ``values`` [N] and its percentile bootstrap interval at ``level`` (``resamples`` resamples of
    the N values with replacement, seeded by ``seed``)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}.")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}.")
    x = _as_scores(values, "values")
    means = _bootstrap_means(x, resamples, np.random.default_rng(seed))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return MeanCI(float(x.mean()), float(low), float(high), level, int(x.size))


def paired_comparison(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, level: float = 0.95,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Model A's per-image scores ``a`` [N] against model B's ``b`` [N] on the same N images (same order).

    The interval is the percentile bootstrap of the mean of ``a - b`` (images resampled, each image's pair kept
    together); the p-value is SciPy's two-sided Wilcoxon signed-rank test of ``a - b`` (zero differences dropped, as
    Wilcoxon's original test does).
    """
    from scipy import stats  # noqa: PLC0415 -- only the paired comparison needs SciPy

    x, y = _as_scores(a, "a"), _as_scores(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must score the same images: {x.size} vs {y.size} values.")
    d = x - y
    interval = bootstrap_mean_ci(d, level=level, resamples=resamples, seed=seed)
    p = 1.0 if not np.any(d != 0) else float(stats.wilcoxon(x, y, zero_method="wilcox",
                                                            alternative="two-sided").pvalue)
    return PairedComparison(interval, p, int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of one family of tests, in the input order (each at most 1, never below its raw
    value, monotone in the raw p-values): reject where the adjusted value is below the family-wise level."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError(f"p_values must be a 1-D sequence of values in [0, 1]; got {list(p_values)}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return [float(v) for v in out]
