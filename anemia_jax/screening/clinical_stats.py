"""Clinical statistics of a screening test (host NumPy): agreement with the laboratory, detection, confidence intervals.

Conventions: one row per photo; ``groups`` [N] are patient ids (a patient may have several photos); scores are
"higher = more likely anemic" and a score at or above a threshold is called positive.

* Agreement of an estimate with the laboratory Hgb (`agreement`): Bland-Altman bias (mean of estimate - reference)
  and 95% limits of agreement ``bias +- 1.96 SD`` (SD of the differences, ddof = 1; Bland & Altman 1986), MAE, RMSE
  and Pearson r. With several photos per patient the photo-level SD is the total SD of a single photo's difference,
  which is what a health worker taking one photo meets (Bland & Altman 2007 discuss the repeated-measures case).
* Detection (`detection`): ROC AUC (Mann-Whitney, ties count one half), sensitivity and specificity of given
  calls with Wilson score intervals (Wilson 1927; they assume independent photos, exact when each patient has one
  photo), Brier score.
* Intervals that hold at small n, beside the bootstrap (`agreement`, `detection`): each limit of agreement by the
  exact parametric interval (Carkeet 2015: ``d + s T / sqrt(n)``, T a non-central t with n - 1 degrees of freedom
  and non-centrality 1.96 sqrt(n), exact for normal differences) and by Bland & Altman 1986's approximation
  (``limit +- t(n-1) sqrt(3 s^2 / n)``); Pearson r by Fisher's z (``tanh(atanh r +- z / sqrt(n - 3))``); the AUC
  by DeLong et al. 1988 (its variance from the structural components, the interval clipped to [0, 1]). These
  treat photos as independent (one photo per patient); the bootstrap keeps a patient's photos together. A
  simulation (tests/test_clinical_stats.py; experiments/interval_coverage.py) measured the percentile bootstrap's
  95% interval of a limit covering only 79% at n = 10 and 86% at n = 20, where the exact one covers 95%.
* Warnings (``warnings`` of `Agreement` and `Detection`): every result says when n, the number of patients or a
  class count is too small for its intervals to mean much (`MIN_N`, `MIN_CLASS`) or an interval is degenerate
  (zero width, or the point estimate on its edge).
* Confidence intervals of everything else: percentile intervals of a patient-level (cluster) bootstrap (Davison &
  Hinkley 1997, section 3.8; Field & Welsh 2007): each replicate draws as many patients as there are, with
  replacement, and keeps ALL the photos of every drawn patient, so photos of one patient never count as
  independent evidence. Predictions are held fixed (the interval covers the sampling of patients for this set of
  out-of-fold predictions, not the refitting of the models). A replicate is represented by integer weights [N] (how
  many times each photo's patient was drawn), and every statistic here is computed exactly as on the resampled set.
* Operating points chosen on training scores: `youden_threshold` (max sensitivity + specificity - 1) and
  `sensitivity_threshold` (the highest threshold whose sensitivity reaches a target: the most specific rule that
  still finds, say, 90% of anemic patients, the usual screening requirement). Candidate thresholds are the midpoints
  between consecutive distinct scores, plus -inf and +inf.

References:
    Bland J.M., Altman D.G. Statistical methods for assessing agreement between two methods of clinical
    measurement. Lancet 327(8476):307-310, 1986. -- Agreement between methods of measurement with multiple
    observations per individual. J. Biopharm. Stat. 17(4):571-582, 2007.
    Carkeet A. Exact parametric confidence intervals for Bland-Altman limits of agreement. Optom. Vis. Sci.
    92(3):e71-e80, 2015.
    DeLong E.R., DeLong D.M., Clarke-Pearson D.L. Comparing the areas under two or more correlated receiver operating
    characteristic curves: a nonparametric approach. Biometrics 44(3):837-845, 1988.
    Fisher R.A. On the "probable error" of a coefficient of correlation deduced from a small sample. Metron 1:3-32,
    1921.
    Wilson E.B. Probable inference, the law of succession, and statistical inference. JASA 22:209-212, 1927.
    Davison A.C., Hinkley D.V. Bootstrap Methods and their Application. Cambridge University Press, 1997.
    Field C.A., Welsh A.H. Bootstrapping clustered data. J. R. Stat. Soc. B 69(3):369-390, 2007.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.stats

__all__ = [
    "MIN_CLASS",
    "MIN_N",
    "Agreement",
    "Detection",
    "agreement",
    "bootstrap_interval",
    "calibration_bins",
    "delong_interval",
    "detection",
    "fisher_z_interval",
    "loa_intervals",
    "patient_bootstrap_weights",
    "roc_auc",
    "roc_curve",
    "sensitivity_threshold",
    "weighted_auc",
    "wilson_interval",
    "youden_threshold",
]

Interval = tuple[float, float]
_NAN_INTERVAL = (float("nan"), float("nan"))
# Below these, a result warns that its intervals hardly mean anything: photos (or patients) for agreement and
# correlation, photos of each class for detection.
MIN_N = 20
MIN_CLASS = 10


def loa_intervals(bias: float, sd: float, n: int, confidence: float = 0.95, z: float = 1.96
                  ) -> dict[str, Interval]:
    """Intervals of the limits of agreement ``bias -+ z sd`` of n independent differences (module docstring):
    ``{'exact_lo', 'exact_hi'}`` (Carkeet 2015) and ``{'ba86_lo', 'ba86_hi'}`` (Bland & Altman 1986); NaN for n < 2."""
    if n < 2 or not (np.isfinite(bias) and np.isfinite(sd)):
        return {k: _NAN_INTERVAL for k in ("exact_lo", "exact_hi", "ba86_lo", "ba86_hi")}
    a = (1.0 - confidence) / 2.0
    q_lo, q_hi = scipy.stats.nct.ppf([a, 1.0 - a], n - 1, z * np.sqrt(n))
    root = sd / np.sqrt(n)
    half = scipy.stats.t.ppf(1.0 - a, n - 1) * np.sqrt(3.0 / n) * sd
    return {"exact_lo": (float(bias - root * q_hi), float(bias - root * q_lo)),
            "exact_hi": (float(bias + root * q_lo), float(bias + root * q_hi)),
            "ba86_lo": (float(bias - z * sd - half), float(bias - z * sd + half)),
            "ba86_hi": (float(bias + z * sd - half), float(bias + z * sd + half))}


def fisher_z_interval(r: float, n: int, confidence: float = 0.95) -> Interval:
    """Fisher's z interval of a Pearson r of n independent pairs; NaN for n < 4 or |r| = 1."""
    if n < 4 or not np.isfinite(r) or abs(r) >= 1.0:
        return _NAN_INTERVAL
    half = scipy.stats.norm.ppf(0.5 + confidence / 2.0) / np.sqrt(n - 3)
    return float(np.tanh(np.arctanh(r) - half)), float(np.tanh(np.arctanh(r) + half))


