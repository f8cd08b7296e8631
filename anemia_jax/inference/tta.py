"""Test-time augmentation (TTA) for segmentation: flips and rescales, inverted and averaged (pure JAX, jit-able).

Each `Transform` maps a batch of images to a transformed batch the model can take (`apply`) and maps the model's
per-pixel output back onto the original pixel grid (`invert`):

* flips: ``'none'``, ``'h'`` (left-right, axis W), ``'v'`` (up-down, axis H), ``'hv'`` (both). A flip is its own
  inverse, so flips are exact.
* scale ``s``: the image is resized (bilinear, antialiased when shrinking) to ``H' = multiple * round(H s /
  multiple)`` (at least ``multiple``; likewise W'), ``multiple`` being the size divisor the model needs (2**depth for
  a U-Net); the prediction is resized back to H x W bilinearly. The same snapping applies at scale 1 when H or W is
  not a multiple, so `predict_with_tta` serves photos of any size. Bilinear weights are non-negative and sum to one,
  so probabilities stay in [0, 1].

`predict_with_tta` averages PROBABILITIES (the arithmetic mean of the per-transform predictive distributions, the usual
segmentation TTA) rather than logits: it composes with the inference functions of `anemia_jax.inference.probabilities`,
which return sigmoid probabilities, and a confident view is not outvoted by the logit magnitude of another.

Default flips are ``('none', 'h')``: a left and a right eye are near mirror images, so the horizontal flip stays in
the training distribution (`augment.default_config` trains with ``hflip_prob = 0.5``), whereas an upside-down eye
(lower lid on top) is never seen in training (``vflip_prob = 0``); add ``'v'``/``'hv'`` only for models trained with
vertical flips.

Usage (`anemia_jax.inference.probabilities.probability_fn` does this when given ``transforms``)::

    def predict(images_01):
        return jax.nn.sigmoid(model.apply(variables, normalize(images_01), train=False).logits)

    probs = tta.predict_with_tta(predict, images_01, transforms=tta.tta_transforms(scales=(0.75, 1.0, 1.25)),
                                 multiple=16)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_FLIPS", "FLIPS", "Transform", "predict_with_tta", "scaled_size", "tta_transforms"]

FLIPS = ("none", "h", "v", "hv")
DEFAULT_FLIPS = ("none", "h")


def scaled_size(size: int, scale: float, multiple: int) -> int:
    """``size * scale`` rounded (half up) to the nearest positive multiple of ``multiple``."""
    if multiple < 1 or size < 1 or scale <= 0:
        raise ValueError(f"need size >= 1, scale > 0 and multiple >= 1; got {size}, {scale}, {multiple}.")
    return max(multiple, multiple * math.floor(size * scale / multiple + 0.5))


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method="linear", antialias=True)


def _flip(x: jax.Array, flip: str) -> jax.Array:
    axes = {"none": (), "h": (2,), "v": (1,), "hv": (1, 2)}[flip]
    return jnp.flip(x, axis=axes) if axes else x


@dataclasses.dataclass(frozen=True)
class Transform:
    """One TTA view: a flip (one of `FLIPS`) and a scale factor. Hashable, so it can be a static jit argument."""

    flip: str = "none"
    scale: float = 1.0

    def __post_init__(self):
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {FLIPS}; got {self.flip!r}.")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0; got {self.scale}.")

    @property
    def name(self) -> str:
        return f"flip={self.flip},scale={self.scale:g}"

    def apply(self, images: jax.Array, *, multiple: int = 1) -> jax.Array:
        """[B, H, W, C] -> [B, H', W', C] with H', W' = `scaled_size` (H, W, scale, multiple), flipped."""
        _, h, w, _ = images.shape
        return _flip(_resize(images, scaled_size(h, self.scale, multiple), scaled_size(w, self.scale, multiple)),
                     self.flip)

    def invert(self, outputs: jax.Array, *, size: tuple[int, int]) -> jax.Array:
        """Per-pixel outputs [B, H', W', C] of a transformed batch -> [B, H, W, C] on the original ``size`` (H, W)."""
        return _resize(_flip(outputs, self.flip), *size)


def tta_transforms(flips: Sequence[str] = DEFAULT_FLIPS, scales: Sequence[float] = (1.0,)) -> tuple[Transform, ...]:
    """Every (scale, flip) combination, scales outermost: ``len(flips) * len(scales)`` transforms."""
    if not flips or not scales:
        raise ValueError("tta_transforms needs at least one flip and one scale (use flips=('none',), scales=(1.0,) "
                         "for plain prediction).")
    return tuple(Transform(flip, float(scale)) for scale, flip in itertools.product(scales, flips))


def predict_with_tta(predict_fn: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                     transforms: Sequence[Transform] | None = None, multiple: int = 1) -> jax.Array:
    """Mean over ``transforms`` of the back-transformed probabilities of ``predict_fn``.

    Args:
        predict_fn: ``images [B, h, w, 3] float in [0, 1] -> probabilities [B, h, w, C]``; it is called once per
            transform, with h, w multiples of ``multiple``.
        images: float [B, H, W, 3] in [0, 1] (any H, W).
        transforms: views to average (default `tta_transforms()`: identity and horizontal flip at scale 1).
        multiple: the size divisor the model needs; every view is snapped to it.

    Returns:
        float32 [B, H, W, C], the average probability per pixel and channel.
    """
    transforms = tta_transforms() if transforms is None else tuple(transforms)
    if not transforms:
        raise ValueError("transforms is empty; pass at least one Transform.")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, 3]; got shape {images.shape}.")
    size = images.shape[1:3]
    total = None
    for t in transforms:
        view = t.apply(images, multiple=multiple)
        probs = predict_fn(view)
        if probs.ndim != 4 or probs.shape[:3] != view.shape[:3]:
            raise ValueError(f"predict_fn must return [B, H, W, C] on the input's grid {view.shape[:3]}; got "
                             f"{probs.shape} for transform {t.name}.")
        back = t.invert(probs.astype(jnp.float32), size=size)
        total = back if total is None else total + back
    return total / len(transforms)
