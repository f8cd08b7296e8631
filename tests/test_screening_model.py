"""Tests of anemia_jax.screening.screening_model: fitting, CV+ intervals, WHO calls with and without sex, the JSON
artifact."""

import dataclasses
import json

import numpy as np
import pytest

from anemia_jax.screening import colour, cross_validation, screening_model
from anemia_jax.screening.features import FeatureSpec

NAMES = ("lab_a", "lab_l", "hhr")
# The spec those synthetic features stand for (names and constancy as `_cohort` makes them).
SPEC = FeatureSpec(feature_size=(64, 48), constancy="grey_world", names=NAMES)


def _cohort(n, seed, noise=1.0, photos=1):
    """Hgb linear in three features plus Gaussian noise of known SD; WHO labels from a random sex."""
    rng = np.random.default_rng(seed)
    patients = n // photos
    x = np.repeat(rng.normal(size=(patients, 3)), photos, axis=0) + 0.05 * rng.normal(size=(n, 3))
    hgb = 12.5 + x @ [1.2, -0.6, 0.3] + rng.normal(0.0, noise, n)
    sex = np.repeat(rng.choice(["F", "M"], patients), photos)
    anemic = (hgb < np.where(sex == "F", 12.0, 13.0)).astype(np.int64)
    groups = np.repeat([f"P{i}" for i in range(patients)], photos)
    return colour.ColourFeatures(x, NAMES, np.full(n, 100), "grey_world"), hgb, anemic, groups, sex


def _fit(n=300, seed=0, **kwargs):
    feats, hgb, anemic, groups, _ = _cohort(n, seed)
    folds = cross_validation.grouped_folds(groups, 5, seed=0)
    return screening_model.fit_screening_model(feats, hgb=hgb, anemic=anemic, groups=groups, folds=folds,
                                               num_bootstrap=100, feature_spec=SPEC, training={"data": "synthetic"},
                                               **kwargs)


def test_artifact_round_trip_is_exact(tmp_path):
    model = _fit()
    path = model.save(tmp_path / "model.json")
    text = path.read_text()
    data = json.loads(text)  # strict JSON: the file has no NaN/Infinity
    assert "NaN" not in text and "Infinity" not in text
    assert data["schema_version"] == screening_model.SCHEMA_VERSION and data["feature_names"] == list(NAMES)
    assert data["feature_spec"] == {**SPEC.to_json(), "constancy": "grey_world"} and "colour" not in data
    assert data["classifier"]["target_sensitivity"] == 0.9 and data["who_thresholds_g_dl"]["unknown"] == 13.0
    assert data["training"]["data"] == "synthetic" and data["training"]["num_folds"] == 5
    assert data["metrics"]["hgb"]["mae"] > 0 and 0.5 < data["metrics"]["anemia"]["auc"] <= 1
    loaded = screening_model.load(path)
    feats, *_ = _cohort(50, seed=9)
    a, b = model.predict(feats, sex="F"), loaded.predict(feats, sex="F")
    for field in ("hgb", "hgb_lo", "hgb_hi", "p_anemia", "anemic"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))  # bit-identical
    assert a.rows() == b.rows()
    assert loaded.save(tmp_path / "again.json").read_text() == text


def test_prediction_interval_covers_stated_fraction():
    """Noise SD 1 (interval about +-1.645): 90% CV+ intervals cover 0.88-0.92 of 4000 new photos."""
    feats, hgb, anemic, groups, _ = _cohort(2000, seed=1)
    folds = cross_validation.grouped_folds(groups, 5, seed=0)
    model = screening_model.fit_screening_model(feats, hgb=hgb, anemic=anemic, groups=groups, folds=folds,
                                                coverage=0.9, num_bootstrap=0, feature_spec=SPEC)
    test, truth, *_ = _cohort(4000, seed=2)
    pred = model.predict(test)
    covered = np.mean((truth >= pred.hgb_lo) & (truth <= pred.hgb_hi))
    assert 0.88 <= covered <= 0.92
    assert np.median(pred.hgb_hi - pred.hgb_lo) == pytest.approx(2 * 1.645, rel=0.08)
    assert np.all(pred.hgb_lo <= pred.hgb) and np.all(pred.hgb <= pred.hgb_hi)
    wide = screening_model.fit_screening_model(feats, hgb=hgb, anemic=anemic, groups=groups, folds=folds,
                                               coverage=0.5, num_bootstrap=0,
                                               feature_spec=SPEC).predict(test)
    assert 0.46 <= np.mean((truth >= wide.hgb_lo) & (truth <= wide.hgb_hi)) <= 0.54


def test_photo_list_with_and_without_sex():
    model = _fit()
    feats, hgb, _, _, sex = _cohort(40, seed=3)
    without = model.predict(feats)
    assert list(without.sex) == ["unknown"] * 40 and np.all(without.who_threshold == 13.0)
    given = model.predict(feats, sex=[{"F": "female", "M": "M"}[s] for s in sex])
    np.testing.assert_array_equal(given.who_threshold, np.where(sex == "F", 12.0, 13.0))
    # Sex changes only the WHO comparison, never the estimate or the classifier.
    np.testing.assert_array_equal(given.hgb, without.hgb)
    np.testing.assert_array_equal(given.anemic, without.anemic)
    expected = np.where(given.hgb_hi < given.who_threshold, "below",
                        np.where(given.hgb_lo >= given.who_threshold, "above", "straddles"))
    np.testing.assert_array_equal(given.hgb_vs_who, expected)
    np.testing.assert_array_equal(given.anemic, given.p_anemia >= model.threshold)
    mixed = model.predict(feats.values[:3], sex=["f", None, ""])
    assert list(mixed.sex) == ["F", "unknown", "unknown"]
    with pytest.raises(ValueError, match="unknown sex"):
        model.predict(feats, sex="x")
    with pytest.raises(ValueError, match="3 sex values for 40"):
        model.predict(feats, sex=["F", "M", "F"])