def delong_interval(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> Interval:
    """DeLong's interval of the ROC AUC of independent photos (module docstring), clipped to [0, 1]; NaN with fewer
    than 2 photos of a class (the variance of a class's components needs two)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    m, k = len(pos), len(neg)
    if m < 2 or k < 2:
        return _NAN_INTERVAL
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg]))
    v10 = (ranks[:m] - scipy.stats.rankdata(pos)) / k  # per positive: the share of negatives below it (ties 1/2)
    v01 = 1.0 - (ranks[m:] - scipy.stats.rankdata(neg)) / m  # per negative: the share of positives above it
    auc = float(v10.mean())
    se = np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / k)
    half = scipy.stats.norm.ppf(0.5 + confidence / 2.0) * se
    return max(0.0, auc - half), min(1.0, auc + half)


def _degenerate(name: str, value: float, interval: Interval) -> list[str]:
    """A warning when ``interval`` of ``name`` is degenerate: zero width, or ``value`` on (or outside) its edge."""
    lo, hi = interval
    if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(value)):
        return []
    if hi - lo <= 1e-12:
        return [f"the {name} interval ({lo:.3g}, {hi:.3g}) has no width: it does not express the uncertainty"]
    if not lo < value < hi:
        return [f"the {name} estimate {value:.3g} lies on the edge of its interval ({lo:.3g}, {hi:.3g}): too few "
                "data for the interval"]
    return []


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC: the Mann-Whitney U statistic / (n_pos n_neg), tied scores counting one half.

    Args:
        scores: [N], higher = more likely positive; labels: [N] in {0, 1}.

    Returns:
        P(score_pos > score_neg) + P(tie) / 2, or NaN when a class is absent.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    n_pos = int(np.sum(labels == 1))
    n_neg = int(np.sum(labels == 0))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)  # average ranks make ties count one half
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of photos repeated ``weights`` times (a bootstrap replicate), for B weight vectors at once.

    Args:
        scores: [N]; labels: [N] in {0, 1}; weights: [N] or [B, N] non-negative.

    Returns:
        [] or [B]: the AUC of the data set in which photo i appears weights[i] times (NaN if a class is absent).
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    weights = np.asarray(weights, np.float64)
    _, level = np.unique(scores, return_inverse=True)  # tied scores share a level
    w = np.atleast_2d(weights)
    levels = level.max() + 1 if level.size else 0
    out = np.empty(len(w))
    pos, neg = labels == 1, labels == 0
    for b, row in enumerate(w):
        w_pos = np.bincount(level[pos], row[pos], minlength=levels)
        w_neg = np.bincount(level[neg], row[neg], minlength=levels)
        below = np.cumsum(w_neg) - w_neg  # negative weight strictly below each level
        total = w_pos.sum() * w_neg.sum()
        out[b] = np.sum(w_pos * (below + 0.5 * w_neg)) / total if total > 0 else np.nan
    return out if weights.ndim == 2 else out[0]


def _candidates(scores: np.ndarray) -> np.ndarray:
    unique = np.unique(scores)
    return np.concatenate([[-np.inf], (unique[:-1] + unique[1:]) / 2.0, [np.inf]])


def _rates(scores, labels, candidates) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity [T] of ``score >= t`` for every candidate t."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("an operating point needs both classes among the training labels.")
    called = scores[None, :] >= candidates[:, None]  # [T, N]
    return called[:, pos].mean(axis=1), (~called[:, neg]).mean(axis=1)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising Youden's J of ``score >= t``; J ties go to the lowest (most sensitive) threshold.

    Args:
        scores: [N] training scores; labels: [N] in {0, 1}, both classes present.
    """
    candidates = _candidates(np.asarray(scores, np.float64))
    sens, spec = _rates(scores, labels, candidates)
    j = sens + spec - 1.0
    return float(candidates[np.flatnonzero(j >= j.max() - 1e-12)[0]])


def sensitivity_threshold(scores: np.ndarray, labels: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold t whose rule ``score >= t`` reaches sensitivity >= ``target`` on these scores.

    The highest such threshold is the most specific rule meeting the target. -inf (call everyone) is returned only
    when no finite threshold reaches it, which cannot happen for target <= 1 unless positives tie with the lowest
    score.

    Args:
        scores: [N] training scores; labels: [N] in {0, 1}, both classes present; target: in (0, 1].
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1]; got {target}.")
    candidates = _candidates(np.asarray(scores, np.float64))
    sens, _ = _rates(scores, labels, candidates)
    return float(candidates[np.flatnonzero(sens >= target - 1e-12)[-1]])


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial proportion ``successes / n`` (NaN, NaN when n = 0)."""
    if n <= 0:
        return _NAN_INTERVAL
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]; got {successes} of {n}.")
    z = scipy.stats.norm.ppf(0.5 + confidence / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 the bound is exactly 0 or 1; the formula lands an ulp away from it.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return float(lo), float(hi)


def patient_bootstrap_weights(groups: Sequence, num_samples: int, *, seed: int = 0) -> np.ndarray:
    """Patient-level (cluster) bootstrap replicates as photo weights.

    Args:
        groups: [N] patient id of every photo; num_samples: B replicates; seed: the generator's seed.

    Returns:
        int64 [B, N]: weights[b, i] = how many times photo i's patient was drawn in replicate b (the patient count
        is fixed at the number of distinct patients; all photos of a drawn patient come along).
    """
    _, patient = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    num_patients = patient.max() + 1 if patient.size else 0
    if num_patients == 0:
        return np.zeros((num_samples, 0), np.int64)
    draws = np.random.default_rng(seed).multinomial(num_patients, np.full(num_patients, 1.0 / num_patients),
                                                    size=num_samples)  # [B, P]
    return draws[:, patient]


def bootstrap_interval(replicates: np.ndarray, confidence: float = 0.95) -> Interval:
    """Percentile interval of bootstrap replicates [B]; NaN replicates (a class absent) are dropped, and a result
    with fewer than half of them finite is NaN (too unstable to report)."""
    values = np.asarray(replicates, np.float64)
    values = values[np.isfinite(values)]
    if values.size < max(1, len(replicates) // 2):
        return _NAN_INTERVAL
    lo, hi = np.quantile(values, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Agreement of N estimates with their references; every ``*_ci`` is a patient-bootstrap percentile interval.

    ``loa`` = (bias - 1.96 sd, bias + 1.96 sd); ``loa_lo_ci``/``loa_hi_ci`` are the bootstrap intervals of each
    limit, ``loa_lo_ci_exact``/``loa_hi_ci_exact`` the exact ones (Carkeet 2015) and ``loa_*_ci_ba86`` Bland &
    Altman 1986's; ``pearson_r_ci_fisher`` Fisher's z interval; ``warnings`` what makes the intervals unreliable."""

    n: int
    bias: float
    sd: float
    loa: Interval
    mae: float
    rmse: float
    pearson_r: float
    bias_ci: Interval
    loa_lo_ci: Interval
    loa_hi_ci: Interval
    mae_ci: Interval
    rmse_ci: Interval
    pearson_r_ci: Interval
    loa_lo_ci_exact: Interval = _NAN_INTERVAL
    loa_hi_ci_exact: Interval = _NAN_INTERVAL
    loa_lo_ci_ba86: Interval = _NAN_INTERVAL
    loa_hi_ci_ba86: Interval = _NAN_INTERVAL
    pearson_r_ci_fisher: Interval = _NAN_INTERVAL
    num_patients: int = 0
    warnings: tuple[str, ...] = ()


