"""How stored images become model inputs: uint8 RGB -> float in [0, 1] -> per-channel standardised.

Training (after augmentation), evaluation, prediction and exported models all go through these two functions, so a
model always sees inputs of the same scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "normalize", "to_float"]

# ImageNet per-channel statistics of [0, 1] RGB: the conventional choice (and what ImageNet-pretrained encoders
# expect); any fixed affine map is equivalent for models trained from scratch.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def to_float(image_u8: jax.Array) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 in [0, 1]."""
    return jnp.asarray(image_u8).astype(jnp.float32) / 255.0


def normalize(images_01: jax.Array) -> jax.Array:
    """Per-channel standardisation of RGB images in [0, 1]: ``(x - IMAGE_MEAN) / IMAGE_STD``.

    Args:
        images_01: float [..., 3] RGB in [0, 1] (any leading shape).

    Returns:
        float32 array of the same shape.
    """
    x = jnp.asarray(images_01, jnp.float32)
    return (x - jnp.asarray(IMAGE_MEAN, jnp.float32)) / jnp.asarray(IMAGE_STD, jnp.float32)