def test_unscreenable_photos_say_why():
    model = _fit()
    feats, *_ = _cohort(4, seed=4)
    values = feats.values.copy()
    values[0] = np.nan  # empty mask
    values[1] = np.nan  # mask present but no colour reference
    values[2, 0] = 40.0  # far outside the training colours
    pred = model.predict(colour.ColourFeatures(values, NAMES, np.array([0, 50, 50, 50]), "grey_world"))
    assert list(pred.flag) == ["no_mask", "no_reference", "unusual_colour", ""]
    assert pred.reason[0].startswith("no conjunctiva") and "light could not be checked" in pred.reason[1]
    assert "grey_world" in pred.detail[1] and "retake under the device's light" in pred.reason[2]
    assert "colour distance" in pred.detail[2] and pred.reason[3] == pred.detail[3] == ""
    # Without the colour domain (a schema 1 or 2 file) the per-feature range still catches it.
    old_file = dataclasses.replace(model, domain=None)
    no_domain = old_file.predict(colour.ColourFeatures(values, NAMES, np.array([0, 50, 50, 50]), "grey_world"))
    assert no_domain.flag[2] == "unusual_colour" and "lab_a is" in no_domain.detail[2]
    np.testing.assert_array_equal(pred.anemic[:2], [-1, -1])
    assert np.isnan(pred.hgb[:2]).all() and np.isfinite(pred.hgb[2:]).all() and list(pred.hgb_vs_who[:2]) == ["", ""]
    with pytest.raises(ValueError, match="constancy 'none'"):
        model.predict(colour.ColourFeatures(feats.values, NAMES, feats.num_pixels, "none"))
    with pytest.raises(ValueError, match="lack"):
        model.predict(feats.select(["lab_a", "lab_l"]))
    reordered = feats.select(["hhr", "lab_a", "lab_l"])  # names are matched, not positions
    np.testing.assert_array_equal(model.predict(reordered).hgb, model.predict(feats).hgb)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "upgrade anemia_jax"),
    (lambda d: d.pop("classifier"), "classifier is missing"),
    (lambda d: d["regression"]["coef"].pop(), "regression.coef must have 3 entries"),
    (lambda d: d["regression"].update(scale=[1.0, 0.0, 1.0]), "regression.scale must be positive"),
    (lambda d: d["classifier"].update(threshold=1.5), "classifier.threshold must be a probability"),
    (lambda d: d["feature_spec"].update(constancy="retinex"), "feature_spec is invalid .*'retinex' must be one of"),
    (lambda d: d["prediction_interval"]["residual_fold"].append(0), "abs_residuals must have"),
    (lambda d: d.update(format="something else"), "not a screening model artifact"),
    # A threshold outside the physiological range, or an unknown-sex threshold below a sex's, would misreport.
    (lambda d: d["who_thresholds_g_dl"].update(F=0.0), r"who_thresholds_g_dl.F must lie in \[7, 18\] g/dL"),
    (lambda d: d["who_thresholds_g_dl"].update(M=-13.0), r"who_thresholds_g_dl.M must lie in \[7, 18\] g/dL"),
    (lambda d: d["who_thresholds_g_dl"].update(unknown=12.0), "unknown must be at least"),
    (lambda d: d.update(extrapolation_z=-1.0), "extrapolation_z must be positive"),
    (lambda d: d.update(extrapolation_z=0), "extrapolation_z must be positive"),
    (lambda d: d["classifier"].update(target_sensitivity=0.0), r"target_sensitivity must lie in \(0, 1\]"),
    (lambda d: d["regression"].update(alpha=-1.0), "alpha must be >= 0"),
])
def test_load_validates_schema(tmp_path, edit, message):
    data = _fit(n=120).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        screening_model.load(path)


def test_load_errors_for_missing_or_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no screening model"):
        screening_model.load(tmp_path / "absent.json")
    (tmp_path / "cut.json").write_text('{"format": "anemia_jax.screening_model", "sche')
    with pytest.raises(ValueError, match="not valid JSON"):
        screening_model.load(tmp_path / "cut.json")


def test_fit_uses_training_folds_and_records_the_protocol():
    feats, hgb, anemic, groups, _ = _cohort(240, seed=5, photos=2)
    folds = cross_validation.grouped_folds(groups, 4, seed=1)
    model = screening_model.fit_screening_model(feats, hgb=hgb, anemic=anemic, groups=groups, folds=folds,
                                                num_bootstrap=0, feature_spec=SPEC)
    assert len(model.fold_models) == 4 and len(model.abs_residuals) == 240
    cv = cross_validation.cross_validate_hgb(feats.values, hgb, folds, groups=groups)
    np.testing.assert_allclose(model.abs_residuals, np.abs(hgb - cv.predictions))  # the OOF residuals
    assert model.metrics["hgb"]["mae"] == pytest.approx(cv.mae)
    assert model.training["n_hgb"] == 240 and model.training["fold_alphas"] == cv.alphas.tolist()
    # The threshold reaches the target sensitivity on the inner out-of-fold probabilities of all photos.
    _, oof = cross_validation.choose_l2(feats.values, anemic.astype(float), groups)
    assert np.mean(oof[anemic == 1] >= model.threshold) >= 0.9
    with pytest.raises(ValueError, match="in no test fold"):
        screening_model.fit_screening_model(feats, hgb=hgb, anemic=anemic, groups=groups, folds=folds[:3],
                                            feature_spec=SPEC)
