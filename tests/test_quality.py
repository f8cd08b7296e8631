"""Tests of anemia_jax.screening.quality and anemia_jax.screening.photo_report: uncertainty maps, ensembles, verdicts on
crafted cases, threshold choice and files, the sex of each photo, and ``predict --screening`` end to end on the tiny
run."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import numpy as np
import PIL.Image
import pytest
from _phantom_screening import fit_on_phantom
from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures

from anemia_jax import predict
from anemia_jax.data.datasets.conjunctiva_phantom import phantom
from anemia_jax.inference import segmenter, uncertainty
from anemia_jax.runs import restore
from anemia_jax.screening import photo_report, quality
from anemia_jax.utils import parallel


def _seg(probs_model, photo_shape=None, members=None, threshold=0.5):
    """A PhotoSegmentation from hand-made probabilities (model size = photo size unless given)."""
    probs_model = np.asarray(probs_model, np.float32)
    members = probs_model[None] if members is None else np.asarray(members, np.float32)
    probs = probs_model if photo_shape is None else np.stack(
        [np.asarray(PIL.Image.fromarray(probs_model[..., c]).resize(photo_shape[::-1])) for c in
         range(probs_model.shape[-1])], -1)
    return segmenter.PhotoSegmentation(probs_model=probs_model, probs=probs, masks=probs > threshold,
                                       members_model=members, threshold=threshold)


def test_uncertainty_is_zero_where_members_agree_with_certainty():
    agree_one, agree_zero = np.ones((2, 4, 4, 1)), np.zeros((2, 4, 4, 1))
    members = np.concatenate([agree_one[:, :2], agree_zero[:, 2:]], axis=1)  # [2, 4, 4, 1]
    members[0, 0, 0, 0], members[1, 0, 0, 0] = 1.0, 0.0  # one pixel: certain, opposite answers
    members[:, 3, 3, 0] = 0.5  # one pixel: both members unsure
    entropy, disagreement = uncertainty.uncertainty_maps(members)
    expected = np.zeros((4, 4, 1), np.float32)
    expected[0, 0, 0] = expected[3, 3, 0] = 1.0
    np.testing.assert_allclose(entropy, expected, atol=1e-6)
    mi = np.zeros((4, 4, 1), np.float32)
    mi[0, 0, 0] = 1.0  # disagreement, not shared doubt
    np.testing.assert_allclose(disagreement, mi, atol=1e-6)
    # A single run has no disagreement; its entropy is its own.
    entropy, disagreement = uncertainty.uncertainty_maps(members[:1])
    assert disagreement.max() == 0.0 and entropy[3, 3, 0] == pytest.approx(1.0)
    assert uncertainty.binary_entropy(np.array([0.0, 0.5, 1.0, 0.11])).tolist() == pytest.approx([0, 1, 0, 0.4999],
                                                                                              abs=1e-3)


def test_ensemble_of_two_runs_is_the_mean_of_their_probabilities(workdir):
    best, latest = (restore.load_run(workdir, checkpoint=c) for c in ("best", "latest"))
    photos = [np.random.default_rng(i).integers(0, 256, (40 + i, 29, 3), dtype=np.uint8) for i in range(3)]
    a, b = (segmenter.Segmenter([r]).segment(photos) for r in (best, latest))
    both = segmenter.Segmenter([best, latest]).segment(photos)
    for sa, sb, s in zip(a, b, both):
        np.testing.assert_allclose(s.probs_model, (sa.probs_model + sb.probs_model) / 2, atol=1e-6)
        np.testing.assert_allclose(s.members_model, np.stack([sa.probs_model, sb.probs_model]), atol=1e-6)
        assert s.uncertainty.shape == s.probs.shape[:2] and s.disagreement_model.max() > 0
        assert sa.disagreement_model.max() == 0.0
        assert not np.allclose(sa.probs_model, sb.probs_model)


def _crafted(run, bias: float) -> restore.Run:
    """The run with every head's kernel zeroed and bias set: probability sigmoid(bias) at every pixel."""
    params = jax.tree_util.tree_map(np.asarray, parallel.fetch(run.variables["params"]))
    for name in params:
        if name.startswith("head"):
            params[name] = {"kernel": np.zeros_like(params[name]["kernel"]),
                            "bias": np.full_like(params[name]["bias"], bias)}
    variables = {**run.variables, "params": parallel.replicate(params, run.mesh)}
    return dataclasses.replace(run, variables=variables)


THRESHOLDS = quality.QualityThresholds(min_area_fraction=0.01, max_uncertainty=0.5, min_brightness=0.12,
                                       max_clipped_fraction=0.2)


