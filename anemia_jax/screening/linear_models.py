"""Linear models on standardised features (host NumPy): ridge regression and L2-penalised logistic regression.

Both standardise the features with the training data's means and standard deviations (a constant column gets scale 1, so
it contributes nothing) and leave the intercept unpenalised. `LinearModel` holds the fitted numbers, which
`anemia_jax.screening.cross_validation` (cross-validation) and `anemia_jax.screening.screening_model` (the saved
screening model) use.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.special

__all__ = ["LinearModel", "fit_logistic", "fit_ridge"]


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
