"""Anemia screening from conjunctival colour: cross-validated Hgb regression and anemia detection (host NumPy).

Inputs are per-example colour features (`anemia_jax.screening.colour.batch_colour_features`, one row per photo, computed
with a given mask source), the laboratory haemoglobin ``hgb`` (g/dL, NaN if unknown), the ``anemic`` label (1, 0, -1
unknown) and patient-level folds: a sequence of ``(train_idx, test_idx)`` position arrays, e.g. from
``anemia_jax.data.splits.kfold_split(metadata, num_folds=K, fold=k, seed=s)`` for k in range(K), or
``leave_one_country_out``. Test sets must be disjoint, so each example gets at most one out-of-fold prediction.

Protocol (everything fitted on a fold's training part only; the test part is only ever scored):

* Exclusions: examples with unknown Hgb (NaN) leave the regression, examples with ``anemic == -1`` leave the
  detection, and examples with any non-finite feature (an empty or missing mask) leave both; each is counted.
* Standardisation: feature means and standard deviations of the training part (a constant column gets scale 1, so
  it contributes nothing).
* Hgb regression: ridge regression, closed form, unpenalised intercept. The penalty ``alpha`` is chosen from
  `DEFAULT_ALPHAS` by an inner patient-grouped K-fold on the training part (lowest mean squared error; ties go to the
  larger alpha). Reported on the pooled out-of-fold predictions: Pearson r, MAE and RMSE (g/dL).
* Anemia detection: L2-penalised logistic regression on the same standardised features, fitted by Newton's method
  (IRLS) with an unpenalised intercept. We model the label directly rather than thresholding predicted Hgb at the WHO
  cut-offs (12 g/dL F, 13 g/dL M): the label already encodes the sex-specific cut-off, a regressor shrinks its
  predictions towards the mean (so fixed cut-offs on them are biased), and examples without a known sex remain
  usable. ``l2`` is chosen from `DEFAULT_L2S` by the inner folds (lowest mean log loss; ties go to the larger l2).
  The decision threshold maximises Youden's J = sensitivity + specificity - 1 over the inner out-of-fold
  probabilities of the TRAINING part (in-sample probabilities would be over-confident); candidate thresholds are
  midpoints between consecutive distinct scores, ties go to the lowest threshold (the more sensitive rule, as suits
  screening), and a score at or above the threshold is called anemic. ROC AUC is the Mann-Whitney statistic (ties
  count one half) of the pooled out-of-fold probabilities; sensitivity and specificity pool the per-fold decisions.
* Screening operating point: a second threshold per fold, the highest one whose sensitivity reaches
  ``target_sensitivity`` (default 0.9) on the same inner out-of-fold probabilities of the training part
  (`clinical_stats.sensitivity_threshold`): the rule a screening programme would fix before seeing new patients.

`screening_table` runs both for several feature sources (e.g. ground-truth and predicted masks, with and without colour
constancy) on the same examples and folds and adds the clinical statistics of `anemia_jax.screening.clinical_stats`
(Bland-Altman bias and limits of agreement, MAE, RMSE, r and AUC with patient-bootstrap 95% intervals, sensitivity and
specificity at the screening operating point with Wilson intervals); `format_markdown` renders the comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from anemia_jax.screening import clinical_stats

# Re-exported: these lived here before the clinical statistics and the linear models got their own modules.
from anemia_jax.screening.clinical_stats import roc_auc, youden_threshold
from anemia_jax.screening.linear_models import LinearModel, fit_logistic, fit_ridge
from anemia_jax.utils.conversions import as_text

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_L2S",
    "DEFAULT_TARGET_SENSITIVITY",
    "DetectionResult",
    "LinearModel",
    "RegressionResult",
    "choose_l2",
    "choose_alpha",
    "cross_validate_anemia",
    "cross_validate_hgb",
    "fit_logistic",
    "fit_ridge",
    "format_markdown",
    "grouped_folds",
    "roc_auc",
    "screening_table",
    "youden_threshold",
]

DEFAULT_ALPHAS = tuple(10.0 ** k for k in range(-3, 4))
DEFAULT_L2S = tuple(10.0 ** k for k in range(-2, 4))
DEFAULT_TARGET_SENSITIVITY = 0.9
Folds = Sequence[tuple[np.ndarray, np.ndarray]]


def grouped_folds(groups: np.ndarray, num_folds: int, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds with every group (patient) wholly on one side; groups shuffled by ``seed``, dealt round-robin.

    Used for the inner model selection; ``num_folds`` is capped at the number of groups (at least 2 needed).
    """
    groups = np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    k = min(num_folds, len(unique))
    if k < 2:
        raise ValueError(f"need at least 2 patients for a cross-validation split; got {len(unique)}.")
    fold_of_group = np.empty(len(unique), np.int64)
    fold_of_group[np.random.default_rng(seed).permutation(len(unique))] = np.arange(len(unique)) % k
    fold = fold_of_group[inverse]
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def _check_folds(folds: Folds, n: int, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    checked, seen = [], np.zeros(n, bool)
    for k, (train, test) in enumerate(folds):
        train, test = np.asarray(train, np.int64).ravel(), np.asarray(test, np.int64).ravel()
        for name, idx in (("train", train), ("test", test)):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"fold {k}: {name} indices must lie in [0, {n}); got [{idx.min()}, {idx.max()}].")
        if np.intersect1d(train, test).size:
            raise ValueError(f"fold {k}: some examples are in both the training and the test part.")
        shared = np.intersect1d(groups[train], groups[test])
        if shared.size:
            raise ValueError(f"fold {k}: patients {shared[:5].tolist()} are on both sides; use patient-level folds "
                             "(anemia_jax.data.splits) so that no patient's photos leak into its own test fold.")
        if seen[test].any():
            raise ValueError(f"fold {k}: test sets overlap earlier folds; each example may be tested once.")
        seen[test] = True
        checked.append((train, test))
    if not checked:
        raise ValueError("folds is empty; pass a list of (train_idx, test_idx) pairs.")
    return checked