def test_verdicts_on_crafted_cases(best_run):
    blank = np.zeros((48, 40, 3), np.uint8)
    grey = np.full((48, 40, 3), 128, np.uint8)
    nothing = segmenter.Segmenter([_crafted(best_run, -20.0)])
    seg_blank, seg_grey = nothing.segment([blank, grey])
    assert seg_grey.uncertainty.max() < 1e-4 and seg_grey.masks.sum() == 0
    v = quality.verdict(quality.measure(blank, seg_blank, 0), THRESHOLDS)
    assert not v.usable and v.codes == ("too_dark", "no_conjunctiva")
    v = quality.verdict(quality.measure(grey, seg_grey, 0), THRESHOLDS)
    assert v.codes == ("no_conjunctiva",) and "no conjunctiva found" in v.reasons[0]
    # A model certain that everything is conjunctiva: usable as far as the segmentation goes (area, certainty).
    everything = segmenter.Segmenter([_crafted(best_run, 20.0)]).segment([grey])[0]
    m = quality.measure(grey, everything, 0)
    assert m.area_fraction == 1.0 and m.mean_uncertainty < 1e-4 and quality.verdict(m, THRESHOLDS).usable

    # A normal phantom photo with its true palpebral mask as certain probabilities: usable.
    ex = phantom.generate_example(0, 3, long_side=64)
    truth = ex.palpebral.astype(np.float32)[..., None]
    normal = quality.measure(ex.image, _seg(truth), 0)
    assert quality.verdict(normal, THRESHOLDS).usable and normal.area_fraction == pytest.approx(truth.mean())
    # The same mask, unsure (p = 0.6 inside, 0.4 around): too uncertain.
    unsure = np.where(truth > 0, 0.6, np.where(np.abs(np.gradient(truth[..., 0])[0])[..., None] > 0, 0.4, 0.0))
    assert quality.verdict(quality.measure(ex.image, _seg(unsure), 0), THRESHOLDS).codes == ("uncertain",)
    # Glare over the conjunctiva, and a region too small to read colour from.
    glare = ex.image.copy()
    glare[ex.palpebral > 0] = 255
    assert quality.verdict(quality.measure(glare, _seg(truth), 0), THRESHOLDS).codes == ("overexposed",)
    tiny = np.zeros_like(truth)
    tiny[30, 20] = 1.0
    assert quality.verdict(quality.measure(ex.image, _seg(tiny), 0), THRESHOLDS).codes == ("region_too_small",)


def test_choose_thresholds_keeps_the_stated_share_of_good_photos():
    rng = np.random.default_rng(0)
    n = 400
    dice = np.where(np.arange(n) < 300, rng.uniform(0.7, 0.95, n), rng.uniform(0.0, 0.4, n))
    unc = np.where(dice > 0.6, rng.uniform(0.1, 0.3, n), rng.uniform(0.2, 2.0, n))
    area = np.where(dice > 0.6, rng.uniform(0.05, 0.2, n), rng.uniform(0.0, 0.1, n))
    area[-5:], unc[-5:] = 0.0, np.nan  # empty masks
    chosen = quality.choose_thresholds(area, unc, dice, good_dice=0.6, keep_good=0.95)
    good = dice >= 0.6
    assert np.mean(unc[good] <= chosen["max_uncertainty"]) >= 0.95
    assert np.mean(area[good] >= chosen["min_area_fraction"]) >= 0.95
    r = chosen["report"]
    assert (r["n_good"], r["n_bad"]) == (300, 100) and r["good_rejected"] <= 0.1 and r["bad_rejected"] > 0.5
    assert r["auc_uncertainty_bad_vs_good"] > 0.8 and r["mean_dice_usable"] > r["mean_dice_rejected"]
    with pytest.raises(ValueError, match="too poor"):
        quality.choose_thresholds(area, unc, dice * 0, good_dice=0.6, keep_good=0.95)


