"""A saved screening model: conjunctival colour features -> Hgb with a prediction interval and an anemia call.

`fit_screening_model` fits, on OUT-OF-FOLD colour features (photos whose masks came from segmentation models that
did not train on them, as `anemia_jax.screening.fit` computes them with the model's `features.FeatureSpec`), the same
two models whose out-of-fold
performance `anemia_jax.screening.cross_validation` reports, now on all the photos:

* Hgb: ridge regression (`cross_validation.choose_alpha` picks the penalty by inner patient-grouped folds).
* Prediction interval: CV+ (Barber, Candes, Ramdas & Tibshirani 2021, "Predictive inference with the jackknife+",
  Ann. Statist. 49(1):486-507), the cross-validation form of split-conformal prediction, which spends no photo on a
  separate calibration set. The K fold models of the cross-validation (each fitted without its test fold) and every
  photo's absolute out-of-fold residual R_i are stored; for a new photo x with fold predictions mu_k(x),
  ``lo = the floor(a (n+1))-th smallest of mu_k(i)(x) - R_i``, ``hi = the ceil((1-a)(n+1))-th smallest of
  mu_k(i)(x) + R_i`` (a = 1 - coverage; an order beyond n gives an infinite bound). Guarantee (distribution-free,
  photos exchangeable with the training photos): P(Hgb in [lo, hi]) >= 1 - 2a minus a term of order K/n (their
  Theorem 4), marginally over new photos, not conditionally on one; in practice coverage is close to 1 - a (the
  synthetic test measures it). The point estimate is the model fitted on all photos. It does NOT survive a shift
  (a new phone, light or population): re-fit on photos from the new setting.
* Anemia: L2-penalised logistic regression (`cross_validation.choose_l2`) of the WHO label; the operating threshold is
  the highest one reaching ``target_sensitivity`` on the inner out-of-fold probabilities (`clinical_stats.
  sensitivity_threshold`). A probability at or above it is called anemic.
* WHO thresholds (non-pregnant adults): Hgb < 12 g/dL women, < 13 g/dL men. Sex is optional: with unknown sex the
  HIGHER threshold (13 g/dL) is used, so a missing sex never hides anemia (the cost: women between 12 and 13 g/dL
  are flagged). The classifier does not use sex (its labels already encode the sex-specific cut-off); sex only sets
  the threshold that the Hgb interval is compared with (``hgb_vs_who``: 'below' if hi < t, 'above' if lo >= t,
  else 'straddles').

* The photos it can speak for (`colour_domain.ColourDomain`, fitted on the same photos and folds): a photo darker
  or brighter than the training photos, or whose light (a cast estimate from the pixels outside the mask) or colour
  features lie beyond what the training photos reached out of fold, gets a ``flag`` ('too_dark', 'too_bright',
  'unusual_colour') and a reason; `photo_report` sends it to retake. Its estimate is still computed here (for
  research); the outputs a health worker reads withhold it.

The artifact is one small JSON file (`save` / `load`, schema `SCHEMA_VERSION`): the feature spec (which mask, at
what size, which threshold, constancy and features: `features.FeatureSpec`, the one definition of how a photo becomes
the model's input), scaler, coefficients and intercepts, penalties, the CV+ fold models and residuals,
the threshold, the WHO thresholds, the colour domain, the training protocol (what it was fitted on: `training`) and the
out-of-fold metrics it reached. Floats are written
with Python's shortest round-trip repr, so a loaded model predicts bit-identically. Pure NumPy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.screening import clinical_stats, colour, colour_domain, cross_validation, model_schema
from anemia_jax.screening.features import FeatureSpec
from anemia_jax.screening.linear_models import LinearModel, fit_logistic, fit_ridge
from anemia_jax.screening.model_schema import FORMAT, SCHEMA_VERSION, WHO_THRESHOLD_RANGE_G_DL  # noqa: F401 -- public names
from anemia_jax.screening.wording import REASONS
from anemia_jax.utils import atomic

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "WHO_THRESHOLDS_G_DL",
    "ScreeningModel",
    "ScreeningPredictions",
    "fit_screening_model",
    "load",
    "normalise_sex",
]

WHO_THRESHOLDS_G_DL = {"F": 12.0, "M": 13.0, "unknown": 13.0}
DEFAULT_EXTRAPOLATION_Z = 5.0
_SEX = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M",
        "": "unknown", "u": "unknown", "unknown": "unknown", "?": "unknown", "na": "unknown", "n/a": "unknown"}


def normalise_sex(value: Any) -> str:
    """'F', 'M' or 'unknown' from F/M/female/male/woman/man (any case), None, NaN or ''/'unknown'/'U'/'NA'/'?'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    key = value.decode() if isinstance(value, bytes) else str(value)
    if key.strip().lower() not in _SEX:
        raise ValueError(f"unknown sex {value!r}; use F/female, M/male, or leave it empty for unknown.")
    return _SEX[key.strip().lower()]