def _groups(groups, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    groups = np.asarray([as_text(g) for g in groups], dtype=object)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one patient id per example ({n}); got shape {groups.shape}.")
    return groups.astype(str)


def _inner_oof(x, y, groups, fit, inner_folds: int, seed: int) -> np.ndarray:
    """Out-of-fold predictions of ``fit(x_train, y_train).predict`` over grouped inner folds of the training part."""
    out = np.empty(len(y))
    for train, test in grouped_folds(groups, inner_folds, seed=seed):
        out[test] = fit(x[train], y[train]).predict(x[test])
    return out


def _select(values, scores) -> float:
    """The last value with the lowest score (values are ascending, so ties go to the stronger penalty)."""
    scores = np.asarray(scores)
    return float(values[np.flatnonzero(scores <= scores.min() + 1e-12 * max(1.0, abs(scores.min())))[-1]])


def choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 inner_folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray]:
    """The ridge penalty of lowest inner out-of-fold MSE (ties: larger), and those inner predictions [N].

    Args:
        x: [N, F] finite features; y: [N] Hgb; groups: [N] patient ids (the inner folds are patient-grouped).
    """
    alphas = sorted(alphas)
    oof = [_inner_oof(x, y, groups, lambda a, b, s=alpha: fit_ridge(a, b, alpha=s), inner_folds, seed)
           for alpha in alphas]
    best = alphas.index(_select(alphas, [np.mean((o - y) ** 2) for o in oof]))
    return alphas[best], oof[best]


