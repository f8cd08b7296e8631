"""Host-side boundary distances between 2-D binary masks (NumPy/SciPy).

Distances are computed on mask *boundaries* with Euclidean distance transforms
(`scipy.ndimage.distance_transform_edt`), in the physical units given by
`spacing` (pixels by default). They run on the host because they need a
distance transform of data-dependent shape, which has no efficient jit form.

Conventions (shared by every function here):

* Foreground: a `bool` mask is used as is; a numeric mask counts values
  `> 0.5` as foreground (so {0, 1}, {0, 255} and soft masks all work), the
  same rule as `anemia_jax.metrics.confusion_counts`.
* Boundary: the foreground minus its binary erosion by the full 3x3
  structuring element (8-connectivity), i.e. a foreground pixel is on the
  boundary if any of its 8 neighbours is background. Pixels outside the image
  count as background, so a mask touching the image border has a boundary
  there, and every non-empty mask has a non-empty boundary.
* Directed distances A->B: for each boundary pixel of A, the distance to the
  nearest boundary pixel of B.
* Hausdorff distance at percentile q: the q-th percentile (linear
  interpolation, `np.percentile`'s default) of the *union* of both directed
  distance sets; q=100 is the classic (maximum) Hausdorff distance. Note
  that some libraries (e.g. MONAI) instead take the maximum of the two
  directed percentiles; the two agree at q=100.
* Average symmetric surface distance (ASSD): the mean of that union,
  `(sum(d_AB) + sum(d_BA)) / (|dA| + |dB|)`.
* Empty masks: both empty -> 0.0 (perfect agreement); exactly one empty ->
  `math.inf` (no boundary to measure to). `summarize_distances` reports such
  infinities as a count; it never turns them into NaNs dropped from a mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "average_surface_distance",
    "batch_surface_distances",
    "hausdorff_distance",
    "mask_boundary",
    "summarize_distances",
    "surface_distances",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D mask [H, W]; got shape {mask.shape}. For "
            "[H, W, C] masks pass one channel (mask[..., c]); for batches use "
            "`batch_surface_distances`."
        )
    return mask if mask.dtype == bool else mask > 0.5


def _as_spacing(spacing: Sequence[float]) -> tuple[float, float]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 2 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(
            "`spacing` must be two positive finite numbers (row spacing, column "
            f"spacing); got {spacing}."
        )
    return spacing


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary of a 2-D mask: foreground minus its 8-connected erosion.

    Args:
      mask: [H, W] bool, or numeric with values > 0.5 as foreground.

    Returns:
      [H, W] bool; out-of-image pixels count as background, so a non-empty
      mask always has a non-empty boundary.
    """
    mask = _as_mask(mask, "mask")
    eroded = ndimage.binary_erosion(mask, structure=_EIGHT_CONNECTED, border_value=0)
    return mask & ~eroded


def _directed_distances(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]
) -> np.ndarray | None:
    """Union of both directed boundary distance sets; None if a mask is empty."""
    b_pred = mask_boundary(pred)
    b_label = mask_boundary(label)
    if not b_pred.any() or not b_label.any():
        return None
    # EDT of the complement gives, at every pixel, the distance to the nearest
    # boundary pixel of the other mask.
    to_label = ndimage.distance_transform_edt(~b_label, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~b_pred, sampling=spacing)
    return np.concatenate([to_label[b_pred], to_pred[b_label]])


def surface_distances(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    percentile: float = 95,
    spacing: Sequence[float] = (1, 1),
) -> dict[str, float]:
    """Hausdorff distance and ASSD of one pair of masks, sharing one set of EDTs.

    Args:
      pred: [H, W] predicted mask (bool, or numeric with > 0.5 foreground).
      label: [H, W] reference mask, same shape.
      percentile: in [0, 100]; see the module docstring for the convention.
      spacing: physical size of a pixel as (row, column); distances scale
        with it.

    Returns:
      {'hausdorff': float, 'assd': float}; 0.0 for both when both masks are
      empty, `math.inf` for both when exactly one is empty.
    """
    pred = _as_mask(pred, "pred")
    label = _as_mask(label, "label")
    if pred.shape != label.shape:
        raise ValueError(
            f"`pred` and `label` must have the same shape; got {pred.shape} and "
            f"{label.shape}."
        )
    if not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be in [0, 100]; got {percentile}.")
    spacing = _as_spacing(spacing)
    pred_empty, label_empty = not pred.any(), not label.any()
    if pred_empty and label_empty:
        return {"hausdorff": 0.0, "assd": 0.0}
    if pred_empty or label_empty:
        return {"hausdorff": math.inf, "assd": math.inf}
    distances = _directed_distances(pred, label, spacing)
    return {
        "hausdorff": float(np.percentile(distances, percentile)),
        "assd": float(distances.mean()),
    }


