"""Tests of temperature scaling (anemia_jax.inference.temperature): it lowers the expected calibration error on phantom
validation photos, the model's own probability function and the file's NumPy form agree, and ``calibrate_quality``
fits it while ``evaluate`` and ``predict`` use what it wrote beside the runs."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import scipy.ndimage
from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures

from anemia_jax import evaluate, predict
from anemia_jax.data.datasets.conjunctiva_phantom import phantom
from anemia_jax.inference import probabilities, segmenter, temperature


def _overconfident(mask: np.ndarray, seed: int) -> np.ndarray:
    """Member probabilities [1, H, W, 1] of an over-confident model: logits growing with the signed distance to the
    outline of the reference mask shifted by a pixel or two (as a segmentation network's do), far too steeply."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(mask, int(rng.integers(1, 3)), axis=int(rng.integers(0, 2))) > 0
    signed = scipy.ndimage.distance_transform_edt(shifted) - scipy.ndimage.distance_transform_edt(~shifted)
    logits = 4.0 * signed + rng.normal(0, 0.5, signed.shape)
    return (1 / (1 + np.exp(-logits)))[None, ..., None].astype(np.float32)


def test_temperature_scaling_lowers_ece_on_phantom_validation_photos():
    examples = list(phantom.generate(0, 16, long_side=64))
    truth = [e.palpebral.astype(np.float32)[..., None] for e in examples]
    members = [_overconfident(e.palpebral, i) for i, e in enumerate(examples)]
    fit, check = slice(0, 8), slice(8, 16)  # fitted on half the photos, measured on the others
    [t] = temperature.fit(members[fit], truth[fit])
    assert t > 1.5  # an over-confident model is cooled
    before = temperature.expected_calibration_error(np.stack(members[check]), np.stack(truth[check])[None])
    after = temperature.expected_calibration_error(temperature.apply(np.stack(members[check]), [t]),
                                                   np.stack(truth[check])[None])
    assert after < 0.6 * before, (before, after)
    # A temperature keeps every mask of a single model: the sign of a logit does not change.
    np.testing.assert_array_equal(temperature.apply(members[0], [t]) > 0.5, members[0] > 0.5)


def test_the_probability_function_divides_the_logits_as_the_file_says(best_run):
    photos = [phantom.generate_example(0, i, long_side=64).image for i in range(2)]
    scale = [1.7, 0.6]
    raw = segmenter.Segmenter([best_run]).segment(photos)
    calibrated = segmenter.Segmenter([best_run], temperature=scale).segment(photos)
    for r, c in zip(raw, calibrated):
        np.testing.assert_allclose(c.members_model, temperature.apply(r.members_model, scale), atol=2e-5)
    fn, variables = probabilities.probability_of(best_run, temperature=scale)
    images = np.stack([np.asarray(jax.image.resize(p, (32, 32, 3), "linear")).astype(np.uint8) for p in photos])
    raw_fn, _ = probabilities.probability_of(best_run)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(variables, images)),
                               temperature.apply(np.asarray(jax.jit(raw_fn)(variables, images))[None], scale)[0],
                               atol=2e-5)


def test_file_round_trip_and_discovery(tmp_path):
    run = tmp_path / "cv" / "fold_0"
    run.mkdir(parents=True)
    assert temperature.for_runs([run]) == (None, "none (no temperature.json beside the runs)")
    temperature.save(tmp_path / "cv" / temperature.FILE, [1.5, 2.0], ["a", "b"], {"mode": "ensemble"})
    values, where = temperature.for_runs([run], targets=["a", "b"])
    assert values == [1.5, 2.0] and where.endswith("cv/temperature.json")
    assert temperature.for_runs([run], "none")[0] is None
    with pytest.raises(ValueError, match="not these runs"):
        temperature.for_runs([run], targets=["a"])
    (tmp_path / "bad.json").write_text(json.dumps({"format": temperature.FORMAT, "temperature": [0.0]}))
    with pytest.raises(ValueError, match="positive"):
        temperature.load(tmp_path / "bad.json")


def test_evaluate_and_predict_use_the_temperature_beside_the_runs(workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    temperature.save(run / temperature.FILE, [2.0, 2.0], ["palpebral", "forniceal_palpebral"], {"mode": "test"})
    out = tmp_path / "eval"
    assert evaluate.main(["evaluate", f"--workdir={run}", "--checkpoint=best", "--no_distances", f"--out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    c = summary["calibration"]
    assert c["temperature"] == {"palpebral": 2.0, "forniceal_palpebral": 2.0} and c["source"].endswith(".json")
    assert c["before"]["palpebral"]["ece"] != c["after"]["palpebral"]["ece"]
    text = (out / "summary.md").read_text()
    assert "## Probability calibration" in text and "| palpebral |" in text
    photo = tmp_path / "photos"
    photo.mkdir()
    import PIL.Image

    PIL.Image.fromarray(phantom.generate_example(0, 3, long_side=64).image).save(photo / "p.png")
    assert predict.main(["predict", f"--workdir={run}", str(photo), f"--out={tmp_path / 'pred'}"]) == 0
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["temperature"]["values"] == [2.0, 2.0]
    assert predict.main(["predict", f"--workdir={run}", str(photo), f"--out={tmp_path / 'raw'}",
                         "--temperature=none"]) == 0
    assert json.loads((tmp_path / "raw" / "predictions.json").read_text())["temperature"]["values"] is None
