"""Anemia screening from conjunctival colour: cross-validated Hgb regression and anemia detection (host NumPy).

Inputs are per-example colour features (`anemia_jax.colour.batch_colour_features`, one row per photo, computed with
a given mask source), the laboratory haemoglobin ``hgb`` (g/dL, NaN if unknown), the ``anemic`` label (1, 0, -1
unknown) and patient-level folds: a sequence of ``(train_idx, test_idx)`` position arrays, e.g. from
``anemia_jax.splits.kfold_split(metadata, num_folds=K, fold=k, seed=s)`` for k in range(K), or
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

`screening_table` runs both for several mask sources (e.g. ground-truth and predicted masks) on the same examples
and folds, and `format_markdown` renders the comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.special
import scipy.stats

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_L2S",
    "DetectionResult",
    "LinearModel",
    "RegressionResult",
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
Folds = Sequence[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class LinearModel:
    """A linear model on standardised features: ``z = ((x - mean) / scale) @ coef + intercept``.

    For ridge `predict` returns z (Hgb); for logistic regression `predict` returns sigmoid(z) (probability).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    logistic: bool = False

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Linear score z [N] of features x [N, F]."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Hgb (ridge) or anemia probability (logistic) [N] of features x [N, F]."""
        z = self.decision(x)
        return scipy.special.expit(z) if self.logistic else z


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-12 * np.maximum(np.abs(mean), 1.0), scale, 1.0)


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"expected features [N, F] and targets [N] with N > 0; got {x.shape} and {y.shape}.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("features and targets must be finite; drop examples with missing masks or labels first.")
    return x, y


def fit_ridge(x: np.ndarray, y: np.ndarray, *, alpha: float) -> LinearModel:
    """Ridge regression ``min ||y - ybar - Z w||^2 + alpha ||w||^2`` on standardised features Z.

    Args:
        x: features [N, F]; y: targets [N]; alpha >= 0 (0 is ordinary least squares, minimum-norm if rank-deficient).
    """
    x, y = _check_xy(x, y)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha}.")
    mean, scale = _standardiser(x)
    z = (x - mean) / scale
    # The augmented least-squares form is the ridge normal equations without squaring Z's condition number.
    a = np.concatenate([z, np.sqrt(alpha) * np.eye(z.shape[1])])
    b = np.concatenate([y - y.mean(), np.zeros(z.shape[1])])
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    return LinearModel(mean, scale, coef, float(y.mean()))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float, max_iter: int = 100, tol: float = 1e-10) -> LinearModel:
    """L2-penalised logistic regression by Newton's method (IRLS) with backtracking.

    Minimises ``sum_i log(1 + exp(z_i)) - y_i z_i + l2 / 2 ||w||^2`` with z = Z w + b on standardised features Z
    (the intercept b is not penalised). With a single class in ``y`` the intercept has no finite optimum; the model
    then predicts the smoothed prevalence ``(n_pos + 0.5) / (n + 1)`` with w = 0.

    Args:
        x: features [N, F]; y: labels [N] in {0, 1}; l2 > 0.
    """
    x, y = _check_xy(x, y)
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 so that separable data have a finite optimum; got {l2}.")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("logistic labels must be 0 or 1; drop unknown (-1) labels first.")
    mean, scale = _standardiser(x)
    n, f = x.shape
    if y.min() == y.max():
        prevalence = (y.sum() + 0.5) / (n + 1.0)
        return LinearModel(mean, scale, np.zeros(f), float(scipy.special.logit(prevalence)), logistic=True)
    design = np.concatenate([np.ones((n, 1)), (x - mean) / scale], axis=1)
    penalty = np.full(f + 1, l2)
    penalty[0] = 0.0

    def objective(w):
        z = design @ w
        return np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * w * w)

    w = np.zeros(f + 1)
    w[0] = scipy.special.logit(y.mean())
    value = objective(w)
    for _ in range(max_iter):
        p = scipy.special.expit(design @ w)
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1.0 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hess + 1e-12 * np.eye(f + 1), grad)
        t = 1.0
        while True:
            new_w = w - t * step
            new_value = objective(new_w)
            if new_value <= value or t < 1e-10:
                break
            t *= 0.5
        if new_value > value:  # no descent left at machine precision: w is the optimum
            break
        decrease, w, value = value - new_value, new_w, new_value
        if decrease <= tol * max(1.0, abs(value)):
            break
    return LinearModel(mean, scale, w[1:], float(w[0]), logistic=True)


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


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t maximising Youden's J of the rule ``score >= t`` (see the module docstring for ties).

    Args:
        scores: [N] training scores; labels: [N] in {0, 1}, both classes present.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("Youden's J needs both classes among the training labels.")
    unique = np.unique(scores)
    candidates = np.concatenate([[-np.inf], (unique[:-1] + unique[1:]) / 2.0, [np.inf]])
    called = scores[None, :] >= candidates[:, None]  # [T, N]
    j = called[:, pos].mean(axis=1) + (~called[:, neg]).mean(axis=1) - 1.0
    return float(candidates[np.flatnonzero(j >= j.max() - 1e-12)[0]])


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
                             "(anemia_jax.splits) so that no patient's photos leak into its own test fold.")
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
    groups = np.asarray([g.decode("utf-8") if isinstance(g, bytes) else g for g in groups], dtype=object)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one patient id per example ({n}); got shape {groups.shape}.")
    return groups.astype(str)


