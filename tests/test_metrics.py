"""Tests for anemia_jax.metrics and anemia_jax.surface_distance.

Known-answer cases (offset squares, self-comparison, empty masks) plus random
cases against slow, independent references written here: plain NumPy counts
and scores, and brute-force pairwise distances between boundary pixels.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from anemia_jax import metrics, surface_distance

# ----------------------------------------------------------------------------
# Independent references.


def ref_counts(pred, label, weights=None):
    p = np.asarray(pred) > 0.5
    lab = np.asarray(label) > 0.5
    w = np.ones(p.shape) if weights is None else np.broadcast_to(weights, p.shape)
    out = {}
    for name, m in {"tp": p & lab, "fp": p & ~lab, "fn": ~p & lab, "tn": ~p & ~lab}.items():
        out[name] = (m * w).sum(axis=(1, 2))
    return out


def ref_scores_one(tp, fp, fn, tn):
    """Scalar scores with the documented 0/0 conventions, spelled out case by case."""
    dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    iou = 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)
    if tp + fp == 0:  # nothing predicted positive
        prec = 1.0 if fn == 0 else 0.0
    else:
        prec = tp / (tp + fp)
    if tp + fn == 0:  # label has no positives
        rec = 1.0 if fp == 0 else 0.0
    else:
        rec = tp / (tp + fn)
    if tn + fp == 0:  # label has no negatives
        spec = 1.0 if fn == 0 else 0.0
    else:
        spec = tn / (tn + fp)
    total = tp + fp + fn + tn
    acc = 1.0 if total == 0 else (tp + tn) / total
    return dict(dice=dice, iou=iou, precision=prec, recall=rec, specificity=spec,
                pixel_accuracy=acc)


def ref_scores(counts):
    shape = np.shape(counts["tp"])
    out = {k: np.zeros(shape) for k in metrics.SCORE_NAMES}
    for idx in np.ndindex(shape):
        one = ref_scores_one(*(float(counts[k][idx]) for k in metrics.COUNT_NAMES))
        for k, v in one.items():
            out[k][idx] = v
    return out


def ref_boundary(mask):
    """Foreground pixels with a background (or out-of-image) 8-neighbour."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if not (0 <= a < h and 0 <= b < w) or not mask[a, b]:
                        out[i, j] = True
    return out


def ref_distances(pred, label, spacing):
    pa = np.argwhere(ref_boundary(pred)) * np.asarray(spacing, float)
    pb = np.argwhere(ref_boundary(label)) * np.asarray(spacing, float)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


def square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def random_masks(rng, shape, p=0.4):
    return rng.random(shape) < p


# ----------------------------------------------------------------------------
# Device metrics.