def test_the_retake_rule_does_not_fall_more_on_anemic_subjects():
    """A phantom calibration set of 300 subjects whose paler (lower-Hb) conjunctivas segment less surely, as the
    issue measured: the plain rule sends anemic subjects' photos to retake more often; the fair rule relaxes the
    thresholds until it does not, and reports both."""
    meta = [phantom.sample_metadata(0, i) for i in range(300)]
    hgb = np.array([m["hgb"] for m in meta])
    anemic = np.array([m["anemic"] for m in meta])
    rng = np.random.default_rng(1)
    unc = np.clip(0.45 - 0.04 * (hgb - 12.5) + rng.normal(0, 0.06, 300), 0.05, 1.0)
    dice = np.clip(0.9 - 0.3 * unc + rng.normal(0, 0.05, 300), 0, 1)
    area = rng.uniform(0.05, 0.2, 300)
    plain = quality.choose_thresholds(area, unc, dice, good_dice=0.6, keep_good=0.975, anemic=anemic, hgb=hgb,
                                      fairness_margin=None)
    fair = quality.choose_thresholds(area, unc, dice, good_dice=0.6, keep_good=0.975, anemic=anemic, hgb=hgb)
    report = fair["report"]["fairness"]
    before, after = report["before"], report["after"]
    assert before["anemic"] > before["not_anemic"]  # the problem, reproduced
    assert report["met"] and after["anemic"] <= after["not_anemic"]
    assert fair["max_uncertainty"] > plain["max_uncertainty"] and report["keep_good_used"] > 0.975
    assert report["thresholds_before"] == [plain["min_area_fraction"], plain["max_uncertainty"]]
    bands = before["by_hgb"]
    assert list(bands) == ["< 8", "8-10", "10-12", "12-14", ">= 14"] and sum(b["n"] for b in bands.values()) == 300
    assert bands["< 8"]["retake"] > bands[">= 14"]["retake"]
    assert "fairness" not in plain["report"]


def test_thresholds_file_round_trip_and_discovery(tmp_path, caplog):
    fold = tmp_path / "cv" / "fold_0"
    fold.mkdir(parents=True)
    assert quality.thresholds_for_runs([fold], None) == quality.DEFAULTS
    assert quality.thresholds_for_runs([fold], {"max_uncertainty": 0.3}).max_uncertainty == 0.3
    chosen = dataclasses.replace(THRESHOLDS, max_uncertainty=float("inf"), target="palpebral", source="calibrated")
    quality.save_thresholds(tmp_path / "cv" / quality.THRESHOLDS_FILE, chosen, {"mode": "per_run", "runs": [str(fold)]})
    found = quality.thresholds_for_runs([fold], {"max_uncertainty": 0.3})  # the file beside the runs wins
    assert found.max_uncertainty == float("inf") and found.target == "palpebral" and "calibrated" in found.source
    assert not caplog.records
    quality.thresholds_for_runs([fold, tmp_path / "cv" / "fold_1"], None)
    assert "chosen for single runs" in caplog.text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a quality-thresholds file"):
        quality.load_thresholds(tmp_path / "bad.json")


def test_sex_of_each_photo(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    files = [folder / f"{name}.jpg" for name in ("a", "b", "c")]
    assert photo_report.photo_sexes(files) == ["unknown"] * 3
    assert photo_report.photo_sexes(files, sex="f") == ["F"] * 3
    (folder / "sex.csv").write_text("file,sex\na.jpg,female\nb.jpg,\nz.jpg,M\n")
    assert photo_report.photo_sexes(files) == ["F", "unknown", "unknown"]
    assert "z.jpg" in caplog.text  # listed but not among the photos
    other = tmp_path / "elsewhere.csv"
    other.write_text("File,Sex\nphotos/c.jpg,Male\n")
    assert photo_report.photo_sexes(files, sex_csv=other) == ["unknown", "unknown", "M"]
    with pytest.raises(ValueError, match="not both"):
        photo_report.photo_sexes(files, sex="F", sex_csv=other)
    (folder / "sex.csv").write_text("file,sex\na.jpg,x\n")
    with pytest.raises(ValueError, match="line 2"):
        photo_report.photo_sexes(files)
    (folder / "sex.csv").write_text("name,gender\na.jpg,F\n")
    with pytest.raises(ValueError, match="'file' and 'sex'"):
        photo_report.photo_sexes(files)


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory):
    """A screening model fitted on 40 phantom photos' true palpebral masks (64x48), saved as JSON."""
    model, examples = fit_on_phantom(40)
    return model, model.save(tmp_path_factory.mktemp("model") / "screening_model.json"), examples