def hausdorff_distance(
    pred: np.ndarray,
    label: np.ndarray,
    percentile: float = 95,
    spacing: Sequence[float] = (1, 1),
) -> float:
    """Percentile Hausdorff distance between the boundaries of two 2-D masks.

    Args:
      pred: [H, W] predicted mask (bool, or numeric with > 0.5 foreground).
      label: [H, W] reference mask, same shape.
      percentile: q in [0, 100]; the q-th percentile of the union of both
        directed boundary distance sets. 95 gives the usual HD95; 100 gives
        the maximum, i.e. the classic Hausdorff distance.
      spacing: (row, column) pixel size; the result is in these units.

    Returns:
      A float: 0.0 if both masks are empty, `math.inf` if exactly one is.
    """
    return surface_distances(pred, label, percentile=percentile, spacing=spacing)[
        "hausdorff"
    ]


def average_surface_distance(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] = (1, 1)
) -> float:
    """Average symmetric surface distance (ASSD) between two 2-D masks.

    The mean of the union of both directed boundary distance sets, i.e. every
    boundary pixel of either mask counts once.

    Args:
      pred: [H, W] predicted mask (bool, or numeric with > 0.5 foreground).
      label: [H, W] reference mask, same shape.
      spacing: (row, column) pixel size; the result is in these units.

    Returns:
      A float: 0.0 if both masks are empty, `math.inf` if exactly one is.
    """
    return surface_distances(pred, label, spacing=spacing)["assd"]


def batch_surface_distances(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    percentile: float = 95,
    spacing: Sequence[float] = (1, 1),
) -> dict[str, np.ndarray]:
    """`surface_distances` for every image and channel of a batch.

    Args:
      pred: [N, H, W, C] predicted masks (bool, or numeric with > 0.5
        foreground), e.g. `metrics.binarize(logits)` fetched to the host.
      label: [N, H, W, C] reference masks.
      percentile: as in `hausdorff_distance`.
      spacing: (row, column) pixel size shared by all images.

    Returns:
      {'hausdorff': [N, C] float64, 'assd': [N, C] float64}, with the same
      empty-mask conventions (0.0 / inf). Entries for missing masks are
      computed like any other; exclude them with `summarize_distances(...,
      include=mask_weights > 0)`.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.ndim != 4 or pred.shape != label.shape:
        raise ValueError(
            "`pred` and `label` must both be [N, H, W, C] with equal shapes; got "
            f"{pred.shape} and {label.shape}."
        )
    n, _, _, c = pred.shape
    out = {"hausdorff": np.empty((n, c)), "assd": np.empty((n, c))}
    for i in range(n):
        for j in range(c):
            d = surface_distances(
                pred[i, :, :, j], label[i, :, :, j], percentile=percentile, spacing=spacing
            )
            out["hausdorff"][i, j] = d["hausdorff"]
            out["assd"][i, j] = d["assd"]
    return out


def summarize_distances(
    values: np.ndarray | Sequence[float], *, include: np.ndarray | None = None
) -> dict[str, float | int]:
    """Summary statistics of per-image distances that keeps infinities visible.

    Args:
      values: distances of any shape (flattened), e.g. one channel's [N]
        Hausdorff distances; `math.inf` marks an image where exactly one of
        prediction and label is empty. NaN is rejected: it means a bug
        upstream, and dropping it silently would bias the mean.
      include: optional bool array of the same shape; False entries (e.g.
        images whose reference mask is missing, or padding) are ignored
        entirely, counted neither as finite nor as infinite.

    Returns:
      {'mean', 'std', 'median'} over the finite values (std with ddof=0;
      each NaN when there is no finite value, which `count_finite == 0` makes
      explicit), and {'count_finite', 'count_infinite'} as ints.
    """
    values = np.asarray(values, dtype=np.float64)
    if include is not None:
        include = np.asarray(include, dtype=bool)
        if include.shape != values.shape:
            raise ValueError(
                f"`include` must have the shape of `values` {values.shape}; got "
                f"{include.shape}."
            )
        values = values[include]
    values = values.ravel()
    if np.isnan(values).any():
        raise ValueError(
            f"`values` contains {int(np.isnan(values).sum())} NaN(s); surface "
            "distances are finite or inf. Exclude missing masks with `include` "
            "instead of marking them NaN."
        )
    if (values < 0).any():
        raise ValueError("`values` must be non-negative distances.")
    finite = values[np.isfinite(values)]
    has_finite = finite.size > 0
    return {
        "mean": float(finite.mean()) if has_finite else math.nan,
        "std": float(finite.std()) if has_finite else math.nan,
        "median": float(np.median(finite)) if has_finite else math.nan,
        "count_finite": int(finite.size),
        "count_infinite": int(values.size - finite.size),
    }