@dataclasses.dataclass(frozen=True)
class ScreeningPredictions:
    """Per-photo results of `ScreeningModel.predict`, every field [N].

    ``hgb`` (g/dL) and its interval ``hgb_lo``/``hgb_hi``, ``p_anemia``, are NaN and ``anemic`` is -1 where the photo
    could not be screened; ``anemic`` is 1/0 otherwise (``p_anemia >= threshold``). ``sex`` is 'F'/'M'/'unknown',
    ``who_threshold`` the threshold used for it, ``hgb_vs_who`` 'below'/'above'/'straddles' ('' if not screened).
    ``flag`` says why a photo was not screened or why its estimate must not be used ('' when neither): 'no_mask',
    'no_reference' (colour constancy found no reference pixel), 'missing' (NaN features given), 'too_dark',
    'too_bright' or 'unusual_colour' (`colour_domain`, or a feature beyond ``extrapolation_z`` training SDs);
    ``reason`` is the same in plain words, ``detail`` the measurement behind it.
    """

    hgb: np.ndarray
    hgb_lo: np.ndarray
    hgb_hi: np.ndarray
    p_anemia: np.ndarray
    anemic: np.ndarray
    sex: np.ndarray
    who_threshold: np.ndarray
    hgb_vs_who: np.ndarray
    flag: np.ndarray
    reason: np.ndarray
    detail: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        """One dict per photo (the field names as keys, Python scalars), e.g. for a CSV writer."""
        fields = [f.name for f in dataclasses.fields(self)]
        return [{k: _scalar(getattr(self, k)[i]) for k in fields} for i in range(len(self.hgb))]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _linear_json(m: LinearModel) -> dict[str, Any]:
    return {"mean": m.mean.tolist(), "scale": m.scale.tolist(), "coef": m.coef.tolist(),
            "intercept": float(m.intercept)}


