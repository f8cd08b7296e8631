"""Vectorised NumPy raster primitives for the conjunctiva phantom: smooth random fields, blur, soft edges.

Coordinates are in units of the image height (``y`` in [0, 1], ``x`` in [0, W / H]) so that every size and
frequency below is independent of the rendering resolution.
"""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=64)
def _bspline_taps(n_out: int, n_grid: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps from a coarse grid to ``n_out`` samples: indices and weights, both ``[4, n_out]``.

    The grid has ``n_grid`` nodes of which ``margin`` on each side lie outside the unit interval, so the
    field has no boundary artefacts. A cubic B-spline (rather than bilinear) keeps the field C2-smooth, which
    is what makes its zero crossings (the vessel ridges) look like vessels and not like polylines; four taps
    per output sample keep it cheap at any resolution.
    """
    cells = n_grid - 1 - 2 * margin
    pos = (np.arange(n_out) + 0.5) / n_out * cells + margin
    base = np.floor(pos).astype(np.int64)
    f = pos - base
    weights = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6.0
    index = np.clip(base[None, :] + np.arange(-1, 3)[:, None], 0, n_grid - 1)
    return index, weights.astype(np.float32)


def smooth_field(rng: np.random.Generator, height: int, width: int, cells: int, aspect: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field ``[height, width]`` with ``cells`` features per image height.

    The number of random draws depends only on ``cells`` and ``aspect`` (width / height of the scene), never
    on the pixel size, so the same generator state gives the same field at every resolution.
    """
    margin = 2
    grid_h = cells + 1 + 2 * margin
    grid_w = int(math.ceil(cells * aspect)) + 1 + 2 * margin
    grid = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    rows, row_w = _bspline_taps(height, grid_h, margin)
    cols, col_w = _bspline_taps(width, grid_w, margin)
    tall = sum(row_w[k][:, None] * grid[rows[k]] for k in range(4))  # [height, grid_w]
    field = sum(col_w[k][None, :] * tall[:, cols[k]] for k in range(4))  # [height, width]
    field -= field.mean()
    return field / (field.std() + 1e-6)


def gauss(z: np.ndarray) -> np.ndarray:
    """``exp(-z^2)``, exactly 0 beyond |z| ~ 7 rather than denormal: float32 denormals (exp of -88 to -103)
    make every later operation on those pixels many times slower."""
    return np.exp(-np.minimum(np.square(z), 50.0))


def ridges(field: np.ndarray, width: float) -> np.ndarray:
    """Thin bright lines along the zero crossings of ``field`` (a meandering vessel-like network) in [0, 1]."""
    return gauss(field / width) * (np.abs(field) < 7.0 * width)


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of ``[H, W]`` or ``[H, W, C]`` float32 ``image`` with edge padding.

    A loop over the (at most a few dozen) kernel taps, each a whole-image shifted add of a view.
    """
    if sigma_px < 0.25:
        return image
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    height, width = image.shape[:2]
    rest = [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, [(radius, radius), (0, 0), *rest], mode="edge")
    out = np.zeros_like(image)
    for k, tap in enumerate(taps):
        out += tap * padded[k : k + height]
    padded = np.pad(out, [(0, 0), (radius, radius), *rest], mode="edge")
    out = np.zeros_like(image)
    for k, tap in enumerate(taps):
        out += tap * padded[:, k : k + width]
    return out


def inside(signed_distance: np.ndarray, edge_px: float, height: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a region given its signed distance (> 0 inside, height units).

    Coverage is 0.5 exactly on the boundary, so thresholding coverage at 0.5 gives the region's exact mask.
    """
    width = max(edge_px, 1e-3) / height
    return np.clip(0.5 + signed_distance / width, 0.0, 1.0)


def bump(t: np.ndarray, power: float) -> np.ndarray:
    """``max(1 - t^2, 0) ** power``: 1 at the centre, 0 for ``|t| >= 1`` (the almond profile of eyelids)."""
    return np.clip(1.0 - t * t, 0.0, None) ** power


def smooth_curve(rng: np.random.Generator, num_waves: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth 1-D perturbation of roughly unit amplitude on t in [-1.5, 1.5], as an ``np.interp`` table.

    Returns ``(t_nodes, values)`` sampled on 257 nodes; evaluate with ``np.interp(t, t_nodes, values)``.
    """
    t = np.linspace(-1.5, 1.5, 257)
    freqs = rng.uniform(0.6, 2.2, num_waves)
    phases = rng.uniform(0.0, 2 * np.pi, num_waves)
    amps = rng.normal(0.0, 1.0, num_waves) / math.sqrt(num_waves)
    values = (amps[:, None] * np.sin(np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(axis=0)
    return t, values


def splat_strokes(points_xy: np.ndarray, weights: np.ndarray, height: int, width: int, sigma_px: float) -> np.ndarray:
    """Renders densely sampled stroke points (``[N, 2]`` x, y in height units) into a ``[H, W]`` density.

    Each point adds its weight to its pixel; a Gaussian blur of ``sigma_px`` then gives the strokes thickness
    and anti-aliasing. Points must be spaced at most about half a pixel apart along each stroke.
    """
    cols = np.floor(points_xy[:, 0] * height).astype(np.int64)
    rows = np.floor(points_xy[:, 1] * height).astype(np.int64)
    keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    acc = np.zeros(height * width, np.float32)
    np.add.at(acc, rows[keep] * width + cols[keep], weights[keep].astype(np.float32))
    return gaussian_blur(acc.reshape(height, width), sigma_px)


def mix(base: np.ndarray, color: np.ndarray | tuple[float, ...], alpha: np.ndarray) -> np.ndarray:
    """Blends ``color`` over ``base`` with coverage ``alpha`` **in place** and returns ``base``.

    ``base``: writable float32 ``[H, W, 3]``; ``color``: ``[3]`` or ``[H, W, 3]``; ``alpha``: ``[H, W]``. Only
    the bounding box of ``alpha > 0`` is touched, which makes small layers (iris, caruncle, lid margin) cheap.
    """
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return base
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    color = np.asarray(color, np.float32)
    if color.ndim == 3:
        color = color[box]
    region = base[box]
    region += (color - region) * np.asarray(alpha[box], np.float32)[..., None]
    return base