def _weighted_agreement(est: np.ndarray, ref: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Agreement statistics of the data set in which photo i appears w[..., i] times; w is [N] or [B, N]."""
    d = est - ref
    total = w.sum(axis=-1)
    bias = (w @ d) / total
    var = np.maximum(w @ (d * d) - total * bias ** 2, 0.0) / np.maximum(total - 1.0, 1.0)
    sd = np.sqrt(var)
    me, mr = (w @ est) / total, (w @ ref) / total
    cov = w @ (est * ref) - total * me * mr
    ve = np.maximum(w @ (est * est) - total * me ** 2, 0.0)
    vr = np.maximum(w @ (ref * ref) - total * mr ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where((ve > 1e-12 * total) & (vr > 1e-12 * total), cov / np.sqrt(ve * vr), np.nan)
    return {"bias": bias, "sd": sd, "loa_lo": bias - 1.96 * sd, "loa_hi": bias + 1.96 * sd,
            "mae": (w @ np.abs(d)) / total, "rmse": np.sqrt((w @ (d * d)) / total), "pearson_r": r}


def agreement(estimate: np.ndarray, reference: np.ndarray, groups: Sequence | None = None, *,
              num_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> Agreement:
    """Bland-Altman agreement, MAE, RMSE and Pearson r of ``estimate`` vs ``reference`` with bootstrap CIs.

    Args:
        estimate, reference: [N] (g/dL); pairs where either is NaN are left out.
        groups: [N] patient ids for the cluster bootstrap (None: one patient per photo).
        num_bootstrap: B replicates (0: no intervals, all NaN); confidence: of the intervals; seed: bootstrap seed.
    """
    est, ref = np.asarray(estimate, np.float64), np.asarray(reference, np.float64)
    if est.shape != ref.shape or est.ndim != 1:
        raise ValueError(f"estimate and reference must both be [N]; got {est.shape} and {ref.shape}.")
    groups = np.arange(len(est)) if groups is None else np.asarray(groups)
    keep = np.isfinite(est) & np.isfinite(ref)
    est, ref, groups = est[keep], ref[keep], groups[keep]
    n = len(est)
    patients = len(np.unique(groups.astype(str)))
    warnings = []
    if n < MIN_N or patients < MIN_N:
        warnings.append(f"{n} photos of {patients} patients: too few for the limits of agreement and their intervals "
                        f"to mean much (at least {MIN_N} wanted); the percentile bootstrap's intervals are too narrow "
                        "at this size (use the exact ones)")
    if n < 2:
        nan = float("nan")
        return Agreement(n, nan, nan, _NAN_INTERVAL, nan, nan, nan, *([_NAN_INTERVAL] * 6), num_patients=patients,
                         warnings=tuple(warnings))
    point = {k: float(v) for k, v in _weighted_agreement(est, ref, np.ones(n)).items()}
    cis = {k: _NAN_INTERVAL for k in point}
    if num_bootstrap > 0:
        reps = _weighted_agreement(est, ref, patient_bootstrap_weights(groups, num_bootstrap, seed=seed)
                                   .astype(np.float64))
        cis = {k: bootstrap_interval(v, confidence) for k, v in reps.items()}
    exact = loa_intervals(point["bias"], point["sd"], n, confidence)
    fisher = fisher_z_interval(point["pearson_r"], n, confidence)
    if patients < n:
        warnings.append(f"{n} photos of {patients} patients: the exact, Bland-Altman and Fisher intervals treat "
                        "photos as independent (too narrow); the bootstrap keeps patients together")
    for name, value, interval in (("lower limit's bootstrap", point["loa_lo"], cis["loa_lo"]),
                                  ("upper limit's bootstrap", point["loa_hi"], cis["loa_hi"]),
                                  ("r's bootstrap", point["pearson_r"], cis["pearson_r"])):
        warnings += _degenerate(name, value, interval)
    return Agreement(n=n, bias=point["bias"], sd=point["sd"], loa=(point["loa_lo"], point["loa_hi"]),
                     mae=point["mae"], rmse=point["rmse"], pearson_r=point["pearson_r"], bias_ci=cis["bias"],
                     loa_lo_ci=cis["loa_lo"], loa_hi_ci=cis["loa_hi"], mae_ci=cis["mae"], rmse_ci=cis["rmse"],
                     pearson_r_ci=cis["pearson_r"], loa_lo_ci_exact=exact["exact_lo"],
                     loa_hi_ci_exact=exact["exact_hi"], loa_lo_ci_ba86=exact["ba86_lo"],
                     loa_hi_ci_ba86=exact["ba86_hi"], pearson_r_ci_fisher=fisher, num_patients=patients,
                     warnings=tuple(warnings))


@dataclasses.dataclass(frozen=True)
class Detection:
    """Detection statistics of N scored photos: AUC with its patient-bootstrap interval and DeLong's
    (``auc_ci_delong``), sensitivity/specificity of the given calls with Wilson intervals, Brier score (only when
    the scores are probabilities, else NaN), and ``warnings`` when a class is too small for the intervals."""

    n: int
    n_positive: int
    auc: float
    auc_ci: Interval
    sensitivity: float
    sensitivity_ci: Interval
    specificity: float
    specificity_ci: Interval
    brier: float
    auc_ci_delong: Interval = _NAN_INTERVAL
    warnings: tuple[str, ...] = ()


def detection(scores: np.ndarray, labels: np.ndarray, called: np.ndarray, groups: Sequence | None = None, *,
              num_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> Detection:
    """ROC AUC (patient-bootstrap CI), sensitivity and specificity of ``called`` (Wilson CIs), Brier score.

    Args:
        scores: [N] (probabilities for a Brier score); labels: [N] 1/0 (-1 or NaN score: left out); called: [N] 1/0
            decisions (e.g. ``scores >= threshold`` with a threshold chosen on training data);
        groups, num_bootstrap, confidence, seed: as in `agreement`.
    """
    scores, labels, called = np.asarray(scores, np.float64), np.asarray(labels), np.asarray(called)
    groups = np.arange(len(scores)) if groups is None else np.asarray(groups)
    keep = np.isfinite(scores) & (labels >= 0) & (called >= 0)
    scores, labels, called, groups = scores[keep], labels[keep].astype(np.int64), called[keep], groups[keep]
    pos, neg = labels == 1, labels == 0
    tp, tn = int(np.sum(called[pos] == 1)), int(np.sum(called[neg] == 0))
    auc_ci = _NAN_INTERVAL
    if num_bootstrap > 0 and pos.any() and neg.any():
        auc_ci = bootstrap_interval(weighted_auc(scores, labels, patient_bootstrap_weights(groups, num_bootstrap,
                                                                                           seed=seed)), confidence)
    probability = scores.size and scores.min() >= 0.0 and scores.max() <= 1.0
    nan = float("nan")
    auc = roc_auc(scores, labels)
    warnings = []
    if min(pos.sum(), neg.sum()) < MIN_CLASS:
        warnings.append(f"{int(pos.sum())} positive and {int(neg.sum())} negative photos: too few for the AUC, "
                        f"sensitivity and specificity intervals to mean much (at least {MIN_CLASS} of each wanted)")
    warnings += _degenerate("AUC's bootstrap", auc, auc_ci)
    return Detection(
        n=int(scores.size), n_positive=int(pos.sum()), auc=auc, auc_ci=auc_ci,
        sensitivity=tp / pos.sum() if pos.any() else nan, sensitivity_ci=wilson_interval(tp, int(pos.sum()),
                                                                                         confidence),
        specificity=tn / neg.sum() if neg.any() else nan, specificity_ci=wilson_interval(tn, int(neg.sum()),
                                                                                         confidence),
        brier=float(np.mean((scores - labels) ** 2)) if probability else nan,
        auc_ci_delong=delong_interval(scores, labels, confidence), warnings=tuple(warnings))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``score >= t``: false-positive rates, true-positive rates and thresholds [T], from (0, 0) at
    t = +inf to (1, 1) at t = -inf, thresholds at the distinct scores (descending)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    called = scores[None, :] >= thresholds[:, None]
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("a ROC curve needs both classes.")
    return called[:, neg].mean(axis=1), called[:, pos].mean(axis=1), thresholds


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability diagram data: equal-width probability bins [0, 1].

    Returns:
        ``{'mean_predicted', 'observed_rate', 'count'}``, each [num_bins] (NaN rates in empty bins), and
        ``'expected_calibration_error'`` (count-weighted mean |observed - predicted| over non-empty bins, [] array).
    """
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    keep = np.isfinite(p) & (y >= 0)
    p, y = p[keep], y[keep]
    bins = np.clip((p * num_bins).astype(np.int64), 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bins, p, minlength=num_bins) / count
        rate = np.bincount(bins, y, minlength=num_bins) / count
    ece = np.nansum(count * np.abs(rate - mean_p)) / count.sum() if count.sum() else np.nan
    return {"mean_predicted": mean_p, "observed_rate": rate, "count": count,
            "expected_calibration_error": np.asarray(ece)}
