"""Segmentation metrics: jit-able confusion counts and scores, dataset aggregation.

Device side (pure JAX, float32, jit/vmap/shard_map-safe): masks are
`[B, H, W, C]` (C = mask channels, e.g. palpebral / forniceal), and every
score is per image and channel, `[B, C]`. The intended use is to compute
`confusion_counts` once per step and derive every score from those counts
with `scores_from_counts`, so nothing is recomputed per metric::

    pred = metrics.binarize(logits)                         # threshold 0.5
    counts = metrics.confusion_counts(
        pred, masks, weights=mask_weights[:, None, None, :])  # each [B, C]
    scores = metrics.scores_from_counts(counts)              # each [B, C]

Input conventions: `pred` and `label` are `bool`, or numeric with values
`> 0.5` counting as positive (so {0, 1} masks and soft, interpolated labels
work; pass logits through `binarize` first). `weights` (non-negative) must be
4-D and broadcastable to `[B, H, W, C]`: `[B, 1, 1, C]` excludes a missing
mask, `[B, H, W, 1]` restricts to valid pixels. Weighted counts are sums of
weights, so with 0/1 weights they are pixel counts.

Zero-denominator (0/0) conventions, all finite so that sums never turn NaN:

* Dice, IoU: 1 when prediction and label are both empty (nothing to find,
  nothing falsely found); a one-sided empty case is 0 by the formula.
* precision = tp / (tp + fp): with no predicted positives, 1 if the label has
  no positives either, else 0.
* recall (sensitivity) = tp / (tp + fn): with no label positives, 1 if
  nothing is predicted positive, else 0.
* specificity = tn / (tn + fp): with no label negatives, 1 if nothing is
  predicted negative, else 0.
* pixel accuracy = (tp + tn) / total: 1 when the total weight is 0.

An image whose weights are all 0 therefore gets these placeholder values;
exclude it when aggregating by giving it weight 0 in `mean_over_images`.

Aggregation over a dataset: `mean_over_images` (the per-image mean that papers
report; images with a missing mask excluded) and `pooled_scores` (counts
summed over all pixels of all images first). `MetricsAccumulator` gathers
per-example values of padded eval batches on the host, each example once.

Host-side boundary distances (Hausdorff, ASSD) live in
`anemia_jax.surface_distance` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anemia_jax.surface_distance import (
    average_surface_distance,
    batch_surface_distances,
    hausdorff_distance,
    mask_boundary,
    summarize_distances,
    surface_distances,
)
from anemia_jax.utils import parallel

__all__ = [
    "COUNT_NAMES",
    "SCORE_NAMES",
    "MetricsAccumulator",
    "average_surface_distance",
    "batch_surface_distances",
    "binarize",
    "confusion_counts",
    "dice_score",
    "hausdorff_distance",
    "iou_score",
    "mask_boundary",
    "mean_over_images",
    "pixel_accuracy",
    "pooled_scores",
    "precision",
    "recall",
    "scores_from_counts",
    "specificity",
    "summarize_counts",
    "summarize_distances",
    "surface_distances",
]

COUNT_NAMES = ("tp", "fp", "fn", "tn")
SCORE_NAMES = ("dice", "iou", "precision", "recall", "specificity", "pixel_accuracy")

Array = Any  # jax.Array or np.ndarray


def _xp(*arrays: Array):
    """jnp for JAX arrays and tracers (device, float32), else NumPy (host, float64)."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def binarize(
    logits_or_probs: Array, threshold: float = 0.5, from_logits: bool = True
) -> jax.Array:
    """Binary masks from logits or probabilities: positive iff prob > threshold.

    Args:
      logits_or_probs: [B, H, W, C] (any shape works) logits, or
        probabilities when `from_logits=False`; any float dtype.
      threshold: probability threshold in [0, 1].
      from_logits: compare logits with logit(threshold) instead of applying
        a sigmoid, which is exact and avoids saturation of large logits.

    Returns:
      bool array of the input's shape.
    """
    if isinstance(threshold, (int, float)) and not 0 <= threshold <= 1:
        raise ValueError(f"`threshold` is a probability in [0, 1]; got {threshold}.")
    x = jnp.asarray(logits_or_probs).astype(jnp.float32)
    if from_logits:
        t = jnp.asarray(threshold, jnp.float32)
        return x > jnp.log(t) - jnp.log1p(-t)
    return x > threshold


