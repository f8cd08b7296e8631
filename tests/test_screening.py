"""Tests of anemia_jax.screening.colour (colour maths, mask features) and anemia_jax.screening.cross_validation
(cross-validated statistics)."""

import itertools
import math

import numpy as np
import pytest

from anemia_jax.screening import colour, cross_validation


def _lab_by_hand(rgb8):
    """CIELAB of one 8-bit sRGB colour, written out scalar by scalar from the standard formulas."""
    lin = []
    for c in rgb8:
        c = c / 255.0
        lin.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    r, g, b = lin
    x = 0.4124564 * r + 0.3575761 * g + 0.1804375 * b
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = 0.0193339 * r + 0.1191920 * g + 0.9503041 * b
    d = 6 / 29

    def f(t):
        return t ** (1 / 3) if t > d ** 3 else t / (3 * d * d) + 4 / 29

    fx, fy, fz = f(x / 0.95047), f(y / 1.0), f(z / 1.08883)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


@pytest.mark.parametrize("rgb, lab", [
    ((255, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((128, 128, 128), (53.59, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
])
def test_srgb_to_lab_reference_values(rgb, lab):
    got = colour.srgb_to_lab(np.array(rgb, np.uint8))
    np.testing.assert_allclose(got, lab, atol=0.006)
    np.testing.assert_allclose(got, _lab_by_hand(rgb), atol=2e-4)


def test_lab_linear_segments_and_float_input():
    # sRGB 10/255 is on both linear segments: linear = c / 12.92 and L* = (29/3)^3 Y.
    y = (10 / 255) / 12.92
    np.testing.assert_allclose(colour.srgb_to_lab(np.array([10, 10, 10], np.uint8))[0], (29 / 3) ** 3 * y, rtol=1e-6)
    np.testing.assert_allclose(colour.srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100.0, 0.0, 0.0], atol=1e-5)
    values = np.linspace(0, 1, 11)
    np.testing.assert_allclose(colour.linear_to_srgb(colour.srgb_to_linear(values)), values, atol=1e-12)
    with pytest.raises(ValueError, match="0, 1"):
        colour.to_unit_rgb(np.array([0.0, 2.0, 255.0]))


def test_hsi_hue():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 255], [90, 90, 90], [255, 0, 128]], np.uint8)
    r, g, b = 1.0, 0.0, 128 / 255
    cos = 0.5 * ((r - g) + (r - b)) / math.sqrt((r - g) ** 2 + (r - b) * (g - b))
    expected_last = 360 - math.degrees(math.acos(cos))
    np.testing.assert_allclose(colour.hsi_hue(rgb), [0, 120, 240, 300, 0, expected_last], atol=1e-9)


def test_features_of_constant_patch_ignore_pixels_outside_mask():
    image = np.zeros((6, 8, 3), np.uint8)
    image[...] = (10, 200, 30)  # outside the mask: a green that would change every feature
    mask = np.zeros((6, 8), bool)
    mask[1:5, 2:7] = True
    image[mask] = (200, 100, 90)
    feats = colour.colour_features(image, mask)
    lab = _lab_by_hand((200, 100, 90))
    expected = {
        "lab_l": lab[0], "lab_a": lab[1], "lab_b": lab[2], "a_over_l": lab[1] / lab[0],
        "mean_r": 200 / 255, "mean_g": 100 / 255, "mean_b": 90 / 255,
        "chrom_r": 200 / 390, "chrom_g": 100 / 390, "chrom_b": 90 / 390,
        "erythema_index": 100 * math.log10(200 / 100), "hhr": 0.0, "num_pixels": 20.0,
    }
    assert set(feats) == set(expected)
    for name, value in expected.items():
        assert feats[name] == pytest.approx(value, abs=1e-4), name
    # The same photo as float in [0, 1] and the mask as {0, 1} bytes give the same features.
    again = colour.colour_features(image / 255.0, mask.astype(np.uint8)[..., None])
    assert all(again[k] == pytest.approx(v, abs=1e-9) for k, v in feats.items())
    # A probability map counts pixels above 0.5, like anemia_jax.metrics.
    soft = np.where(mask, 0.9, 0.2)
    assert colour.colour_features(image, soft)["num_pixels"] == 20.0
    # hue of (200, 100, 90) is ~5 degrees: a threshold below it counts every pixel.
    assert colour.colour_features(image, mask, hhr_threshold_deg=1.0)["hhr"] == 1.0