@pytest.mark.parametrize("weights_kind", [None, "mask", "pixel", "full"])
@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
def test_confusion_counts_match_numpy(weights_kind, dtype):
    rng = np.random.default_rng(0)
    b, h, w, c = 3, 16, 12, 2
    if dtype is np.float32:  # soft values, 0.5 itself counting as negative
        levels = np.array([0.0, 0.3, 0.5, 0.7, 1.0], np.float32)
        pred = rng.choice(levels, (b, h, w, c))
        label = rng.choice(levels, (b, h, w, c))
    else:
        pred = random_masks(rng, (b, h, w, c)).astype(dtype)
        label = random_masks(rng, (b, h, w, c), 0.5).astype(dtype)
    weights = {
        None: None,
        "mask": (rng.random((b, 1, 1, c)) < 0.7).astype(np.float32),
        "pixel": (rng.random((b, h, w, 1)) < 0.8).astype(np.float32),
        "full": rng.random((b, h, w, c)).astype(np.float32),
    }[weights_kind]
    got = metrics.confusion_counts(pred, label, weights=weights)
    want = ref_counts(pred, label, weights)
    for k in metrics.COUNT_NAMES:
        assert got[k].shape == (b, c) and got[k].dtype == jnp.float32
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_scores_match_reference_on_random_and_degenerate_cases():
    rng = np.random.default_rng(1)
    b, h, w = 8, 8, 8
    pred = random_masks(rng, (b, h, w, 1), 0.3)
    label = random_masks(rng, (b, h, w, 1), 0.3)
    # Degenerate rows: every 0/0 branch of every score.
    pred[0], label[0] = False, False
    pred[1], label[1] = False, True
    pred[2], label[2] = True, False
    pred[3], label[3] = True, True
    pred[4] = False  # empty prediction, random label
    label[5] = False  # random prediction, empty label
    counts = metrics.confusion_counts(pred, label)
    want = ref_scores(ref_counts(pred, label))
    from_counts = metrics.scores_from_counts(counts)
    fns = dict(dice=metrics.dice_score, iou=metrics.iou_score, precision=metrics.precision,
               recall=metrics.recall, specificity=metrics.specificity,
               pixel_accuracy=metrics.pixel_accuracy)
    for name, fn in fns.items():
        np.testing.assert_allclose(fn(pred, label), want[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(from_counts[name], want[name], rtol=1e-6, err_msg=name)
        assert not np.isnan(np.asarray(from_counts[name])).any()


def test_empty_mask_conventions():
    z = np.zeros((1, 4, 4, 1), bool)
    o = np.ones((1, 4, 4, 1), bool)
    both_empty = metrics.scores_from_counts(metrics.confusion_counts(z, z))
    assert float(both_empty["dice"][0, 0]) == 1.0 and float(both_empty["iou"][0, 0]) == 1.0
    assert float(both_empty["precision"][0, 0]) == 1.0
    assert float(both_empty["recall"][0, 0]) == 1.0
    pred_empty = metrics.scores_from_counts(metrics.confusion_counts(z, o))
    assert float(pred_empty["dice"][0, 0]) == 0.0 and float(pred_empty["iou"][0, 0]) == 0.0
    assert float(pred_empty["precision"][0, 0]) == 0.0  # label had positives
    assert float(pred_empty["specificity"][0, 0]) == 0.0  # no label negatives, fn > 0
    label_empty = metrics.scores_from_counts(metrics.confusion_counts(o, z))
    assert float(label_empty["dice"][0, 0]) == 0.0
    assert float(label_empty["recall"][0, 0]) == 0.0  # something falsely predicted
    all_pos = metrics.scores_from_counts(metrics.confusion_counts(o, o))
    assert float(all_pos["specificity"][0, 0]) == 1.0


def test_mask_against_itself_is_perfect():
    rng = np.random.default_rng(2)
    m = random_masks(rng, (2, 16, 16, 3))
    scores = metrics.scores_from_counts(metrics.confusion_counts(m, m))
    for name in metrics.SCORE_NAMES:
        np.testing.assert_array_equal(scores[name], 1.0, err_msg=name)
    assert metrics.hausdorff_distance(m[0, ..., 0], m[0, ..., 0], percentile=100) == 0.0


def test_weights_exclude_a_missing_mask():
    rng = np.random.default_rng(3)
    pred = random_masks(rng, (2, 8, 8, 2))
    label = random_masks(rng, (2, 8, 8, 2))
    mask_weights = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    counts = metrics.confusion_counts(pred, label, weights=mask_weights[:, None, None, :])
    for k in metrics.COUNT_NAMES:
        assert float(counts[k][0, 1]) == 0.0
    dice = np.asarray(metrics.scores_from_counts(counts)["dice"])
    mean = metrics.mean_over_images(dice, mask_weights)
    np.testing.assert_allclose(mean, [dice[:, 0].mean(), dice[1, 1]], rtol=1e-6)
    # A channel nobody has is undefined, reported as NaN (not a fake 1.0).
    only_first = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert np.isnan(metrics.mean_over_images(dice, only_first)[1])
    # Excluded entries cannot leak in even when they are inf / NaN.
    poisoned = dice.copy()
    poisoned[0, 1] = np.nan
    np.testing.assert_allclose(metrics.mean_over_images(poisoned, mask_weights), mean)


def test_weights_must_be_4d():
    x = np.zeros((2, 8, 8, 2), bool)
    with pytest.raises(ValueError, match=r"weights\[:, None, None, :\]"):
        metrics.confusion_counts(x, x, weights=np.ones((2, 2)))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.confusion_counts(x, x[..., :1])


def test_binarize_matches_sigmoid_threshold():
    rng = np.random.default_rng(4)
    logits = np.concatenate([rng.normal(0, 3, 500), [-1e4, 1e4, 0.0]]).astype(np.float32)
    for t in (0.1, 0.5, 0.9):
        want = special.expit(logits.astype(np.float64)) > t
        # Exclude points within float32 rounding of the threshold itself.
        near = np.abs(logits - np.log(t / (1 - t))) < 1e-5
        got = np.asarray(metrics.binarize(logits, t))
        np.testing.assert_array_equal(got[~near], want[~near])
        probs = special.expit(logits)
        np.testing.assert_array_equal(metrics.binarize(probs, t, from_logits=False), probs > t)
    assert metrics.binarize(jnp.array([0.0], jnp.bfloat16)).dtype == jnp.bool_
    with pytest.raises(ValueError, match="threshold"):
        metrics.binarize(logits, 1.5)


def test_jit_and_vmap():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 2, 8, 8, 1)).astype(np.float32)
    label = random_masks(rng, (4, 2, 8, 8, 1)).astype(np.uint8)
    weights = (rng.random((4, 2, 1, 1, 1)) < 0.5).astype(np.float32)

    def step(lg, lab, w):
        return metrics.scores_from_counts(
            metrics.confusion_counts(metrics.binarize(lg), lab, weights=w))

    jitted = jax.jit(step)(logits[0], label[0], weights[0])
    eager = ref_scores(ref_counts(logits[0] > 0, label[0], weights[0]))
    batched = jax.jit(jax.vmap(step))(logits, label, weights)
    for name in metrics.SCORE_NAMES:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-6)
        assert batched[name].shape == (4, 2, 1)
        np.testing.assert_allclose(batched[name][0], jitted[name], rtol=1e-6)
    # Aggregation also traces, e.g. for a per-step training log.
    mean = jax.jit(metrics.mean_over_images)(jitted["dice"], weights[0][:, 0, 0, :])
    assert mean.shape == (1,)