def _as_binary(x: jax.Array) -> jax.Array:
    return x if x.dtype == jnp.bool_ else x > 0.5


def confusion_counts(
    pred: Array, label: Array, *, weights: Array | None = None
) -> dict[str, jax.Array]:
    """Per-image, per-channel (weighted) confusion counts.

    Args:
      pred: [B, H, W, C] predicted mask: bool, or numeric (> 0.5 positive).
      label: [B, H, W, C] reference mask, same convention.
      weights: optional non-negative 4-D array broadcastable to
        [B, H, W, C]; e.g. `mask_weights[:, None, None, :]` ([B, 1, 1, C]) to
        exclude missing masks, or [B, H, W, 1] for valid pixels.

    Returns:
      {'tp', 'fp', 'fn', 'tn'}, each float32 [B, C]: sums of weights (pixel
      counts without weights; exact up to 2**24 pixels per image).
    """
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    if pred.ndim != 4 or pred.shape != label.shape:
        raise ValueError(
            "`pred` and `label` must both be [B, H, W, C] with equal shapes; got "
            f"{pred.shape} and {label.shape}."
        )
    p, lab = _as_binary(pred), _as_binary(label)
    w = None
    if weights is not None:
        w = jnp.asarray(weights, jnp.float32)
        # A 2-D [B, C] weight would broadcast as [1, 1, B, C] and silently
        # weight the wrong axes whenever W == B, so only 4-D is accepted.
        if w.ndim != 4 or np.broadcast_shapes(w.shape, pred.shape) != pred.shape:
            raise ValueError(
                f"`weights` must be 4-D and broadcastable to {pred.shape}; got "
                f"{w.shape}. For per-image-and-channel weights [B, C] pass "
                "weights[:, None, None, :]."
            )

    def count(m: jax.Array) -> jax.Array:
        m = m.astype(jnp.float32)
        return jnp.sum(m if w is None else m * w, axis=(1, 2))

    return {
        "tp": count(p & lab),
        "fp": count(p & ~lab),
        "fn": count(~p & lab),
        "tn": count(~p & ~lab),
    }


def _safe_div(num: Array, den: Array, if_empty: Array, xp) -> Array:
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1), if_empty)


def _scores(counts: Mapping[str, Array], xp) -> dict[str, Array]:
    tp, fp, fn, tn = (counts[k] for k in COUNT_NAMES)
    no_fp = xp.where(fp > 0, 0.0, 1.0)
    no_fn = xp.where(fn > 0, 0.0, 1.0)
    return {
        "dice": _safe_div(2 * tp, 2 * tp + fp + fn, 1.0, xp),
        "iou": _safe_div(tp, tp + fp + fn, 1.0, xp),
        # 0/0 cases: tp + fp == 0 means label positives == fn, and so on.
        "precision": _safe_div(tp, tp + fp, no_fn, xp),
        "recall": _safe_div(tp, tp + fn, no_fp, xp),
        "specificity": _safe_div(tn, tn + fp, no_fn, xp),
        "pixel_accuracy": _safe_div(tp + tn, tp + fp + fn + tn, 1.0, xp),
    }


def _check_counts(counts: Mapping[str, Array]) -> None:
    missing = [k for k in COUNT_NAMES if k not in counts]
    if missing:
        raise KeyError(
            f"`counts` lacks {missing}; pass the dict returned by `confusion_counts`."
        )


def scores_from_counts(counts: Mapping[str, Array]) -> dict[str, Array]:
    """Every score in `SCORE_NAMES` from confusion counts, elementwise.

    Args:
      counts: mapping with 'tp', 'fp', 'fn', 'tn' of equal shape (e.g. [B, C]
        from `confusion_counts`); other keys are ignored.

    Returns:
      {'dice', 'iou', 'precision', 'recall', 'specificity', 'pixel_accuracy'}
      of that shape, with the 0/0 conventions of the module docstring. JAX
      inputs give JAX float32 results (jit-able); NumPy inputs give NumPy.
    """
    _check_counts(counts)
    return _scores(counts, _xp(*(counts[k] for k in COUNT_NAMES)))