def test_usable_photo_gets_an_estimate_and_a_caption(phantom_model):
    model, _, examples = phantom_model
    ex = phantom.generate_example(0, 45, long_side=64)  # a photo the model did not see
    seg = _seg(ex.palpebral.astype(np.float32)[..., None], photo_shape=(480, 360))
    photo = np.asarray(PIL.Image.fromarray(ex.image).resize((360, 480)))
    assessor = photo_report.PhotoAssessor(("palpebral",), THRESHOLDS, model)
    [with_sex], [without] = assessor.assess([photo], [seg], ["F"]), assessor.assess([photo], [seg])
    assert with_sex.verdict.usable and with_sex.target == "palpebral"
    s = with_sex.screening
    assert s["hgb_lo"] <= s["hgb"] <= s["hgb_hi"] and 0 <= s["p_anemia"] <= 1 and s["who_threshold"] == 12.0
    assert without.screening["who_threshold"] == 13.0 and without.screening["hgb"] == s["hgb"]
    lines = photo_report.caption_lines(with_sex)
    assert lines[0][0] == "Photo usable" and lines[1][0] == with_sex.screening["answer_text"]
    assert lines[2][0].startswith("Hb estimate ") and "woman" in lines[2][0]
    drawn = photo_report.draw_caption(photo, lines)
    assert drawn.shape == photo.shape and not np.array_equal(drawn[:20], photo[:20])
    np.testing.assert_array_equal(drawn[-3:], photo[-3:])  # no footer asked for: the bottom is the photo
    footed = photo_report.draw_caption(photo, lines, photo_report.footer_lines(with_sex))
    assert not np.array_equal(footed[-5:], photo[-5:])
    header = photo_report.csv_header(True)
    values = dict(zip(header, photo_report.csv_values(with_sex, True)))
    assert values["verdict"] == "usable" and values["sex"] == "F" and float(values["hgb_g_dl"]) == pytest.approx(
        s["hgb"], abs=0.01)


def test_predict_with_screening_end_to_end(workdir, phantom_model, tmp_path):
    model, path, _ = phantom_model
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {}
    for i in (50, 51, 52):
        ex = phantom.generate_example(0, i, long_side=64)
        PIL.Image.fromarray(ex.image).save(folder / f"p{i}.png")
        photos[f"p{i}"] = ex.image
    (folder / "sex.csv").write_text("file,sex\np50.png,F\np51.png,M\n")
    out = tmp_path / "out"
    assert predict.main(["predict", f"--workdir={workdir}", str(folder), f"--out={out}",
                         f"--screening={path}"]) == 0
    with open(out / "predictions.csv") as f:
        rows = {r["stem"]: r for r in csv.DictReader(f)}
    assert [rows[k]["sex"] for k in ("p50", "p51", "p52")] == ["F", "M", "unknown"]
    assert all(r["model_data"] == "phantom" and r["model_provenance"].startswith("PHANTOM MODEL") for r in rows.values())
    # The same numbers by hand: the run's segmentation, then the model's own feature recipe.
    run = restore.load_run(workdir, checkpoint="best")
    segs = segmenter.Segmenter([run]).segment(list(photos.values()))
    feats = photo_report.screening_features(model, list(photos.values()), segs, run.targets)
    expected = model.predict(feats, sex=["F", "M", None])
    for k, stem in enumerate(photos):
        row = rows[stem]
        assert row["verdict"] in ("usable", "retake") and row["quality_target"] == "palpebral"
        if row["verdict"] == "usable":
            assert float(row["hgb_g_dl"]) == pytest.approx(expected.hgb[k], abs=0.006)
            assert float(row["p_anemia"]) == pytest.approx(expected.p_anemia[k], abs=1e-4)
            assert row["who_threshold_g_dl"] == {"p50": "12.0"}.get(stem, "13.0")
        else:  # the untrained tiny run: no estimate anywhere for a photo to retake
            assert row["answer"] == "Retake the photo" and row["screening_note"].startswith("not reported")
            assert all(row[c] == "" for c in ("hgb_g_dl", "hgb_lo_g_dl", "hgb_hi_g_dl", "p_anemia", "anemia_call",
                                              "who_threshold_g_dl", "hgb_vs_who", "interval_coverage"))
        uncertainty = np.asarray(PIL.Image.open(out / f"{stem}_uncertainty.png"))
        assert uncertainty.shape == (64, 48) and uncertainty.dtype == np.uint8
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["screening_model"]["path"] == str(path) and summary["quality_target"] == "palpebral"
    assert summary["screening_model"]["provenance"]["kind"] == "phantom" and "Research use only" in \
        summary["screening_model"]["notice"]
    assert sum(summary["verdicts"].values()) == 3
    # --sex for every photo; a bad value is a command-line error.
    assert predict.main(["predict", f"--workdir={workdir}", str(folder / "p52.png"), f"--out={tmp_path / 'm'}",
                         f"--screening={path}", "--sex=M"]) == 0
    with open(tmp_path / "m" / "predictions.csv") as f:
        assert next(csv.DictReader(f))["sex"] == "M"
    assert predict.main(["predict", f"--workdir={workdir}", str(folder), f"--out={tmp_path / 'x'}",
                         f"--screening={path}", "--sex=Q"]) == 2