def test_inside_shard_map_with_vma_checks():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    n = jax.device_count() * 2
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(n, 8, 8, 2)).astype(np.float32)
    label = random_masks(rng, (n, 8, 8, 2)).astype(np.uint8)
    mw = (rng.random((n, 2)) < 0.7).astype(np.float32)

    def per_device(lg, lab, w):
        counts = metrics.confusion_counts(metrics.binarize(lg), lab, weights=w[:, None, None, :])
        return {**counts, **metrics.scores_from_counts(counts)}

    spec = jax.sharding.PartitionSpec("data")
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                               out_specs=spec, check_vma=True))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    got = fn(*(jax.device_put(x, sharding) for x in (logits, label, mw)))
    want = ref_scores(ref_counts(logits > 0, label, mw[:, None, None, :]))
    for name in metrics.SCORE_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_pooled_scores_sum_counts_first():
    rng = np.random.default_rng(6)
    pred = random_masks(rng, (5, 8, 8, 2))
    label = random_masks(rng, (5, 8, 8, 2))
    counts = {k: np.asarray(v) for k, v in metrics.confusion_counts(pred, label).items()}
    mw = np.array([[1, 1], [0, 1], [1, 1], [1, 0], [1, 1]], np.float64)
    got = metrics.pooled_scores(counts, weights=mw)
    for ch in range(2):
        keep = mw[:, ch] > 0
        p, lab = pred[keep, ..., ch], label[keep, ..., ch]
        tp, fp = (p & lab).sum(), (p & ~lab).sum()
        fn, tn = (~p & lab).sum(), (~p & ~lab).sum()
        want = ref_scores_one(tp, fp, fn, tn)
        for name in metrics.SCORE_NAMES:
            np.testing.assert_allclose(got[name][ch], want[name], rtol=1e-12)
    summed = {k: v.sum(0) for k, v in counts.items()}
    np.testing.assert_allclose(metrics.pooled_scores(summed)["dice"],
                               metrics.pooled_scores(counts)["dice"])