def test_two_colour_mask_averages_per_pixel_lab_and_log_ratios():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0] = (220, 60, 60)
    image[1] = (240, 200, 200)
    feats = colour.colour_features(image, np.ones((2, 2), bool))
    labs = np.array([_lab_by_hand((220, 60, 60)), _lab_by_hand((240, 200, 200))])
    np.testing.assert_allclose([feats["lab_l"], feats["lab_a"], feats["lab_b"]], labs.mean(0), atol=1e-4)
    ei = 100 * np.mean([math.log10(220 / 60), math.log10(240 / 200)])
    assert feats["erythema_index"] == pytest.approx(ei, abs=1e-9)


def test_empty_mask_gives_nan_and_batch_flags_it():
    image = np.full((4, 4, 3), 128, np.uint8)
    feats = colour.colour_features(image, np.zeros((4, 4), bool))
    assert feats["num_pixels"] == 0.0
    assert all(math.isnan(feats[n]) for n in colour.FEATURE_NAMES)
    images = [image, np.full((3, 5, 3), 200, np.uint8)]
    masks = [np.zeros((4, 4), bool), np.ones((3, 5), np.uint8)]
    batch = colour.batch_colour_features(images, masks)
    assert batch.values.shape == (2, len(colour.FEATURE_NAMES))
    np.testing.assert_array_equal(batch.valid, [False, True])
    np.testing.assert_array_equal(batch.num_pixels, [0, 15])
    assert batch.select(["lab_a", "hhr"]).values.shape == (2, 2)
    with pytest.raises(ValueError, match="matching"):
        colour.colour_features(image, np.ones((3, 4), bool))


def test_ridge_alpha_zero_equals_lstsq_and_matches_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)) * [1.0, 10.0, 0.1, 3.0] + 5.0
    y = x @ [1.0, -0.2, 4.0, 0.5] + rng.normal(size=30)
    design = np.concatenate([np.ones((30, 1)), x], axis=1)
    reference = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(cross_validation.fit_ridge(x, y, alpha=0.0).predict(x), reference, rtol=1e-10)
    model = cross_validation.fit_ridge(x, y, alpha=7.0)
    z = (x - x.mean(0)) / x.std(0)
    w = np.linalg.solve(z.T @ z + 7.0 * np.eye(4), z.T @ (y - y.mean()))
    np.testing.assert_allclose(model.coef, w, rtol=1e-10)
    assert np.ptp(cross_validation.fit_ridge(x, y, alpha=1e12).predict(x)) < 1e-6  # all shrunk to the mean


def test_logistic_reaches_penalised_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(float)
    model = cross_validation.fit_logistic(x, y, l2=0.5)
    z = (x - model.mean) / model.scale
    p = model.predict(x)
    np.testing.assert_allclose(z.T @ (p - y) + 0.5 * model.coef, 0.0, atol=1e-6)  # KKT of the weights
    assert abs(np.sum(p - y)) < 1e-6  # unpenalised intercept: mean prediction = prevalence
    single = cross_validation.fit_logistic(x, np.ones(60), l2=1.0)
    np.testing.assert_allclose(single.predict(x), 60.5 / 61)


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=40).astype(float)
    labels = rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
    assert cross_validation.roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert cross_validation.roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert math.isnan(cross_validation.roc_auc([0.1, 0.9], [1, 1]))


def test_youden_threshold():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.4])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert cross_validation.youden_threshold(scores, labels) == pytest.approx(0.35)
    # J ties (two positives mixed in): the lowest, most sensitive threshold wins.
    assert cross_validation.youden_threshold([0.1, 0.5, 0.6, 0.9], [0, 1, 0, 1]) == pytest.approx(0.3)


def _patients(num_patients, photos, seed):
    groups = np.repeat([f"P{i:03d}" for i in range(num_patients)], photos)
    return groups, np.random.default_rng(seed)