def choose_l2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, l2s: Sequence[float] = DEFAULT_L2S,
              inner_folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray]:
    """The logistic penalty of lowest inner out-of-fold log loss (ties: larger), and those inner probabilities [N].

    Args:
        x: [N, F] finite features; y: [N] labels in {0, 1}; groups: [N] patient ids.
    """
    l2s = sorted(l2s)
    oof = [np.clip(_inner_oof(x, y, groups, lambda a, b, s=l2: fit_logistic(a, b, l2=s), inner_folds, seed),
                   1e-12, 1 - 1e-12) for l2 in l2s]
    losses = [-np.mean(y * np.log(o) + (1 - y) * np.log1p(-o)) for o in oof]
    best = l2s.index(_select(l2s, losses))
    return l2s[best], oof[best]


@dataclasses.dataclass(frozen=True)
class RegressionResult:
    """Out-of-fold Hgb regression. ``predictions`` [N] is NaN where an example was not predicted (not in a test set,
    unknown Hgb or missing features); ``alphas`` [K] the ridge penalty chosen per fold and ``models`` the K fitted
    fold models (fold k's model predicted fold k's test part). Counts are over test sets. ``pearson_r`` is NaN when
    the predictions or the targets are constant (e.g. a useless feature set)."""

    predictions: np.ndarray
    alphas: np.ndarray
    pearson_r: float
    mae: float
    rmse: float
    n: int
    n_unknown_hgb: int
    n_missing_features: int
    models: tuple[LinearModel, ...] = ()


@dataclasses.dataclass(frozen=True)
class DetectionResult:
    """Out-of-fold anemia detection. ``scores`` [N] are probabilities (NaN where not scored), ``predicted`` [N] 1/0
    at the Youden threshold and ``screening_predicted`` [N] at the screening threshold (-1 where not scored);
    ``thresholds`` (Youden), ``screening_thresholds`` and ``l2s`` [K] were chosen per fold on its training part;
    ``sensitivity``/``specificity`` are those of ``predicted``."""

    scores: np.ndarray
    predicted: np.ndarray
    thresholds: np.ndarray
    l2s: np.ndarray
    auc: float
    sensitivity: float
    specificity: float
    n: int
    n_positive: int
    n_unknown_label: int
    n_missing_features: int
    screening_predicted: np.ndarray | None = None
    screening_thresholds: np.ndarray | None = None
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    models: tuple[LinearModel, ...] = ()


def _usable(features: np.ndarray, target_known: np.ndarray, test_sets) -> tuple[np.ndarray, int, int]:
    """Mask of examples with a known target and finite features; unknown/missing counts over the test sets."""
    finite = np.all(np.isfinite(features), axis=1)
    tested = np.zeros(len(finite), bool)
    for test in test_sets:
        tested[test] = True
    return target_known & finite, int(np.sum(tested & ~target_known)), int(np.sum(tested & target_known & ~finite))


def cross_validate_hgb(features: np.ndarray, hgb: np.ndarray, folds: Folds, *, groups=None,
                       alphas: Sequence[float] = DEFAULT_ALPHAS, inner_folds: int = 5,
                       seed: int = 0) -> RegressionResult:
    """Out-of-fold ridge regression of Hgb from colour features (protocol in the module docstring).

    Args:
        features: [N, F] (e.g. ``ColourFeatures.values``); NaN rows are excluded and counted.
        hgb: [N] g/dL, NaN if unknown (excluded and counted).
        folds: K ``(train_idx, test_idx)`` pairs of positions into the N examples, patient-level.
        groups: [N] patient ids (checked against the folds, and used for the inner folds); None = one per example.
        alphas: ascending candidate ridge penalties; inner_folds: inner K; seed: inner fold shuffling.
    """
    features, hgb = np.asarray(features, np.float64), np.asarray(hgb, np.float64)
    n = len(hgb)
    groups = _groups(groups, n)
    folds = _check_folds(folds, n, groups)
    usable, n_unknown, n_missing = _usable(features, np.isfinite(hgb), [t for _, t in folds])
    predictions = np.full(n, np.nan)
    chosen, models = [], []
    for train, test in folds:
        train, test = train[usable[train]], test[usable[test]]
        x, y = features[train], hgb[train]
        alpha, _ = choose_alpha(x, y, groups[train], alphas=alphas, inner_folds=inner_folds, seed=seed)
        chosen.append(alpha)
        models.append(fit_ridge(x, y, alpha=alpha))
        if test.size:
            predictions[test] = models[-1].predict(features[test])
    done = np.isfinite(predictions)
    err = predictions[done] - hgb[done]
    r = (float(np.corrcoef(predictions[done], hgb[done])[0, 1])
         if done.sum() > 1 and np.ptp(predictions[done]) > 0 and np.ptp(hgb[done]) > 0 else float("nan"))
    return RegressionResult(
        predictions=predictions, alphas=np.asarray(chosen), pearson_r=r,
        mae=float(np.mean(np.abs(err))) if err.size else float("nan"),
        rmse=float(np.sqrt(np.mean(err ** 2))) if err.size else float("nan"),
        n=int(done.sum()), n_unknown_hgb=n_unknown, n_missing_features=n_missing, models=tuple(models))