@dataclasses.dataclass(frozen=True)
class ScreeningModel:
    """A fitted screening model (see the module docstring); build it with `fit_screening_model` or `load`."""

    feature_names: tuple[str, ...]
    feature_spec: FeatureSpec
    regression: LinearModel
    alpha: float
    fold_models: tuple[LinearModel, ...]
    residual_fold: np.ndarray
    abs_residuals: np.ndarray
    coverage: float
    classifier: LinearModel
    l2: float
    threshold: float
    target_sensitivity: float
    who_thresholds: dict[str, float]
    extrapolation_z: float
    training: dict[str, Any]
    metrics: dict[str, Any]
    domain: colour_domain.ColourDomain | None = None

    @property
    def constancy(self) -> str:
        """The colour constancy its features are computed with (``feature_spec.constancy``)."""
        return self.feature_spec.constancy

    def interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CV+ prediction interval (lo, hi) [M] of finite features x [M, F] at ``coverage``."""
        n = len(self.abs_residuals)
        fold_pred = np.stack([m.predict(x) for m in self.fold_models], axis=1)[:, self.residual_fold]  # [M, n]
        # The rounding guards the order statistics against 0.9 * 10 = 9.000000000000002.
        k_lo = math.floor(round((1.0 - self.coverage) * (n + 1), 9))
        k_hi = math.ceil(round(self.coverage * (n + 1), 9))
        lo = (np.sort(fold_pred - self.abs_residuals, axis=1)[:, k_lo - 1] if k_lo >= 1
              else np.full(len(x), -np.inf))
        hi = (np.sort(fold_pred + self.abs_residuals, axis=1)[:, k_hi - 1] if k_hi <= n
              else np.full(len(x), np.inf))
        return lo, hi

    def _matrix(self, features) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(features, colour.ColourFeatures):
            if features.constancy != self.constancy:
                raise ValueError(f"features were computed with colour constancy {features.constancy!r} but this "
                                 f"model was trained with {self.constancy!r}; compute them with the model's "
                                 "feature_spec.compute(...).")
            missing = [n for n in self.feature_names if n not in features.names]
            if missing:
                raise ValueError(f"features lack {missing}, which this model needs ({list(self.feature_names)}).")
            return features.select(self.feature_names).values, features.num_pixels
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"features must be [N, {len(self.feature_names)}] in the order "
                             f"{list(self.feature_names)} (or a colour.ColourFeatures); got shape {x.shape}.")
        return x, None

    def predict(self, features: colour.ColourFeatures | np.ndarray,
                sex: str | Sequence[Any] | None = None) -> ScreeningPredictions:
        """Hgb estimate, prediction interval, probability of anemia and the call for each photo.

        Args:
            features: `colour.ColourFeatures` of N photos (names and constancy are checked against the model), or
                an [N, F] array in ``feature_names`` order; NaN rows are reported as not screened.
            sex: None (all unknown), one value for every photo, or N values (see `normalise_sex`).
        """
        x, num_pixels = self._matrix(features)
        n = len(x)
        if sex is None or isinstance(sex, (str, bytes)):
            sexes = [normalise_sex(sex)] * n
        else:
            if len(sex) != n:
                raise ValueError(f"got {len(sex)} sex values for {n} photos; pass one per photo, one for all, "
                                 "or None.")
            sexes = [normalise_sex(s) for s in sex]
        ok = np.all(np.isfinite(x), axis=1)
        hgb, lo, hi, p = (np.full(n, np.nan) for _ in range(4))
        if ok.any():
            hgb[ok] = self.regression.predict(x[ok])
            lo[ok], hi[ok] = self.interval(x[ok])
            p[ok] = self.classifier.predict(x[ok])
        anemic = np.where(ok, (p >= self.threshold).astype(np.int64), -1)
        thresholds = np.array([self.who_thresholds[s] for s in sexes], np.float64)
        vs = np.where(~ok, "", np.where(hi < thresholds, "below", np.where(lo >= thresholds, "above", "straddles")))
        flags = [self._flag(x, num_pixels, ok, i, checked) for i, checked in
                 enumerate(self.domain.flags(features, x) if self.domain is not None
                           and isinstance(features, colour.ColourFeatures) else [("", "")] * n)]
        flag, reason, detail = (np.array([f[k] for f in flags] or [], dtype=object) for k in range(3))
        return ScreeningPredictions(hgb=hgb, hgb_lo=lo, hgb_hi=hi, p_anemia=p, anemic=anemic,
                                    sex=np.array(sexes, dtype=object), who_threshold=thresholds,
                                    hgb_vs_who=vs.astype(object), flag=flag, reason=reason, detail=detail)

    def _flag(self, x: np.ndarray, num_pixels, ok: np.ndarray, i: int, checked: tuple[str, str]
              ) -> tuple[str, str, str]:
        """``(flag, reason, detail)`` of photo i (`ScreeningPredictions`); ``checked`` is the domain's verdict."""
        code, detail = checked
        if code in ("too_dark", "too_bright"):  # first: exposure explains whatever else went wrong
            return code, REASONS[code], detail
        if not ok[i]:
            if num_pixels is None:
                return "missing", REASONS["missing"], "NaN features given"
            if num_pixels[i] == 0:
                return "no_mask", REASONS["no_mask"], "empty mask at the feature size"
            return "no_reference", REASONS["no_reference"], (f"no unclipped pixel outside the mask for "
                                                             f"{self.constancy!r} colour constancy")
        if code:
            return code, REASONS[code], detail
        z = np.abs((x[i] - self.regression.mean) / self.regression.scale)
        if z.max() > self.extrapolation_z:
            j = int(np.argmax(z))
            return "unusual_colour", REASONS["unusual_colour"], (f"{self.feature_names[j]} is {z[j]:.1f} training "
                                                                 "SDs from the mean")
        return "", "", ""

    def to_json(self) -> dict[str, Any]:
        """The artifact as JSON-ready Python (lists and floats)."""
        return {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "feature_names": list(self.feature_names),
            "feature_spec": self.feature_spec.to_json(),
            "regression": {**_linear_json(self.regression), "alpha": self.alpha},
            "prediction_interval": {
                "method": "cv_plus", "coverage": self.coverage,
                "guarantee": "P(Hgb in [lo, hi]) >= 1 - 2(1 - coverage) - O(K/n) for exchangeable photos "
                             "(Barber et al. 2021, Thm 4); empirically about `coverage`",
                "fold_models": [_linear_json(m) for m in self.fold_models],
                "residual_fold": self.residual_fold.tolist(), "abs_residuals": self.abs_residuals.tolist()},
            "classifier": {**_linear_json(self.classifier), "l2": self.l2, "threshold": self.threshold,
                           "target_sensitivity": self.target_sensitivity,
                           "threshold_rule": "highest threshold reaching target_sensitivity on the inner "
                                             "out-of-fold probabilities of the training photos; p >= threshold "
                                             "is called anemic"},
            "who_thresholds_g_dl": dict(self.who_thresholds),
            "unknown_sex_rule": "the higher (men's) threshold, so that a missing sex never hides anemia",
            "extrapolation_z": self.extrapolation_z,
            "domain": None if self.domain is None else _finite_json(self.domain.to_json()),
            "training": self.training, "metrics": self.metrics}

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes the JSON artifact (strict JSON: no NaN/Infinity) atomically: complete under its name or absent;
        returns its path."""
        path = pathlib.Path(path)
        atomic.ensure_dir(path.parent)
        atomic.write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def _from_json(data: Any, source: str) -> ScreeningModel:
    return ScreeningModel(**model_schema.read_fields(data, source))


def load(path: str | pathlib.Path) -> ScreeningModel:
    """Reads and validates a screening model artifact written by `ScreeningModel.save`."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no screening model at {path}; python -m anemia_jax.fit_screening writes one.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"screening model {path} is not valid JSON ({e}); was the file truncated?") from e
    return _from_json(data, str(path))


