"""Tests of what the screening tells a health worker (`photo_report`, `wording`, `colour_domain`): no estimate for a
photo to retake, the model's origin on every output, colour casts and dark photos caught, one consistent answer.

The model is fitted on phantom photos' true palpebral masks (64x48) as ``fit_screening`` fits by default (grey-world
colour constancy, `fit.DEFAULT_CONSTANCY`); photos are assessed with their true masks as certain segmentations, so
only the screening step decides."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _phantom_screening import fit_on_phantom, phantom_record

from anemia_jax.data.datasets.conjunctiva_phantom import phantom
from anemia_jax.inference import segmenter
from anemia_jax.screening import app_server, cross_validation, fit, photo_report, quality, screening_model, wording

N_TRAIN = 80
PHANTOM_RECORD = phantom_record(N_TRAIN)
LENIENT = quality.QualityThresholds(min_area_fraction=0.001, max_uncertainty=0.9)


def warm(image: np.ndarray) -> np.ndarray:
    """The issue's warm cast: R x1.15, B x0.85 on the encoded values."""
    return np.clip(np.round(image * np.array([1.15, 1.0, 0.85])), 0, 255).astype(np.uint8)


def _fit(constancy: str, training=None) -> screening_model.ScreeningModel:
    return fit_on_phantom(N_TRAIN, constancy=constancy, training=training)[0]


@pytest.fixture(scope="module")
def model():
    return _fit(fit.DEFAULT_CONSTANCY, PHANTOM_RECORD)


@pytest.fixture(scope="module")
def new_photos():
    """10 phantom photos of another seed (no model saw them)."""
    return list(phantom.generate(5, 10, long_side=64, start=N_TRAIN))


def _seg(mask: np.ndarray) -> segmenter.PhotoSegmentation:
    probs = mask.astype(np.float32)[..., None]
    return segmenter.PhotoSegmentation(probs_model=probs, probs=probs, masks=probs > 0.5, members_model=probs[None])


def _assess(model, photos, masks, sexes=None):
    assessor = photo_report.PhotoAssessor(("palpebral",), LENIENT, model)
    return assessor.assess(list(photos), [_seg(m) for m in masks], sexes)


def _features(model, photos, masks):
    return model.feature_spec.compute_from_masks(list(photos), list(masks))


# ------------------------------------------------------------------------------------------- colour and light


def test_warm_cast_is_flagged_or_corrected(model, new_photos):
    """Each warm-cast photo is either sent to retake for its colour, or its estimate stays within 0.6 g/dL of the
    uncast photo's (the cast removed by the colour constancy); without constancy the cast moved it by about +1."""
    masks = [e.palpebral for e in new_photos]
    base = model.predict(_features(model, [e.image for e in new_photos], masks))
    cast = model.predict(_features(model, [warm(e.image) for e in new_photos], masks))
    assert list(base.flag).count("") >= 9
    shift = cast.hgb - base.hgb
    kept = cast.flag == ""
    assert np.all(np.isin(cast.flag, ["", "unusual_colour"]))
    assert np.all(np.abs(shift[kept]) <= 0.6) and abs(shift[kept].mean()) <= 0.3
    reports = _assess(model, [warm(e.image) for e in new_photos], masks)
    for report, flagged in zip(reports, ~kept):
        assert ("unusual_colour" in report.verdict.codes) == flagged
        if flagged:
            assert "retake under the device's light" in "; ".join(report.verdict.reasons)
    uncorrected = _fit("none")
    raw_base = uncorrected.predict(_features(uncorrected, [e.image for e in new_photos], masks))
    raw_cast = uncorrected.predict(_features(uncorrected, [warm(e.image) for e in new_photos], masks))
    moved = (raw_cast.hgb - raw_base.hgb)[raw_cast.flag == ""]
    assert moved.mean() > 0.7  # what the cast does to a model that does not correct it


def test_random_texture_is_unusual_colour(model, new_photos):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, e.image.shape, dtype=np.uint8) for e in new_photos[:5]]
    pred = model.predict(_features(model, noise, [e.palpebral for e in new_photos[:5]]))
    assert list(pred.flag) == ["unusual_colour"] * 5


@pytest.mark.parametrize("constancy", ["none", "grey_world"])
def test_black_and_dimmed_photos_are_too_dark_with_no_nan(constancy, model, new_photos):
    chosen = model if constancy == fit.DEFAULT_CONSTANCY else _fit(constancy, PHANTOM_RECORD)
    ex = new_photos[0]
    black, dim = np.zeros_like(ex.image), np.round(ex.image * 0.45).astype(np.uint8)
    feats = _features(chosen, [black, dim], [ex.palpebral] * 2)
    if constancy == "none":  # nothing to divide by zero: a black photo's features are finite
        assert np.all(np.isfinite(feats.values))
    pred = chosen.predict(feats)
    assert list(pred.flag) == ["too_dark", "too_dark"] and "too dark" in pred.reason[0]
    reports = _assess(chosen, [black, dim], [ex.palpebral] * 2)
    for report in reports:
        assert report.verdict.codes[0] == "too_dark" and report.verdict.reasons[0].startswith("photo too dark")
        values = photo_report.csv_values(report, True)
        assert not any("nan" in v.lower() for v in values)


# ------------------------------------------------------------------------------------------- no number on a retake