def test_accumulator_counts_each_example_once_with_padding():
    rng = np.random.default_rng(7)
    n, b = 7, 3  # 3 batches, last padded by 2
    pred = random_masks(rng, (n, 8, 8, 2))
    label = random_masks(rng, (n, 8, 8, 2))
    mw = (rng.random((n, 2)) < 0.7).astype(np.float32)
    order = rng.permutation(n)
    acc = metrics.MetricsAccumulator()
    for start in range(0, n, b):
        idx = order[start:start + b]
        pad = b - len(idx)
        idx_p = np.concatenate([idx, np.repeat(idx[:1], pad)])  # padding repeats an example
        valid = np.arange(b) < len(idx)
        counts = metrics.confusion_counts(pred[idx_p], label[idx_p],
                                          weights=mw[idx_p][:, None, None, :])
        acc.add({**counts, "mask_weights": jnp.asarray(mw[idx_p]),
                 "index": idx_p.astype(np.int32)}, valid=valid)
    assert acc.num_examples == n
    values = acc.result()
    np.testing.assert_array_equal(values["index"], np.arange(n))
    summary = metrics.summarize_counts(values, weights=values["mask_weights"])
    per_image = ref_scores(ref_counts(pred, label, mw[:, None, None, :]))
    for name in metrics.SCORE_NAMES:
        want = [per_image[name][mw[:, c] > 0, c].mean() for c in range(2)]
        np.testing.assert_allclose(summary[name], want, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(summary["num_images"], (mw > 0).sum(0))
    assert set(summary) >= {f"pooled_{k}" for k in metrics.SCORE_NAMES}
    with pytest.raises(ValueError, match="more than once"):
        acc.add({"tp": np.zeros((1, 2)), "fp": np.zeros((1, 2)), "fn": np.zeros((1, 2)),
                 "tn": np.zeros((1, 2)), "mask_weights": np.ones((1, 2)),
                 "index": np.array([3])})
    acc.reset()
    with pytest.raises(ValueError, match="Nothing was added"):
        acc.result()


# ----------------------------------------------------------------------------
# Host distances.


@pytest.mark.parametrize("k", [1, 2, 5])
def test_offset_squares_have_hausdorff_k(k):
    a = square((32, 32), 8, 8, 12)
    b = square((32, 32), 8, 8 + k, 12)
    assert metrics.hausdorff_distance(a, b, percentile=100) == pytest.approx(k)
    assert metrics.hausdorff_distance(b, a, percentile=100) == pytest.approx(k)
    diag = square((32, 32), 8 + k, 8 + k, 12)
    assert metrics.hausdorff_distance(a, diag, percentile=100) == pytest.approx(k * math.sqrt(2))


def test_spacing_scales_distances():
    a = square((32, 32), 8, 8, 12)
    b = square((32, 32), 8, 11, 12)  # horizontal offset of 3 columns
    assert metrics.hausdorff_distance(a, b, 100, spacing=(0.5, 0.5)) == pytest.approx(1.5)
    assert metrics.hausdorff_distance(a, b, 100, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    base = metrics.average_surface_distance(a, b)
    assert metrics.average_surface_distance(a, b, spacing=(3, 3)) == pytest.approx(3 * base)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff_distance(a, b, spacing=(1, 0))


def test_distance_empty_conventions_and_self():
    z = np.zeros((16, 16), np.uint8)
    m = square((16, 16), 0, 0, 5).astype(np.uint8)  # touches the image border
    assert metrics.hausdorff_distance(z, z) == 0.0
    assert metrics.average_surface_distance(z, z) == 0.0
    assert metrics.hausdorff_distance(m, m) == 0.0
    assert metrics.average_surface_distance(m, m) == 0.0
    for p, lab in ((z, m), (m, z)):
        assert metrics.hausdorff_distance(p, lab) == math.inf
        assert metrics.average_surface_distance(p, lab) == math.inf
    with pytest.raises(ValueError, match="2-D"):
        metrics.hausdorff_distance(m[..., None], m[..., None])


def test_distances_match_brute_force_on_random_masks():
    rng = np.random.default_rng(8)
    for trial in range(12):
        shape = (int(rng.integers(8, 24)), int(rng.integers(8, 24)))
        pred = random_masks(rng, shape, rng.uniform(0.05, 0.6))
        label = random_masks(rng, shape, rng.uniform(0.05, 0.6))
        spacing = (float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)))
        np.testing.assert_array_equal(metrics.mask_boundary(pred), ref_boundary(pred))
        d = ref_distances(pred, label, spacing)
        for q in (50, 95, 100):
            assert metrics.hausdorff_distance(pred, label, q, spacing) == pytest.approx(
                np.percentile(d, q), rel=1e-9), (trial, q)
        assert metrics.average_surface_distance(pred, label, spacing) == pytest.approx(
            d.mean(), rel=1e-9)


def test_batch_distances_and_summary_keep_infinities_visible():
    a = square((16, 16), 2, 2, 6)
    b = square((16, 16), 2, 4, 6)
    z = np.zeros((16, 16), bool)
    pred = np.stack([a, a, z, a])[..., None]
    label = np.stack([a, b, a, z])[..., None]
    d = metrics.batch_surface_distances(pred, label, percentile=100)
    np.testing.assert_allclose(d["hausdorff"][:, 0], [0, 2, np.inf, np.inf])
    s = metrics.summarize_distances(d["hausdorff"])
    assert s["count_finite"] == 2 and s["count_infinite"] == 2
    assert s["mean"] == pytest.approx(1.0) and s["median"] == pytest.approx(1.0)
    assert s["std"] == pytest.approx(1.0)
    only = metrics.summarize_distances(d["hausdorff"], include=np.array([[0], [1], [0], [1]]))
    assert (only["count_finite"], only["count_infinite"], only["mean"]) == (1, 1, 2.0)
    none_finite = metrics.summarize_distances([math.inf])
    assert math.isnan(none_finite["mean"]) and none_finite["count_infinite"] == 1
    with pytest.raises(ValueError, match="NaN"):
        metrics.summarize_distances([1.0, math.nan])


def test_metrics_reexports_surface_distance():
    assert metrics.hausdorff_distance is surface_distance.hausdorff_distance
    assert metrics.summarize_distances is surface_distance.summarize_distances