def test_patient_identity_feature_cannot_predict_across_patient_folds():
    groups, rng = _patients(40, 3, 3)
    onehot = (groups[:, None] == np.unique(groups)[None, :]).astype(float)  # a feature per patient
    hgb = np.repeat(rng.normal(12.0, 2.0, 40), 3) + rng.normal(0.0, 0.1, 120)
    patient_folds = cross_validation.grouped_folds(groups, 5, seed=0)
    fair = cross_validation.cross_validate_hgb(onehot, hgb, patient_folds, groups=groups)
    assert abs(fair.pearson_r) < 0.5
    assert fair.mae > 1.0
    # Example-level folds put a patient's photos on both sides: the same feature then "predicts" (the leak the check
    # below refuses), which shows the identity feature is a real test of leakage.
    leaky_folds = cross_validation.grouped_folds(np.arange(120), 5, seed=0)
    leaky = cross_validation.cross_validate_hgb(onehot, hgb, leaky_folds)
    assert leaky.pearson_r > 0.9
    with pytest.raises(ValueError, match="both sides"):
        cross_validation.cross_validate_hgb(onehot, hgb, leaky_folds, groups=groups)


def _synthetic_cohort(num_patients=60, photos=2, seed=4):
    """Redness follows Hgb as in the phantom: a pale-to-red conjunctiva colour plus pixel noise, random masks."""
    groups, rng = _patients(num_patients, photos, seed)
    n = len(groups)
    hgb = np.repeat(rng.uniform(7.0, 16.0, num_patients), photos)
    gender = np.repeat(rng.choice(["F", "M"], num_patients), photos)
    anemic = (hgb < np.where(gender == "F", 12.0, 13.0)).astype(np.int64)
    pale, red = np.array([0.93, 0.74, 0.72]), np.array([0.74, 0.19, 0.21])
    images, masks = [], []
    for i in range(n):
        t = np.clip((hgb[i] - 6.5) / 10.0 + rng.normal(0, 0.03), 0, 1)
        img = np.clip(pale + (red - pale) * t + rng.normal(0, 0.03, (16, 16, 3)), 0, 1)
        mask = np.zeros((16, 16), bool)
        top = rng.integers(0, 8)
        mask[top:top + 6, 2:14] = True
        images.append((img * 255).round().astype(np.uint8))
        masks.append(mask)
    return images, masks, hgb, anemic, groups


def test_redness_following_hgb_is_recovered():
    images, masks, hgb, anemic, groups = _synthetic_cohort()
    feats = colour.batch_colour_features(images, masks)
    folds = cross_validation.grouped_folds(groups, 5, seed=1)
    reg = cross_validation.cross_validate_hgb(feats.values, hgb, folds, groups=groups)
    assert reg.pearson_r > 0.9 and reg.mae < 1.0 and reg.n == len(hgb)
    det = cross_validation.cross_validate_anemia(feats.values, anemic, folds, groups=groups)
    assert det.auc > 0.85 and det.n == len(hgb)
    assert det.sensitivity > 0.6 and det.specificity > 0.6


def test_threshold_and_model_use_training_labels_only():
    images, masks, hgb, anemic, groups = _synthetic_cohort(seed=5)
    x = colour.batch_colour_features(images, masks).values
    folds = cross_validation.grouped_folds(groups, 4, seed=2)
    base = cross_validation.cross_validate_anemia(x, anemic, folds, groups=groups)
    test0 = folds[0][1]
    flipped = anemic.copy()
    flipped[test0] = 1 - flipped[test0]  # rewrite only fold 0's test labels
    other = cross_validation.cross_validate_anemia(x, flipped, folds, groups=groups)
    assert other.thresholds[0] == base.thresholds[0] and other.l2s[0] == base.l2s[0]
    np.testing.assert_array_equal(other.scores[test0], base.scores[test0])
    np.testing.assert_array_equal(other.predicted[test0], base.predicted[test0])
    # ... while the other folds, which train on those labels, did change: the perturbation was real.
    test1 = folds[1][1]
    assert not np.array_equal(other.scores[test1], base.scores[test1])
    hgb2 = hgb.copy()
    hgb2[test0] += 5.0
    reg_a = cross_validation.cross_validate_hgb(x, hgb, folds, groups=groups)
    reg_b = cross_validation.cross_validate_hgb(x, hgb2, folds, groups=groups)
    np.testing.assert_array_equal(reg_a.predictions[test0], reg_b.predictions[test0])