def _inner_oof(x, y, groups, fit, inner_folds: int, seed: int) -> np.ndarray:
    """Out-of-fold predictions of ``fit(x_train, y_train).predict`` over grouped inner folds of the training part."""
    out = np.empty(len(y))
    for train, test in grouped_folds(groups, inner_folds, seed=seed):
        out[test] = fit(x[train], y[train]).predict(x[test])
    return out


@dataclasses.dataclass(frozen=True)
class RegressionResult:
    """Out-of-fold Hgb regression. ``predictions`` [N] is NaN where an example was not predicted (not in a test set,
    unknown Hgb or missing features); ``alphas`` [K] the ridge penalty chosen per fold. Counts are over test sets.
    ``pearson_r`` is NaN when the predictions or the targets are constant (e.g. a useless feature set)."""

    predictions: np.ndarray
    alphas: np.ndarray
    pearson_r: float
    mae: float
    rmse: float
    n: int
    n_unknown_hgb: int
    n_missing_features: int


@dataclasses.dataclass(frozen=True)
class DetectionResult:
    """Out-of-fold anemia detection. ``scores`` [N] are probabilities (NaN where not scored), ``predicted`` [N] 1/0
    (-1 where not scored); ``thresholds``/``l2s`` [K] were chosen per fold on its training part."""

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


def _usable(features: np.ndarray, target_known: np.ndarray, test_sets) -> tuple[np.ndarray, int, int]:
    """Mask of examples with a known target and finite features; unknown/missing counts over the test sets."""
    finite = np.all(np.isfinite(features), axis=1)
    tested = np.zeros(len(finite), bool)
    for test in test_sets:
        tested[test] = True
    return target_known & finite, int(np.sum(tested & ~target_known)), int(np.sum(tested & target_known & ~finite))


def _select(values, scores) -> float:
    """The last value with the lowest score (values are ascending, so ties go to the stronger penalty)."""
    scores = np.asarray(scores)
    return float(values[np.flatnonzero(scores <= scores.min() + 1e-12 * max(1.0, abs(scores.min())))[-1]])


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
    chosen = []
    alphas = sorted(alphas)
    for train, test in folds:
        train, test = train[usable[train]], test[usable[test]]
        x, y, g = features[train], hgb[train], groups[train]
        errors = [np.mean((_inner_oof(x, y, g, lambda a, b, s=alpha: fit_ridge(a, b, alpha=s), inner_folds, seed)
                           - y) ** 2) for alpha in alphas]
        alpha = _select(alphas, errors)
        chosen.append(alpha)
        if test.size:
            predictions[test] = fit_ridge(x, y, alpha=alpha).predict(features[test])
    done = np.isfinite(predictions)
    err = predictions[done] - hgb[done]
    r = (float(np.corrcoef(predictions[done], hgb[done])[0, 1])
         if done.sum() > 1 and np.ptp(predictions[done]) > 0 and np.ptp(hgb[done]) > 0 else float("nan"))
    return RegressionResult(
        predictions=predictions, alphas=np.asarray(chosen), pearson_r=r,
        mae=float(np.mean(np.abs(err))) if err.size else float("nan"),
        rmse=float(np.sqrt(np.mean(err ** 2))) if err.size else float("nan"),
        n=int(done.sum()), n_unknown_hgb=n_unknown, n_missing_features=n_missing)


def cross_validate_anemia(features: np.ndarray, anemic: np.ndarray, folds: Folds, *, groups=None,
                          l2s: Sequence[float] = DEFAULT_L2S, inner_folds: int = 5,
                          seed: int = 0) -> DetectionResult:
    """Out-of-fold anemia detection by logistic regression (protocol in the module docstring).

    Args:
        features: [N, F]; NaN rows are excluded and counted.
        anemic: [N] int, 1 anemic, 0 not, -1 unknown (excluded and counted).
        folds, groups, inner_folds, seed: as in `cross_validate_hgb`; l2s: ascending candidate penalties.

    Raises:
        ValueError: if a fold's training part lacks one of the classes (no detector can be trained).
    """
    features, anemic = np.asarray(features, np.float64), np.asarray(anemic, np.int64)
    n = len(anemic)
    groups = _groups(groups, n)
    folds = _check_folds(folds, n, groups)
    usable, n_unknown, n_missing = _usable(features, anemic >= 0, [t for _, t in folds])
    scores, predicted = np.full(n, np.nan), np.full(n, -1, np.int64)
    thresholds, chosen = [], []
    l2s = sorted(l2s)
    for k, (train, test) in enumerate(folds):
        train, test = train[usable[train]], test[usable[test]]
        x, y, g = features[train], anemic[train].astype(np.float64), groups[train]
        if y.size == 0 or y.min() == y.max():
            raise ValueError(f"fold {k}: the training part has {int(y.sum())} anemic of {y.size} usable examples; "
                             "detection needs both classes in every training part (use stratified folds).")
        oof = {l2: np.clip(_inner_oof(x, y, g, lambda a, b, s=l2: fit_logistic(a, b, l2=s), inner_folds, seed),
                           1e-12, 1 - 1e-12) for l2 in l2s}
        losses = [-np.mean(y * np.log(oof[l2]) + (1 - y) * np.log1p(-oof[l2])) for l2 in l2s]
        l2 = _select(l2s, losses)
        threshold = youden_threshold(oof[l2], y)
        chosen.append(l2)
        thresholds.append(threshold)
        if test.size:
            scores[test] = fit_logistic(x, y, l2=l2).predict(features[test])
            predicted[test] = scores[test] >= threshold
    done = predicted >= 0
    truth, call = anemic[done], predicted[done]
    pos, neg = truth == 1, truth == 0
    return DetectionResult(
        scores=scores, predicted=predicted, thresholds=np.asarray(thresholds), l2s=np.asarray(chosen),
        auc=roc_auc(scores[done], truth),
        sensitivity=float(np.mean(call[pos] == 1)) if pos.any() else float("nan"),
        specificity=float(np.mean(call[neg] == 0)) if neg.any() else float("nan"),
        n=int(done.sum()), n_positive=int(pos.sum()), n_unknown_label=n_unknown, n_missing_features=n_missing)