def dice_score(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """Dice 2tp / (2tp + fp + fn), [B, C]; 1 when both masks are empty."""
    return scores_from_counts(confusion_counts(pred, label, weights=weights))["dice"]


def iou_score(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """IoU (Jaccard) tp / (tp + fp + fn), [B, C]; 1 when both masks are empty."""
    return scores_from_counts(confusion_counts(pred, label, weights=weights))["iou"]


def precision(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """Precision tp / (tp + fp), [B, C].

    With nothing predicted positive: 1 if the label is empty too, else 0.
    """
    return scores_from_counts(confusion_counts(pred, label, weights=weights))["precision"]


def recall(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """Recall (sensitivity) tp / (tp + fn), [B, C].

    With an empty label: 1 if nothing is predicted positive either, else 0.
    """
    return scores_from_counts(confusion_counts(pred, label, weights=weights))["recall"]


def specificity(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """Specificity tn / (tn + fp), [B, C].

    With an all-positive label: 1 if the prediction is all positive too, else 0.
    """
    return scores_from_counts(confusion_counts(pred, label, weights=weights))["specificity"]


def pixel_accuracy(pred: Array, label: Array, *, weights: Array | None = None) -> jax.Array:
    """Pixel accuracy (tp + tn) / total, [B, C]; 1 when the total weight is 0."""
    return scores_from_counts(confusion_counts(pred, label, weights=weights))[
        "pixel_accuracy"
    ]


def mean_over_images(per_image_scores: Array, weights: Array | None = None) -> Array:
    """Weighted mean over images, per channel: the number papers report.

    Args:
      per_image_scores: [N, C] scores (e.g. Dice per image and channel).
      weights: optional [N, C] non-negative; 0 excludes an entry (a missing
        mask, a padded example). Typically `mask_weights * valid[:, None]`.

    Returns:
      [C]: sum(w * s) / sum(w) over images; NaN for a channel with no
      weight at all (no image has that mask, so the mean is undefined).
      Excluded entries never leak in, even if they are NaN or inf. NumPy
      inputs are reduced in float64 on the host; JAX inputs stay on device.
    """
    xp = _xp(per_image_scores, weights)
    s = xp.asarray(per_image_scores)
    s = s.astype(np.float64) if xp is np else s.astype(jnp.float32)
    w = xp.ones_like(s) if weights is None else xp.asarray(weights).astype(s.dtype)
    if s.ndim != 2 or w.shape != s.shape:
        raise ValueError(
            "`per_image_scores` and `weights` must both be [N, C]; got "
            f"{s.shape} and {w.shape}."
        )
    total = w.sum(axis=0)
    weighted = xp.where(w > 0, s * w, 0.0).sum(axis=0)
    return xp.where(total > 0, weighted / xp.where(total > 0, total, 1.0), xp.nan)


def pooled_scores(
    counts: Mapping[str, Array], *, weights: Array | None = None
) -> dict[str, Array]:
    """Scores of counts summed over all images first (pooled over all pixels).

    Args:
      counts: 'tp', 'fp', 'fn', 'tn', each [..., C]: per-image counts [N, C]
        or already summed [C]; every leading axis is summed.
      weights: optional, the shape of each count; multiplies the counts
        before summing (0 excludes an image's mask).

    Returns:
      Every score in `SCORE_NAMES`, each [C]. NumPy inputs are summed in
      float64, exact for any realistic dataset size.
    """
    _check_counts(counts)
    xp = _xp(weights, *(counts[k] for k in COUNT_NAMES))
    dtype = np.float64 if xp is np else jnp.float32
    summed = {}
    for k in COUNT_NAMES:
        c = xp.asarray(counts[k]).astype(dtype)
        if weights is not None:
            c = c * xp.asarray(weights).astype(dtype)
        summed[k] = c.reshape(-1, c.shape[-1]).sum(axis=0) if c.ndim > 1 else c
    return _scores(summed, xp)


def summarize_counts(
    counts: Mapping[str, Array], *, weights: Array | None = None
) -> dict[str, np.ndarray]:
    """Per-image means and pooled values of every score, on the host.

    Args:
      counts: 'tp', 'fp', 'fn', 'tn', each [N, C] (e.g.
        `MetricsAccumulator.result()`); other keys are ignored.
      weights: optional [N, C]; 0 excludes an image's mask from both
        aggregates (typically the examples' `mask_weights`).

    Returns:
      float64 [C] arrays: `<score>` (mean over images) and `pooled_<score>`
      for each score in `SCORE_NAMES`, plus `num_images` (images with weight
      > 0 per channel, int64).
    """
    _check_counts(counts)
    host = {k: np.asarray(counts[k], np.float64) for k in COUNT_NAMES}
    w = None if weights is None else np.asarray(weights, np.float64)
    per_image = _scores(host, np)
    out: dict[str, np.ndarray] = {}
    for name in SCORE_NAMES:
        out[name] = mean_over_images(per_image[name], w)
    for name, value in pooled_scores(host, weights=w).items():
        out[f"pooled_{name}"] = value
    shape = host["tp"].shape
    out["num_images"] = (np.ones(shape) if w is None else w > 0).sum(axis=0).astype(np.int64)
    return out


class MetricsAccumulator:
    """Concatenates per-example values of eval batches on the host, once each.

    Usage::

        acc = MetricsAccumulator()
        for batch in dataset.eval_batches():
            counts = eval_step(state, batch)            # each [B, C]
            acc.add({**counts, 'mask_weights': batch['mask_weights'],
                     'index': batch['index']}, valid=batch['valid'])
        values = acc.result()                          # each [N, ...]
        summary = summarize_counts(values, weights=values['mask_weights'])

    Padded rows (`valid` False) are dropped. If the values carry
    `index_key` (default 'index', the example's position in its split), an
    example seen twice raises `ValueError`, and `result()` is ordered by
    index. Multi-process: global arrays that are not fully addressable are
    all-gathered, so every process must call `add` with the same batches.
    """

    def __init__(self, index_key: str | None = "index"):
        self.index_key = index_key
        self._chunks: dict[str, list[np.ndarray]] = {}
        self._seen: set[int] = set()

    @property
    def num_examples(self) -> int:
        """Valid examples added so far."""
        first = next(iter(self._chunks.values()), [])
        return sum(len(c) for c in first)

    def add(self, values: Mapping[str, Array], *, valid: Array | None = None) -> None:
        """Adds one batch.

        Args:
          values: name -> [B, ...] per-example arrays (JAX or NumPy); the same
            names on every call.
          valid: optional bool [B]; False marks padding, which is dropped.
        """
        if not values:
            raise ValueError("`values` is empty; pass at least one [B, ...] array.")
        host = {k: np.asarray(v) for k, v in parallel.fetch(dict(values)).items()}
        if self._chunks and set(host) != set(self._chunks):
            raise ValueError(
                f"Every batch must carry the same names; got {sorted(host)}, earlier "
                f"{sorted(self._chunks)}."
            )
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in host.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"All values must be [B, ...] with one B; got leading sizes {sizes}.")
        batch = next(iter(sizes.values()))
        keep = np.ones(batch, bool) if valid is None else np.asarray(parallel.fetch(valid)).astype(bool)
        if keep.shape != (batch,):
            raise ValueError(f"`valid` must be [B] = [{batch}]; got {keep.shape}.")
        host = {k: v[keep] for k, v in host.items()}
        if self.index_key is not None and self.index_key in host:
            idx = host[self.index_key].astype(np.int64).ravel()
            uniq, times = np.unique(idx, return_counts=True)
            repeated = set(uniq[times > 1].tolist()) | (set(uniq.tolist()) & self._seen)
            if repeated:
                raise ValueError(
                    f"Examples {sorted(repeated)[:10]} were added more than once; eval "
                    "batches must cover each example once (mark padding with `valid`)."
                )
            self._seen.update(uniq.tolist())
        for k, v in host.items():
            self._chunks.setdefault(k, []).append(v)

    def result(self) -> dict[str, np.ndarray]:
        """name -> [N, ...] over all valid examples added (ordered by index if known)."""
        if not self._chunks:
            raise ValueError("Nothing was added; call `add` with at least one batch first.")
        out = {k: np.concatenate(v, axis=0) for k, v in self._chunks.items()}
        if self.index_key is not None and self.index_key in out:
            order = np.argsort(out[self.index_key], kind="stable")
            out = {k: v[order] for k, v in out.items()}
        return out

    def reset(self) -> None:
        """Forgets everything added (start of the next evaluation)."""
        self._chunks.clear()
        self._seen.clear()