def test_exclusions_counts_and_table():
    images, masks, hgb, anemic, groups = _synthetic_cohort(seed=6)
    truth = colour.batch_colour_features(images, masks)
    predicted_masks = [m.copy() for m in masks]
    predicted_masks[0][:] = False  # an empty prediction: features NaN under this source only
    pred = colour.batch_colour_features(images, predicted_masks)
    hgb = hgb.copy()
    anemic = anemic.copy()
    hgb[[3, 4]] = np.nan
    anemic[[5]] = -1
    folds = cross_validation.grouped_folds(groups, 5, seed=3)
    rows = cross_validation.screening_table({"ground truth": truth, "predicted": pred}, hgb=hgb, anemic=anemic,
                                            folds=folds, groups=groups)
    n = len(hgb)
    for row in rows:
        assert row["n_unknown_hgb"] == 2 and row["n_unknown_anemic"] == 1 and row["n_missing_features"] == 1
        assert row["n_hgb"] == n - 3 and row["n_anemia"] == n - 2
        assert math.isnan(row["regression"].predictions[0]) and row["detection"].predicted[0] == -1
    separate = cross_validation.screening_table({"ground truth": truth}, hgb=hgb, anemic=anemic, folds=folds,
                                                groups=groups, common_examples=False)
    assert separate[0]["n_missing_features"] == 0 and separate[0]["n_hgb"] == n - 2
    text = cross_validation.format_markdown(rows)
    tables = text.split("\n\n")
    assert [t.strip().count("\n") for t in tables[:2]] == [3, 3]  # header, rule, two sources
    assert text.count("| ground truth |") == 2 and text.count("| predicted |") == 2
    warnings = [w for row in rows for w in (*row["agreement"].warnings, *row["screening"].warnings)]
    assert ("**Warnings**" in text) == bool(warnings) and all(w in text for w in warnings)
    for row in rows:  # the clinical statistics describe the same out-of-fold predictions as the basic columns
        assert row["agreement"].n == row["n_hgb"] and row["agreement"].mae == pytest.approx(row["mae"])
        assert row["screening"].n == row["n_anemia"] and row["screening"].auc == pytest.approx(row["auc"])
        assert row["agreement"].loa_lo_ci[0] < row["agreement"].loa[0] < row["agreement"].loa_lo_ci[1]
        assert row["screening"].sensitivity_ci[0] <= row["screening"].sensitivity <= row["screening"].sensitivity_ci[1]


def test_screening_threshold_reaches_target_sensitivity_on_training_parts():
    images, masks, hgb, anemic, groups = _synthetic_cohort(seed=7)
    x = colour.batch_colour_features(images, masks).values
    folds = cross_validation.grouped_folds(groups, 4, seed=4)
    det = cross_validation.cross_validate_anemia(x, anemic, folds, groups=groups, target_sensitivity=0.95)
    for k, (train, test) in enumerate(folds):
        _, oof = cross_validation.choose_l2(x[train], anemic[train].astype(float), groups[train])
        y = anemic[train]
        t = det.screening_thresholds[k]
        assert np.mean(oof[y == 1] >= t) >= 0.95  # reached on the training part's inner out-of-fold scores ...
        higher = np.unique(oof)[np.unique(oof) > t]
        if higher.size:  # ... by the highest such threshold: the next candidate up (score > next score) falls short
            assert np.mean(oof[y == 1] > higher[0]) < 0.95
        np.testing.assert_array_equal(det.screening_predicted[test], det.scores[test] >= t)
    assert det.screening_thresholds.shape == (4,) and det.target_sensitivity == 0.95


