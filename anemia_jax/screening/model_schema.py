"""The screening model artifact's schema (`screening_model.ScreeningModel.save` writes it): reading a parsed file
back into validated constructor fields, with errors that name the file and the field.

Versions: 1 stored the feature settings untyped (``colour``); 2 the typed feature spec (`features.FeatureSpec`);
3 adds the colour domain (`colour_domain`). Versions 1 and 2 still load, without the domain checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from anemia_jax.screening import colour_domain
from anemia_jax.screening.features import FeatureSpec
from anemia_jax.screening.linear_models import LinearModel

__all__ = ["FORMAT", "SCHEMA_VERSION", "WHO_THRESHOLD_RANGE_G_DL", "read_fields"]

FORMAT = "anemia_jax.screening_model"
SCHEMA_VERSION = 3
# What a loaded file's WHO thresholds may be: the WHO's anemia cut-offs lie between 11 (children, pregnancy) and 13
# g/dL (men); anything outside [7, 18] is a damaged or mistyped file, not a population.
WHO_THRESHOLD_RANGE_G_DL = (7.0, 18.0)


class _Reader:
    """Schema checks with errors that name the file and the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, what: str) -> ValueError:
        return ValueError(f"screening model {self.source}: {field} {what}. Re-create the artifact with "
                          "python -m anemia_jax.fit_screening.")

    def get(self, d: Mapping, field: str, kind: type | tuple, prefix: str = "") -> Any:
        if not isinstance(d, Mapping) or field not in d:
            raise self.fail(prefix + field, "is missing")
        value = d[field]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(prefix + field, f"must be {getattr(kind, '__name__', kind)}; got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(prefix + field, "must be finite")
        return value

    def vector(self, d: Mapping, field: str, size: int | None, prefix: str = "", dtype=np.float64) -> np.ndarray:
        values = self.get(d, field, list, prefix)
        if size is not None and len(values) != size:
            raise self.fail(prefix + field, f"must have {size} entries; got {len(values)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise self.fail(prefix + field, "must hold numbers only")
        out = np.asarray(values, dtype)
        if not np.all(np.isfinite(out)):
            raise self.fail(prefix + field, "must hold finite numbers only")
        return out

    def linear(self, d: Mapping, size: int, prefix: str, logistic: bool = False) -> LinearModel:
        scale = self.vector(d, "scale", size, prefix)
        if np.any(scale <= 0):
            raise self.fail(prefix + "scale", "must be positive")
        return LinearModel(self.vector(d, "mean", size, prefix), scale, self.vector(d, "coef", size, prefix),
                           self.get(d, "intercept", float, prefix), logistic=logistic)


def read_fields(data: Any, source: str) -> dict[str, Any]:
    """The validated constructor fields of `screening_model.ScreeningModel` from a parsed artifact ``data`` (read
    from ``source``, named in the errors).

    Raises:
        ValueError: not an artifact, a schema version this anemia_jax does not read, or a field that is missing,
            of the wrong type, not finite or out of range (the message names the file and the field).
    """
    r = _Reader(source)
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"{source} is not a screening model artifact (its 'format' is not {FORMAT!r}).")
    version = r.get(data, "schema_version", int)
    if version not in range(1, SCHEMA_VERSION + 1):
        newer = version > SCHEMA_VERSION
        raise ValueError(f"screening model {source} has schema version {version}; this anemia_jax reads versions "
                         f"1 to {SCHEMA_VERSION}: {'upgrade anemia_jax' if newer else 're-create the artifact'}.")
    names = r.get(data, "feature_names", list)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise r.fail("feature_names", "must be distinct strings")
    f = len(names)
    field = "colour" if version == 1 else "feature_spec"
    try:  # version 1 stored the same settings untyped, as 'colour' (its features: feature_names)
        spec = FeatureSpec.from_json(r.get(data, field, dict), names=names if version == 1 else None)
    except ValueError as e:
        raise r.fail(field, f"is invalid ({e})") from None
    if list(spec.names) != list(names):
        raise r.fail("feature_spec.names", f"must equal feature_names {names}")
    reg, pi, cls = (r.get(data, k, dict) for k in ("regression", "prediction_interval", "classifier"))
    if r.get(pi, "method", str, "prediction_interval.") != "cv_plus":
        raise r.fail("prediction_interval.method", "must be 'cv_plus'")
    coverage = r.get(pi, "coverage", float, "prediction_interval.")
    if not 0.0 < coverage < 1.0:
        raise r.fail("prediction_interval.coverage", "must be in (0, 1)")
    folds = r.get(pi, "fold_models", list, "prediction_interval.")
    residual_fold = r.vector(pi, "residual_fold", None, "prediction_interval.", np.int64)
    abs_residuals = r.vector(pi, "abs_residuals", len(residual_fold), "prediction_interval.")
    if not folds or residual_fold.min(initial=0) < 0 or residual_fold.max(initial=0) >= len(folds) \
            or np.any(abs_residuals < 0) or not len(residual_fold):
        raise r.fail("prediction_interval", "needs fold models, fold indices into them and residuals >= 0")
    who = r.get(data, "who_thresholds_g_dl", dict)
    who = {k: r.get(who, k, float, "who_thresholds_g_dl.") for k in ("F", "M", "unknown")}
    low, high = WHO_THRESHOLD_RANGE_G_DL
    for k, value in who.items():
        if not low <= value <= high:
            raise r.fail(f"who_thresholds_g_dl.{k}", f"must lie in [{low:g}, {high:g}] g/dL (the WHO's cut-offs are "
                                                    f"11-13); got {value:g}")
    if who["unknown"] < max(who["F"], who["M"]):
        raise r.fail("who_thresholds_g_dl.unknown", "must be at least the F and M thresholds (a missing sex must "
                                                    f"never hide anemia); got {who}")
    threshold = r.get(cls, "threshold", float, "classifier.")
    if not 0.0 <= threshold <= 1.0:
        raise r.fail("classifier.threshold", "must be a probability in [0, 1]")
    target_sensitivity = r.get(cls, "target_sensitivity", float, "classifier.")
    if not 0.0 < target_sensitivity <= 1.0:
        raise r.fail("classifier.target_sensitivity", "must lie in (0, 1]")
    extrapolation_z = r.get(data, "extrapolation_z", float)
    if extrapolation_z <= 0.0:
        raise r.fail("extrapolation_z", f"must be positive (a distance in training SDs); got {extrapolation_z:g}")
    alpha, l2 = r.get(reg, "alpha", float, "regression."), r.get(cls, "l2", float, "classifier.")
    if alpha < 0.0 or l2 < 0.0:
        raise r.fail("regression.alpha" if alpha < 0.0 else "classifier.l2", "must be >= 0 (a penalty)")
    domain = None
    if version >= 3:
        try:
            domain = colour_domain.from_json(r.get(data, "domain", dict), f)
        except ValueError as e:
            raise r.fail("domain", f"is invalid ({e})") from None
    return dict(
        feature_names=tuple(names), feature_spec=spec, regression=r.linear(reg, f, "regression."),
        alpha=alpha,
        fold_models=tuple(r.linear(m, f, f"prediction_interval.fold_models[{i}].") for i, m in enumerate(folds)),
        residual_fold=residual_fold, abs_residuals=abs_residuals, coverage=coverage,
        classifier=r.linear(cls, f, "classifier.", logistic=True), l2=l2,
        threshold=threshold, target_sensitivity=target_sensitivity,
        who_thresholds=who, extrapolation_z=extrapolation_z,
        training=r.get(data, "training", dict), metrics=r.get(data, "metrics", dict), domain=domain)