def test_a_photo_to_retake_has_no_estimate_anywhere(model, new_photos):
    ex = new_photos[1]
    [report] = _assess(model, [np.zeros_like(ex.image)], [ex.palpebral])
    s = report.screening
    assert not report.verdict.usable and s["answer"] == "retake"
    assert all(math.isnan(s[k]) for k in ("hgb", "hgb_lo", "hgb_hi", "p_anemia", "who_threshold", "coverage"))
    row = dict(zip(photo_report.csv_header(True), photo_report.csv_values(report, True)))
    for column in ("hgb_g_dl", "hgb_lo_g_dl", "hgb_hi_g_dl", "interval_coverage", "p_anemia", "anemia_threshold",
                   "anemia_call", "who_threshold_g_dl", "hgb_vs_who"):
        assert row[column] == "", column
    assert row["answer"] == "Retake the photo" and "too dark" in row["answer_why"]
    assert row["screening_note"] == wording.WITHHELD
    caption = " ".join(text for text, _ in photo_report.caption_lines(report))
    assert "No Hb estimate" in caption and "g/dL" not in caption
    page = app_server._report_fields(report)["screening"]
    assert page["hgb"] is page["hgb_lo"] is page["hgb_hi"] is page["p_anemia"] is page["who_threshold"] is None
    assert page["call"] is None and page["answer"] == "retake"


# ------------------------------------------------------------------------------------------- provenance


def test_the_models_origin_is_on_every_output(model, new_photos):
    ex = new_photos[2]
    [report] = _assess(model, [ex.image], [ex.palpebral])
    row = dict(zip(photo_report.csv_header(True), photo_report.csv_values(report, True)))
    assert row["model_data"] == "phantom" and row["model_provenance"].startswith("PHANTOM MODEL")
    footer = [text for text, _ in photo_report.footer_lines(report)]
    assert footer[0].startswith("PHANTOM MODEL") and footer[1] == wording.NOTICE
    assert app_server._report_fields(report)["screening"]["provenance"].startswith("PHANTOM MODEL")
    real = wording.provenance({"data": {"synthetic_photos": False, "dataset": {"name": "eyes_defy_anemia"}},
                               "num_subjects": 200, "num_photos": 400})
    assert real["kind"] == "real" and "200 subjects" in real["short"] and "PHANTOM" not in real["long"]
    unknown = wording.provenance({})  # an old file records nothing: never presented as real
    assert unknown["kind"] == "unknown" and "UNKNOWN ORIGIN" in unknown["short"]


# ------------------------------------------------------------------------------------------- one answer


def _row(hgb, lo, hi, anemic, threshold=12.0):
    vs = "below" if hi < threshold else "above" if lo >= threshold else "straddles"
    return {"hgb": hgb, "hgb_lo": lo, "hgb_hi": hi, "anemic": anemic, "who_threshold": threshold, "hgb_vs_who": vs,
            "reason": ""}


@pytest.mark.parametrize("row, code, why", [
    (_row(9.0, 8.0, 11.0, 1), "likely_anemic", "below"),
    (_row(14.0, 12.5, 15.5, 0), "likely_not_anemic", "above"),
    (_row(12.5, 11.0, 14.0, 1), "unclear", "crosses"),
    (_row(12.5, 11.0, 14.0, 0), "unclear", "crosses"),
    (_row(14.0, 12.5, 15.5, 1), "unclear", "colour model says likely anemic"),  # the 13.0 g/dL + anemic
    (_row(9.0, 8.0, 11.0, 0), "unclear", "colour model says likely not anemic"),
])
def test_one_answer_agrees_with_the_estimate_interval_and_threshold(row, code, why):
    got, sentence = wording.answer(row, usable=True)
    assert got == code and why in sentence
    assert wording.answer(row, usable=False)[0] == "retake"


def test_answers_of_assessed_photos_are_consistent_and_sex_moves_only_the_threshold(model, new_photos):
    photos, masks = [e.image for e in new_photos], [e.palpebral for e in new_photos]
    for sex in ("F", "M", None):
        for report in _assess(model, photos, masks, [sex] * len(photos)):
            s = report.screening
            if s["answer"] == "likely_anemic":
                assert s["hgb"] < s["hgb_hi"] < s["who_threshold"] and s["anemic"] == 1
            elif s["answer"] == "likely_not_anemic":
                assert s["hgb"] >= s["hgb_lo"] >= s["who_threshold"] and s["anemic"] == 0
            elif s["answer"] == "unclear":
                assert "blood test" in s["answer_text"]
    women, men = (_assess(model, photos, masks, [sex] * len(photos)) for sex in ("F", "M"))
    for w, m in zip(women, men):
        if w.verdict.usable:
            assert (w.screening["who_threshold"], m.screening["who_threshold"]) == (12.0, 13.0)
            assert w.screening["p_anemia"] == m.screening["p_anemia"]  # the classifier does not use sex


def test_the_colour_checks_do_not_flag_anemic_subjects_more():
    """Training photos whose most unusual colours are anemic subjects' (pale conjunctivas):
    the plain limits flag anemic subjects more; the fitted domain relaxes them until it does not."""
    from anemia_jax.screening import colour, colour_domain

    rng = np.random.default_rng(0)
    n = 200
    values = rng.normal(size=(n, 3))
    values[:10] = 5.0 * rng.choice([-1.0, 1.0], (10, 3))  # ten photos of unusual colour...
    brightness = rng.uniform(0.3, 0.6, n)
    anemic = np.r_[np.ones(10, int), rng.integers(0, 2, n - 10)]  # ...all of anemic subjects
    feats = colour.ColourFeatures(values, ("a", "b", "c"), np.full(n, 100), "none", brightness,
                                  rng.normal(0, 0.1, (n, 2)))
    domain = colour_domain.fit(feats, cross_validation.grouped_folds(np.arange(n), 5), anemic)
    before, after = (domain.report[k]["any"] for k in ("flagged_out_of_fold_before_fairness", "flagged_out_of_fold"))
    assert before["anemic"] > before["not_anemic"]
    assert after["anemic"] <= after["not_anemic"] and domain.report["level"]["quantile"] > colour_domain.LIMIT_QUANTILE