def screening_table(features_by_source: Mapping[str, np.ndarray], *, hgb: np.ndarray, anemic: np.ndarray,
                    folds: Folds, groups=None, common_examples: bool = True, alphas: Sequence[float] = DEFAULT_ALPHAS,
                    l2s: Sequence[float] = DEFAULT_L2S, inner_folds: int = 5, seed: int = 0) -> list[dict]:
    """Hgb regression and anemia detection for each mask source, on the same folds.

    Args:
        features_by_source: ``{source name: features [N, F]}`` (or `ColourFeatures`), e.g. ``{'ground truth': ...,
            'predicted': ...}``, every source computed on the same N photos in the same order.
        hgb, anemic, folds, groups, alphas, l2s, inner_folds, seed: as in `cross_validate_hgb` /
            `cross_validate_anemia`.
        common_examples: if True, an example whose features are missing under ANY source (e.g. an empty predicted
            mask) is dropped from every source, so rows differ only by the masks; it counts in ``n_missing_features``.

    Returns:
        One dict per source (in input order) with keys ``source``, ``pearson_r``, ``mae``, ``rmse``, ``n_hgb``,
        ``auc``, ``sensitivity``, ``specificity``, ``n_anemia``, ``n_positive``, ``n_unknown_hgb``,
        ``n_unknown_anemic``, ``n_missing_features`` (examples of the test sets without usable features: the larger of
        the regression's and the detection's count) and the full ``regression`` / ``detection`` results.
    """
    matrices = {name: np.asarray(getattr(f, "values", f), np.float64) for name, f in features_by_source.items()}
    if not matrices:
        raise ValueError("features_by_source is empty; pass at least one mask source.")
    if common_examples:
        keep = np.logical_and.reduce([np.all(np.isfinite(m), axis=1) for m in matrices.values()])
        matrices = {name: np.where(keep[:, None], m, np.nan) for name, m in matrices.items()}
    rows = []
    for name, x in matrices.items():
        reg = cross_validate_hgb(x, hgb, folds, groups=groups, alphas=alphas, inner_folds=inner_folds, seed=seed)
        det = cross_validate_anemia(x, anemic, folds, groups=groups, l2s=l2s, inner_folds=inner_folds, seed=seed)
        rows.append(dict(source=name, pearson_r=reg.pearson_r, mae=reg.mae, rmse=reg.rmse, n_hgb=reg.n, auc=det.auc,
                         sensitivity=det.sensitivity, specificity=det.specificity, n_anemia=det.n,
                         n_positive=det.n_positive, n_unknown_hgb=reg.n_unknown_hgb,
                         n_unknown_anemic=det.n_unknown_label,
                         n_missing_features=max(reg.n_missing_features, det.n_missing_features),
                         regression=reg, detection=det))
    return rows


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def format_markdown(rows: Sequence[Mapping]) -> str:
    """Renders `screening_table` rows as a markdown table (one row per mask source)."""
    lines = ["| mask source | n (Hgb) | Pearson r | MAE (g/dL) | RMSE (g/dL) | n (anemia: pos/all) | ROC AUC "
             "| sensitivity | specificity | excluded: Hgb unknown / label unknown / no features |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['n_hgb']} | {_fmt(r['pearson_r'], 3)} | {_fmt(r['mae'], 2)} | "
            f"{_fmt(r['rmse'], 2)} | {r['n_positive']}/{r['n_anemia']} | {_fmt(r['auc'], 3)} | "
            f"{_fmt(r['sensitivity'], 3)} | {_fmt(r['specificity'], 3)} | "
            f"{r['n_unknown_hgb']} / {r['n_unknown_anemic']} / {r['n_missing_features']} |")
    return "\n".join(lines) + "\n"