def test_fold_validation():
    x = np.zeros((6, 1))
    y = np.arange(6.0)
    with pytest.raises(ValueError, match="overlap"):
        cross_validation.cross_validate_hgb(x, y, [([0, 1, 2], [3, 4]), ([0, 1, 2], [4, 5])])
    with pytest.raises(ValueError, match="both the training and the test"):
        cross_validation.cross_validate_hgb(x, y, [([0, 1, 2, 3], [3, 4])])
    with pytest.raises(ValueError, match="both classes"):
        cross_validation.cross_validate_anemia(x, np.array([0, 0, 0, 1, 1, 1]), [([0, 1, 2], [3, 4, 5])])


def _cast_scene(cast, seed=0):
    """A float photo: a neutral grey background with a bright sclera strip and a red conjunctiva patch, all under a
    linear-RGB colour cast (gains with luminance 1), plus the patch mask."""
    rng = np.random.default_rng(seed)
    linear = np.full((24, 32, 3), 0.18) * rng.uniform(0.7, 1.3, (24, 32, 1))  # grey, uneven light
    linear[2:6, :] = 0.8  # sclera
    mask = np.zeros((24, 32), bool)
    mask[12:20, 6:26] = True
    linear[mask] = rng.uniform(0.9, 1.1, (mask.sum(), 1)) * [0.45, 0.08, 0.09]
    luma = colour.SRGB_TO_XYZ[1] / colour.SRGB_TO_XYZ[1].sum()
    gains = np.asarray(cast) / (np.asarray(cast) @ luma)  # luminance-preserving cast
    return colour.linear_to_srgb(np.clip(linear * gains, 0, 1)), colour.linear_to_srgb(linear), mask


@pytest.mark.parametrize("constancy", ["grey_world", "white_patch"])
def test_colour_constancy_removes_a_synthetic_cast(constancy):
    warm, neutral, mask = _cast_scene((1.15, 1.0, 0.75))
    cool, _, _ = _cast_scene((0.9, 1.0, 1.25))
    reference = colour.colour_features(neutral, mask)
    # Under the cast the raw features move a lot ...
    assert abs(colour.colour_features(warm, mask)["lab_b"] - colour.colour_features(cool, mask)["lab_b"]) > 5
    for photo in (warm, cool, neutral):
        corrected = colour.colour_features(photo, mask, constancy=constancy)
        # ... and after the correction they are those of the uncast photo (its light was already neutral).
        for name in colour.FEATURE_NAMES:
            assert corrected[name] == pytest.approx(reference[name], abs=1e-6), name
    batch = colour.batch_colour_features([warm, cool], [mask, mask], constancy=constancy)
    assert batch.constancy == constancy
    np.testing.assert_allclose(batch.values[0], batch.values[1], atol=1e-6)


def test_constancy_reference_pixels_and_failures():
    warm, _, mask = _cast_scene((1.15, 1.0, 0.75))
    light = colour.estimate_illuminant(warm, ~mask, constancy="white_patch", white_fraction=0.05)
    sclera = colour.srgb_to_linear(warm[3, 0])
    np.testing.assert_allclose(light / light[1], sclera / sclera[1], rtol=1e-9)  # brightest pixels: the sclera
    # The conjunctiva never sets its own correction: repainting it leaves the grey-world estimate alone.
    repainted = warm.copy()
    repainted[mask] = (0.2, 0.9, 0.2)
    np.testing.assert_array_equal(colour.estimate_illuminant(repainted, ~mask, constancy="grey_world"),
                                  colour.estimate_illuminant(warm, ~mask, constancy="grey_world"))
    # Clipped pixels are no reference: a photo saturated outside the mask has NaN features, its pixels counted.
    blown = warm.copy()
    blown[~mask] = 1.0
    feats = colour.colour_features(blown, mask, constancy="white_patch")
    assert feats["num_pixels"] == mask.sum() and all(np.isnan(feats[n]) for n in colour.FEATURE_NAMES)
    # An explicit reference mask is honoured (here: the sclera strip only).
    strip = np.zeros_like(mask)
    strip[2:6, :] = True
    np.testing.assert_allclose(colour.estimate_illuminant(warm, strip, constancy="grey_world"),
                               colour.srgb_to_linear(warm[3, 0]), rtol=1e-9)
    np.testing.assert_array_equal(colour.estimate_illuminant(warm, strip, constancy="none"), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown colour constancy"):
        colour.colour_features(warm, mask, constancy="retinex")