def cross_validate_anemia(features: np.ndarray, anemic: np.ndarray, folds: Folds, *, groups=None,
                          l2s: Sequence[float] = DEFAULT_L2S, inner_folds: int = 5, seed: int = 0,
                          target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> DetectionResult:
    """Out-of-fold anemia detection by logistic regression (protocol in the module docstring).

    Args:
        features: [N, F]; NaN rows are excluded and counted.
        anemic: [N] int, 1 anemic, 0 not, -1 unknown (excluded and counted).
        folds, groups, inner_folds, seed: as in `cross_validate_hgb`; l2s: ascending candidate penalties.
        target_sensitivity: the sensitivity the screening threshold must reach on each training part.

    Raises:
        ValueError: if a fold's training part lacks one of the classes (no detector can be trained).
    """
    features, anemic = np.asarray(features, np.float64), np.asarray(anemic, np.int64)
    n = len(anemic)
    groups = _groups(groups, n)
    folds = _check_folds(folds, n, groups)
    usable, n_unknown, n_missing = _usable(features, anemic >= 0, [t for _, t in folds])
    scores, predicted, screened = np.full(n, np.nan), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    thresholds, screening_thresholds, chosen, models = [], [], [], []
    for k, (train, test) in enumerate(folds):
        train, test = train[usable[train]], test[usable[test]]
        x, y = features[train], anemic[train].astype(np.float64)
        if y.size == 0 or y.min() == y.max():
            raise ValueError(f"fold {k}: the training part has {int(y.sum())} anemic of {y.size} usable examples; "
                             "detection needs both classes in every training part (use stratified folds).")
        l2, oof = choose_l2(x, y, groups[train], l2s=l2s, inner_folds=inner_folds, seed=seed)
        chosen.append(l2)
        thresholds.append(clinical_stats.youden_threshold(oof, y))
        screening_thresholds.append(clinical_stats.sensitivity_threshold(oof, y, target_sensitivity))
        models.append(fit_logistic(x, y, l2=l2))
        if test.size:
            scores[test] = models[-1].predict(features[test])
            predicted[test] = scores[test] >= thresholds[-1]
            screened[test] = scores[test] >= screening_thresholds[-1]
    done = predicted >= 0
    truth, call = anemic[done], predicted[done]
    pos, neg = truth == 1, truth == 0
    return DetectionResult(
        scores=scores, predicted=predicted, thresholds=np.asarray(thresholds), l2s=np.asarray(chosen),
        auc=roc_auc(scores[done], truth),
        sensitivity=float(np.mean(call[pos] == 1)) if pos.any() else float("nan"),
        specificity=float(np.mean(call[neg] == 0)) if neg.any() else float("nan"),
        n=int(done.sum()), n_positive=int(pos.sum()), n_unknown_label=n_unknown, n_missing_features=n_missing,
        screening_predicted=screened, screening_thresholds=np.asarray(screening_thresholds),
        target_sensitivity=float(target_sensitivity), models=tuple(models))


def screening_table(features_by_source: Mapping[str, np.ndarray], *, hgb: np.ndarray, anemic: np.ndarray,
                    folds: Folds, groups=None, common_examples: bool = True, alphas: Sequence[float] = DEFAULT_ALPHAS,
                    l2s: Sequence[float] = DEFAULT_L2S, inner_folds: int = 5, seed: int = 0,
                    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, num_bootstrap: int = 2000,
                    confidence: float = 0.95) -> list[dict]:
    """Hgb regression and anemia detection for each feature source, on the same folds, with clinical statistics.

    Args:
        features_by_source: ``{source name: features [N, F]}`` (or `ColourFeatures`), e.g. ``{'ground truth': ...,
            'predicted': ...}``, every source computed on the same N photos in the same order.
        hgb, anemic, folds, groups, alphas, l2s, inner_folds, seed, target_sensitivity: as in `cross_validate_hgb` /
            `cross_validate_anemia`.
        common_examples: if True, an example whose features are missing under ANY source (e.g. an empty predicted
            mask) is dropped from every source, so rows differ only by the features; it counts in
            ``n_missing_features``.
        num_bootstrap, confidence: the patient-level bootstrap of the intervals (`clinical_stats`; 0 = none), whose
            replicates are the same for every source (one seed), so rows are compared on the same resamples.

    Returns:
        One dict per source (in input order) with keys ``source``, ``pearson_r``, ``mae``, ``rmse``, ``n_hgb``,
        ``auc``, ``sensitivity``, ``specificity`` (Youden), ``n_anemia``, ``n_positive``, ``n_unknown_hgb``,
        ``n_unknown_anemic``, ``n_missing_features`` (examples of the test sets without usable features: the larger of
        the regression's and the detection's count), ``agreement`` (`clinical_stats.Agreement` of the out-of-fold
        Hgb), ``screening`` (`clinical_stats.Detection` at the screening threshold, with the AUC interval) and the
        full ``regression`` / ``detection`` results.
    """
    matrices = {name: np.asarray(getattr(f, "values", f), np.float64) for name, f in features_by_source.items()}
    if not matrices:
        raise ValueError("features_by_source is empty; pass at least one feature source.")
    if common_examples:
        usable = {name: np.all(np.isfinite(m), axis=1) for name, m in matrices.items()}
        keep = np.logical_and.reduce(list(usable.values()))
        if keep.sum() < 2:
            worst = min(usable, key=lambda k: usable[k].sum())
            raise ValueError(f"only {int(keep.sum())} photos have usable features under every source; "
                             f"{worst!r} has {int(usable[worst].sum())} of {len(keep)}. Drop that source or pass "
                             "common_examples=False.")
        matrices = {name: np.where(keep[:, None], m, np.nan) for name, m in matrices.items()}
    hgb, anemic = np.asarray(hgb, np.float64), np.asarray(anemic, np.int64)
    group_ids = _groups(groups, len(hgb))
    rows = []
    for name, x in matrices.items():
        reg = cross_validate_hgb(x, hgb, folds, groups=groups, alphas=alphas, inner_folds=inner_folds, seed=seed)
        det = cross_validate_anemia(x, anemic, folds, groups=groups, l2s=l2s, inner_folds=inner_folds, seed=seed,
                                    target_sensitivity=target_sensitivity)
        stats = dict(num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
        rows.append(dict(source=name, pearson_r=reg.pearson_r, mae=reg.mae, rmse=reg.rmse, n_hgb=reg.n, auc=det.auc,
                         sensitivity=det.sensitivity, specificity=det.specificity, n_anemia=det.n,
                         n_positive=det.n_positive, n_unknown_hgb=reg.n_unknown_hgb,
                         n_unknown_anemic=det.n_unknown_label,
                         n_missing_features=max(reg.n_missing_features, det.n_missing_features),
                         agreement=clinical_stats.agreement(reg.predictions, hgb, group_ids, **stats),
                         screening=clinical_stats.detection(det.scores, anemic, det.screening_predicted, group_ids,
                                                            **stats),
                         regression=reg, detection=det))
    return rows


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(value: float, interval, digits: int) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not np.all(np.isfinite(interval)):
        return _fmt(value, digits)
    return f"{value:.{digits}f} ({interval[0]:.{digits}f}, {interval[1]:.{digits}f})"


def _pair(value: float, parametric, bootstrap, digits: int) -> str:
    """``value (parametric interval) [bootstrap interval]``."""
    if not np.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    for interval, (left, right) in ((parametric, "()"), (bootstrap, "[]")):
        if np.all(np.isfinite(interval)):
            text += f" {left}{interval[0]:.{digits}f}, {interval[1]:.{digits}f}{right}"
    return text


def format_markdown(rows: Sequence[Mapping]) -> str:
    """Renders `screening_table` rows as two markdown tables (Hgb agreement, anemia detection), one row per source,
    and the warnings of their statistics.

    Intervals are 95% (or the table's ``confidence``): in parentheses the parametric ones that hold at small n
    (limits of agreement: exact, Carkeet 2015; r: Fisher z; AUC: DeLong), in brackets the patient-bootstrap
    percentile ones; Wilson intervals for sensitivity and specificity at the screening threshold.
    """
    lines = ["| source | n (Hgb) | Pearson r (Fisher z) [bootstrap] | MAE (g/dL) | RMSE (g/dL) | bias (g/dL) | "
             "lower limit of agreement (exact) [bootstrap] | upper limit of agreement (exact) [bootstrap] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["agreement"]
        lines.append(f"| {r['source']} | {r['n_hgb']} | "
                     f"{_pair(a.pearson_r, a.pearson_r_ci_fisher, a.pearson_r_ci, 3)} | "
                     f"{_ci(a.mae, a.mae_ci, 2)} | {_ci(a.rmse, a.rmse_ci, 2)} | {_ci(a.bias, a.bias_ci, 2)} | "
                     f"{_pair(a.loa[0], a.loa_lo_ci_exact, a.loa_lo_ci, 2)} | "
                     f"{_pair(a.loa[1], a.loa_hi_ci_exact, a.loa_hi_ci, 2)} |")
    target = rows[0]["detection"].target_sensitivity if rows else DEFAULT_TARGET_SENSITIVITY
    lines += ["", f"| source | n (anemia: pos/all) | ROC AUC (DeLong) [bootstrap] | sensitivity / specificity "
              f"(Youden) | sensitivity (screening, target {target:g}) | specificity (screening) | Brier | excluded: "
              "Hgb unknown / label unknown / no features |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["screening"]
        lines.append(
            f"| {r['source']} | {r['n_positive']}/{r['n_anemia']} | {_pair(r['auc'], s.auc_ci_delong, s.auc_ci, 3)} | "
            f"{_fmt(r['sensitivity'], 3)} / {_fmt(r['specificity'], 3)} | "
            f"{_ci(s.sensitivity, s.sensitivity_ci, 3)} | {_ci(s.specificity, s.specificity_ci, 3)} | "
            f"{_fmt(s.brier, 3)} | {r['n_unknown_hgb']} / {r['n_unknown_anemic']} / {r['n_missing_features']} |")
    warnings = [f"- {r['source']}: {w}" for r in rows for w in (*r["agreement"].warnings, *r["screening"].warnings)]
    if warnings:
        lines += ["", "**Warnings** (intervals that mean little):", "", *dict.fromkeys(warnings)]
    return "\n".join(lines) + "\n"
