"""The screening model's feature spec (one `compute` for fitting and serving) and the command that fits the model.

* `FeatureSpec.compute` is exactly: the photo resized as the input pipeline resizes, the probability map resized
  bilinearly and thresholded, the colour features of `colour.batch_colour_features` with the spec's settings.
* The spec travels inside the model file; a schema-1 file (the untyped 'colour' block) still loads and predicts
  bit-identically.
* ``python -m anemia_jax.fit_screening`` fits on the photos the runs did not train on and records the spec and the
  provenance (data set, synthetic photos, subjects, commit); predict's features are the spec's.
"""

import json

import numpy as np
import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import cli, fit_screening
from anemia_jax.screening import colour, cross_validation, photo_report, quality, screening_model
from anemia_jax.screening.features import FeatureSpec
from anemia_jax.utils import image_io


def _photos(n=6, seed=0):
    rng = np.random.default_rng(seed)
    photos = [rng.integers(0, 255, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]
    probs = []
    for i in range(n):
        p = np.zeros((16, 16), np.float32)
        p[4:12, 3 + i % 3:13] = 0.9
        probs.append(p)
    return photos, probs


def test_compute_is_resize_threshold_and_colour_features():
    spec = FeatureSpec(feature_size=(24, 20), mask_threshold=0.4, constancy="grey_world", hhr_threshold_deg=10.0)
    photos, probs = _photos()
    got = spec.compute(photos, probs)
    images = [image_io.resize_image(p, (24, 20)) for p in photos]
    masks = [image_io.resize_probabilities(p[..., None], (24, 20))[..., 0] > 0.4 for p in probs]
    want = colour.batch_colour_features(images, masks, constancy="grey_world", hhr_threshold_deg=10.0)
    np.testing.assert_array_equal(got.values, want.values)
    assert got.names == colour.FEATURE_NAMES and got.constancy == "grey_world"
    some = FeatureSpec(feature_size=(24, 20), names=("lab_a", "hhr"))
    assert some.compute(photos, probs).names == ("lab_a", "hhr")


@pytest.mark.parametrize("field, value, message", [
    ("constancy", "gray", "constancy 'gray' must be one of"),
    ("mask_threshold", 1.0, "mask_threshold 1.0 must lie in"),
    ("feature_size", (0, 8), "feature_size"),
    ("names", ("lab_a", "redness"), "unknown: ['redness']"),
])
def test_an_invalid_spec_says_what_is_wrong(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        FeatureSpec(**{"feature_size": (8, 8), field: value})


def _fitted(spec: FeatureSpec):
    photos, probs = _photos(40, seed=1)
    features = spec.compute(photos, probs)
    rng = np.random.default_rng(2)
    hgb = 12 + rng.normal(size=40)
    groups = np.array([f"P{i // 2}" for i in range(40)])
    return screening_model.fit_screening_model(
        features, hgb=hgb, anemic=(hgb < 12).astype(int), groups=groups, feature_spec=spec, num_bootstrap=0,
        folds=cross_validation.grouped_folds(groups, 4)), features


def test_the_spec_travels_in_the_model_file_and_schema_1_files_still_load(tmp_path):
    spec = FeatureSpec(feature_size=(24, 20), mask_threshold=0.4)
    model, features = _fitted(spec)
    path = model.save(tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == screening_model.SCHEMA_VERSION and data["feature_spec"] == spec.to_json()
    assert screening_model.load(path).feature_spec == spec and screening_model.load(path).domain is not None
    # The same model as schema 1 wrote it: the spec's settings in an untyped 'colour' block, names apart.
    old = {k: v for k, v in data.items() if k != "feature_spec"}
    old.update(schema_version=1, colour={k: v for k, v in spec.to_json().items() if k != "names"})
    (tmp_path / "v1.json").write_text(json.dumps(old))
    v1 = screening_model.load(tmp_path / "v1.json")
    assert v1.feature_spec == spec and v1.domain is None  # older files load without the colour domain
    np.testing.assert_array_equal(v1.predict(features).hgb, model.predict(features).hgb)
    bad = {**data, "feature_spec": {**spec.to_json(), "mask_threshold": 2}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="feature_spec is invalid .*mask_threshold 2 must lie in"):
        screening_model.load(tmp_path / "bad.json")


def test_fitting_refuses_features_of_another_spec():
    spec = FeatureSpec(feature_size=(24, 20))
    photos, probs = _photos(8)
    other = FeatureSpec(feature_size=(24, 20), constancy="white_patch").compute(photos, probs)
    with pytest.raises(ValueError, match="were not computed with the feature spec"):
        screening_model.fit_screening_model(other, hgb=np.full(8, 12.0), anemic=np.zeros(8, int),
                                            groups=np.arange(8).astype(str), feature_spec=spec,
                                            folds=cross_validation.grouped_folds(np.arange(8).astype(str), 2))


def test_serving_computes_features_with_the_models_spec():
    spec = FeatureSpec(feature_size=(24, 20), mask_threshold=0.4, constancy="grey_world")
    model, _ = _fitted(spec)
    photos, probs = _photos(3, seed=5)

    class Seg:  # what PhotoAssessor reads of a `segmenter.PhotoSegmentation`
        def __init__(self, p):
            self.probs_model = np.stack([p, p], axis=-1)

    served = photo_report.screening_features(model, photos, [Seg(p) for p in probs], ("other", "palpebral"))
    np.testing.assert_array_equal(served.values, spec.compute(photos, probs).values)


def test_fit_command_on_a_run(workdir, tmp_path):
    out = tmp_path / "model.json"
    assert fit_screening.main(["fit_screening", f"--runs={workdir}", f"--out={out}", "--bootstrap=0",
                               "--constancy=none"]) == cli.EXIT_OK
    model = screening_model.load(out)
    spec = model.feature_spec
    assert spec.target == "palpebral" and spec.feature_size == (32, 32) and spec.mask_threshold == 0.5
    training = model.training
    assert training["data"]["dataset"]["name"] == "phantom" and training["data"]["synthetic_photos"] is True
    assert training["num_photos"] > 0 and 0 < training["num_subjects"] <= training["num_photos"]
    assert training["git_commit"] and training["date_utc"] and "anemia_jax.fit_screening" in training["command"]
    assert training["steps"] == [4] and training["runs"] == [str(workdir)]  # 'latest' by default
    # The model screens a photo through predict's path: the thresholds' target is the spec's.
    assessor = photo_report.PhotoAssessor(("palpebral", "forniceal_palpebral"), quality.DEFAULTS, model)
    assert assessor.target == "palpebral"


@pytest.mark.parametrize("args, expected", [
    (["--constancy=gray"], "constancy 'gray' must be one of"),
    (["--feature_size=wide"], "--feature_size='wide' must be H,W"),
    (["--target=fornix"], "not 'fornix'"),
])
def test_fit_command_failures_are_messages(workdir, tmp_path, capfd, args, expected):
    status = fit_screening.main(["fit_screening", f"--runs={workdir}", f"--out={tmp_path / 'm.json'}", *args])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CONFIG and expected in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "m.json").exists()


def test_fit_command_without_runs(tmp_path, capfd):
    assert fit_screening.main(["fit_screening", f"--runs={tmp_path}", f"--out={tmp_path / 'm.json'}"]) == 2
    assert "neither a run" in capfd.readouterr().err