def fit_screening_model(features: colour.ColourFeatures, *, hgb: np.ndarray, anemic: np.ndarray, groups: Sequence,
                        folds: cross_validation.Folds, coverage: float = 0.9,
                        target_sensitivity: float = cross_validation.DEFAULT_TARGET_SENSITIVITY,
                        alphas: Sequence[float] = cross_validation.DEFAULT_ALPHAS,
                        l2s: Sequence[float] = cross_validation.DEFAULT_L2S, inner_folds: int = 5, seed: int = 0,
                        feature_spec: FeatureSpec, training: Mapping[str, Any] | None = None,
                        extrapolation_z: float = DEFAULT_EXTRAPOLATION_Z, num_bootstrap: int = 2000) -> ScreeningModel:
    """Fits the screening model on N photos' out-of-fold colour features (module docstring).

    Args:
        features: `colour.ColourFeatures` [N, F] (its names and constancy go into the artifact); NaN rows are left
            out. hgb: [N] g/dL (NaN unknown); anemic: [N] 1/0/-1; groups: [N] patient ids.
        folds: K patient-level ``(train_idx, test_idx)`` pairs covering every photo once (the CV+ folds; also the
            folds of the reported out-of-fold metrics).
        coverage: of the prediction interval, in (0, 1); target_sensitivity: of the operating threshold.
        alphas, l2s, inner_folds, seed: the model selection, as in `anemia_jax.screening.cross_validation`.
        feature_spec: how the features were computed (`FeatureSpec.compute`), saved in the artifact so that
            serving computes them the same way; its names and constancy must be those of ``features``.
        training: protocol to record (runs, commit, data); extrapolation_z: |z| beyond which a photo is flagged.
        num_bootstrap: patient-bootstrap replicates of the recorded metrics' intervals.
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1); got {coverage}.")
    if tuple(features.names) != feature_spec.names or features.constancy != feature_spec.constancy:
        raise ValueError(f"features ({features.names}, constancy {features.constancy!r}) were not computed with the "
                         f"feature spec ({feature_spec.names}, constancy {feature_spec.constancy!r}): compute them "
                         "with feature_spec.compute(...).")
    x = np.asarray(features.values, np.float64)
    hgb, anemic = np.asarray(hgb, np.float64), np.asarray(anemic, np.int64)
    group_ids = np.asarray(groups).astype(str)
    tested = np.zeros(len(x), bool)
    for _, test in folds:
        tested[np.asarray(test, np.int64)] = True
    if not tested.all():
        raise ValueError(f"{int((~tested).sum())} photos are in no test fold; CV+ needs folds that cover every "
                         "photo once (e.g. screening.grouped_folds).")
    finite = np.all(np.isfinite(x), axis=1)
    reg_cv = cross_validation.cross_validate_hgb(x, hgb, folds, groups=group_ids, alphas=alphas,
                                                 inner_folds=inner_folds, seed=seed)
    det_cv = cross_validation.cross_validate_anemia(x, anemic, folds, groups=group_ids, l2s=l2s,
                                                    inner_folds=inner_folds, seed=seed,
                                                    target_sensitivity=target_sensitivity)
    fold_of = np.empty(len(x), np.int64)
    for k, (_, test) in enumerate(folds):
        fold_of[np.asarray(test, np.int64)] = k
    done = np.isfinite(reg_cv.predictions)
    if done.sum() < 2:
        raise ValueError("fewer than 2 photos have both finite features and a known Hgb; nothing to fit.")
    use = finite & np.isfinite(hgb)
    alpha, _ = cross_validation.choose_alpha(x[use], hgb[use], group_ids[use], alphas=alphas, inner_folds=inner_folds,
                                             seed=seed)
    labelled = finite & (anemic >= 0)
    y = anemic[labelled].astype(np.float64)
    l2, oof = cross_validation.choose_l2(x[labelled], y, group_ids[labelled], l2s=l2s, inner_folds=inner_folds,
                                         seed=seed)
    # -inf (call everyone: the positives tie with the lowest scores) is p >= 0 for probabilities, and JSON-able.
    threshold = max(clinical_stats.sensitivity_threshold(oof, y, target_sensitivity), 0.0)
    residuals = np.abs(hgb[done] - reg_cv.predictions[done])
    stats = dict(num_bootstrap=num_bootstrap, seed=seed)
    agree = clinical_stats.agreement(reg_cv.predictions, hgb, group_ids, **stats)
    detect = clinical_stats.detection(det_cv.scores, anemic, det_cv.screening_predicted, group_ids, **stats)
    n_cal = int(done.sum())
    k_hi = math.ceil(round(coverage * (n_cal + 1), 9))
    metrics = {
        "protocol": f"pooled out-of-fold predictions of this fitting procedure over the {len(folds)} training folds",
        "hgb": {**{k: v for k, v in dataclasses.asdict(agree).items()},
                "conformal_half_width": float(np.sort(residuals)[k_hi - 1]) if k_hi <= n_cal else float("inf")},
        "anemia": dataclasses.asdict(detect)}
    record = {**dict(training or {}), "num_folds": len(folds), "inner_folds": inner_folds, "seed": seed,
              "n_hgb": int(use.sum()), "n_anemia": int(labelled.sum()), "n_anemic": int(y.sum()),
              "n_excluded_no_features": int((~finite).sum()), "alphas_grid": list(alphas), "l2s_grid": list(l2s),
              "fold_alphas": reg_cv.alphas.tolist()}
    domain = colour_domain.fit(features, folds, anemic)
    metrics["colour_domain"] = domain.report
    return ScreeningModel(
        feature_names=tuple(features.names), feature_spec=feature_spec,
        regression=fit_ridge(x[use], hgb[use], alpha=alpha), alpha=float(alpha), fold_models=reg_cv.models,
        residual_fold=fold_of[done], abs_residuals=residuals, coverage=float(coverage),
        classifier=fit_logistic(x[labelled], y, l2=l2), l2=float(l2), threshold=float(threshold),
        target_sensitivity=float(target_sensitivity), who_thresholds=dict(WHO_THRESHOLDS_G_DL),
        extrapolation_z=float(extrapolation_z), training=_finite_json(record), metrics=_finite_json(metrics),
        domain=domain)


def _finite_json(value: Any) -> Any:
    """Metrics as strict-JSON Python: tuples to lists, non-finite floats to None (a missing statistic)."""
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _finite_json(value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)  # paths and other objects: their text
