"""On-device data augmentation for image segmentation, in pure JAX (jittable, usable inside `shard_map`).

`augment_batch(key, image_u8, masks_u8, config)` turns a per-device batch of uint8 images [B,H,W,3] and uint8
{0,1} masks [B,H,W,C] into float32 images in [0, 1] and float32 {0,1} masks. Every example gets its own key
(split from ``key``), so the caller passes one key per step and device (e.g. ``fold_in(step_key, device_index)``).

Per example, in this order:

1. Photometric changes, on the image only: brightness (additive), contrast (around the mean grey), saturation
   (around the pixel's grey), hue (rotation of the chroma plane in YIQ space), gamma, Gaussian blur (separable).
2. One geometric warp shared by image and masks: horizontal/vertical flip, rotation, scale and translation compose
   into a single affine map about the image centre, optionally plus an elastic displacement field (random offsets on
   a coarse grid, upsampled bicubically, so smooth). Pixels are resampled once (`bilinear_sample`, equal to
   `jax.scipy.ndimage.map_coordinates` with ``order=1``): bilinear for the image, bilinear then threshold
   (``mask_threshold``) for masks, which therefore stay binary. Whatever comes from outside the frame is
   ``fill_value`` in the image and 0 in the masks, so image and masks stay consistent.
3. Gaussian pixel noise on the image; the image is finally clipped to [0, 1].

Each change happens with its probability ``*_prob``; its magnitude is drawn uniformly up to ``max_*`` times the global
``strength`` multiplier (probabilities are not scaled). ``enabled=False`` or ``strength=0`` returns the inputs
converted with `normalization.to_float`. Changes whose probability or magnitude is zero are left out of the traced program.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anemia_jax.data.normalization import to_float

# RGB -> YIQ (NTSC): Y carries luminance, (I, Q) the chroma plane in which a rotation shifts the hue.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)
_GREY = _RGB_TO_YIQ[0]

# Every per-example random number is one entry of two uniform vectors (one draw each: cheap to trace and compile):
# ``apply[i] < prob`` decides whether change i happens, ``value[i]`` sets its magnitude.
_OPS = ("brightness", "contrast", "saturation", "hue", "gamma", "blur", "vflip", "hflip", "rotate", "scale",
        "translate_y", "translate_x", "elastic", "noise")
_OP = {name: i for i, name in enumerate(_OPS)}


def default_config() -> ml_collections.ConfigDict:
    """Augmentation settings; the trainer embeds them as ``config.augment``."""
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.strength = 1.0  # Multiplies every magnitude below.
    # Geometry (image and masks).
    c.hflip_prob = 0.5
    c.vflip_prob = 0.0  # Off: eye photos have a meaningful up/down.
    c.rotate_prob = 0.5
    c.max_rotate_deg = 15.0
    c.scale_prob = 0.5
    c.max_scale = 0.15  # Zoom factor in [1/(1+s), 1+s], log-uniform.
    c.translate_prob = 0.5
    c.max_translate = 0.08  # Fraction of the image height / width.
    c.elastic_prob = 0.0
    c.elastic_alpha = 0.02  # Std of the control-point offsets, as a fraction of min(H, W).
    c.elastic_grid = 5  # Control points per side of the coarse displacement grid.
    c.fill_value = 0.0  # Image value for pixels that come from outside the frame.
    c.mask_threshold = 0.5
    # Photometry (image only).
    c.brightness_prob = 0.5
    c.max_brightness = 0.1  # Additive, on [0, 1] intensities.
    c.contrast_prob = 0.5
    c.max_contrast = 0.2  # Factor in [1-c, 1+c].
    c.saturation_prob = 0.5
    c.max_saturation = 0.2
    c.hue_prob = 0.3
    c.max_hue = 0.02  # Fraction of a full turn; kept small since redness carries the anemia signal.
    c.gamma_prob = 0.3
    c.max_gamma = 0.2  # Exponent in [1/(1+g), 1+g], log-uniform.
    c.blur_prob = 0.2
    c.max_blur_sigma = 1.0  # Pixels at the training resolution.
    c.noise_prob = 0.2
    c.max_noise_std = 0.02
    return c


_PROBS = ("hflip_prob", "vflip_prob", "rotate_prob", "scale_prob", "translate_prob", "elastic_prob",
          "brightness_prob", "contrast_prob", "saturation_prob", "hue_prob", "gamma_prob", "blur_prob", "noise_prob")


def validate_config(config) -> ml_collections.ConfigDict:
    """Checks ``config`` against `default_config` and returns a complete copy (missing fields take defaults)."""
    full = default_config()
    unknown = sorted(set(config.keys()) - set(full.keys()))
    if unknown:
        raise ValueError(f"Unknown augmentation settings {unknown}; known ones: {sorted(full.keys())}.")
    full.update(dict(config.items()) if hasattr(config, "items") else config)
    for name in _PROBS:
        if not 0.0 <= full[name] <= 1.0:
            raise ValueError(f"augment.{name} is a probability and must lie in [0, 1], got {full[name]}.")
    for name in [k for k in full.keys() if k.startswith("max_")] + ["strength", "elastic_alpha"]:
        if full[name] < 0:
            raise ValueError(f"augment.{name} must be >= 0, got {full[name]}.")
    if full.elastic_grid < 2:
        raise ValueError(f"augment.elastic_grid must be >= 2 control points per side, got {full.elastic_grid}.")
    if not 0.0 < full.mask_threshold < 1.0:
        raise ValueError(f"augment.mask_threshold must lie in (0, 1), got {full.mask_threshold}.")
    return full


class _Draws:
    """The random numbers of one example: ``draw(op, prob, low, high, identity)`` and two normal-noise keys."""

    def __init__(self, key: jax.Array):
        k_apply, k_value, self.elastic_key, self.noise_key = jax.random.split(key, 4)
        self._apply = jax.random.uniform(k_apply, (len(_OPS),), jnp.float32)
        self._value = jax.random.uniform(k_value, (len(_OPS),), jnp.float32)

    def happens(self, op: str, prob: float) -> jax.Array:
        return self._apply[_OP[op]] < prob

    def value(self, op: str, low: float, high: float) -> jax.Array:
        return low + (high - low) * self._value[_OP[op]]

    def draw(self, op: str, prob: float, low: float, high: float, identity: float) -> jax.Array:
        """Uniform in [low, high) with probability ``prob``, else ``identity``."""
        return jnp.where(self.happens(op, prob), self.value(op, low, high), identity)


def _photometric(draws: _Draws, image: jax.Array, c) -> jax.Array:
    """Colour changes, gamma and blur of one float32 [H, W, 3] image in [0, 1]."""
    s = c.strength
    if c.brightness_prob and c.max_brightness:
        m = c.max_brightness * s
        image = image + draws.draw("brightness", c.brightness_prob, -m, m, 0.0)
    if c.contrast_prob and c.max_contrast:
        m = c.max_contrast * s
        factor = draws.draw("contrast", c.contrast_prob, max(0.0, 1 - m), 1 + m, 1.0)
        mean = jnp.mean(image @ _GREY)
        image = (image - mean) * factor + mean
    if c.saturation_prob and c.max_saturation:
        m = c.max_saturation * s
        factor = draws.draw("saturation", c.saturation_prob, max(0.0, 1 - m), 1 + m, 1.0)
        grey = (image @ _GREY)[..., None]
        image = grey + (image - grey) * factor
    if c.hue_prob and c.max_hue:
        m = 2 * math.pi * c.max_hue * s
        angle = draws.draw("hue", c.hue_prob, -m, m, 0.0)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        rotation = jnp.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        image = image @ (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).T
    image = jnp.clip(image, 0.0, 1.0)
    if c.gamma_prob and c.max_gamma:
        m = math.log1p(c.max_gamma * s)
        image = image ** jnp.exp(draws.draw("gamma", c.gamma_prob, -m, m, 0.0))
    if c.blur_prob and c.max_blur_sigma * s > 0:
        sigma = draws.draw("blur", c.blur_prob, 0.0, c.max_blur_sigma * s, 0.0)
        image = gaussian_blur(image, sigma, radius=max(1, math.ceil(3 * c.max_blur_sigma * s)))
    return image


def gaussian_blur(image: jax.Array, sigma: jax.Array, *, radius: int) -> jax.Array:
    """Separable Gaussian blur of [H, W, K] with a traced ``sigma`` (0: identity) and a static tap radius."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
    weights = weights / jnp.sum(weights)
    for axis in (0, 1):
        # Edge padding: borders keep their brightness instead of fading towards black.
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="edge")
        size = image.shape[axis]
        image = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i in range(2 * radius + 1))
    return image


def _source_coordinates(draws: _Draws, shape: tuple[int, int], c) -> jax.Array:
    """Source coordinates [2, H, W] (row, column) from which every output pixel is read."""
    h, w = shape
    s = c.strength
    flip = jnp.stack([jnp.where(draws.happens("vflip", c.vflip_prob), -1.0, 1.0),
                      jnp.where(draws.happens("hflip", c.hflip_prob), -1.0, 1.0)])
    m = math.radians(min(c.max_rotate_deg * s, 180.0))
    angle = draws.draw("rotate", c.rotate_prob, -m, m, 0.0)
    m = math.log1p(c.max_scale * s)
    scale = jnp.exp(draws.draw("scale", c.scale_prob, -m, m, 0.0))
    m = c.max_translate * s
    # One probability for the translation (decided by the "translate_y" draw), two independent magnitudes.
    shift = jnp.where(draws.happens("translate_y", c.translate_prob),
                      jnp.stack([draws.value("translate_y", -m, m) * h, draws.value("translate_x", -m, m) * w]), 0.0)

    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)[:, None, None]
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                                  indexing="ij"))
    # Forward map: out = centre + shift + scale * R(angle) @ flip @ (in - centre); invert it on the output grid.
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    inverse_rotation = jnp.array([[cos, sin], [-sin, cos]]) / scale
    u = jnp.einsum("ij,jhw->ihw", inverse_rotation, grid - centre - shift[:, None, None])
    u = u * flip[:, None, None] + centre
    if c.elastic_prob and c.elastic_alpha * s > 0:
        g = c.elastic_grid
        amplitude = jnp.where(draws.happens("elastic", c.elastic_prob), c.elastic_alpha * s * min(h, w), 0.0)
        coarse = amplitude * jax.random.normal(draws.elastic_key, (2, g, g), jnp.float32)
        u = u + jax.image.resize(coarse, (2, h, w), method="cubic")
    return u


def bilinear_sample(stack: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinear resampling of [H, W, K] at ``coords`` [2, H', W'] (row, column) -> [H', W', K]; 0 outside.

    The same values as ``jax.scipy.ndimage.map_coordinates(channel, coords, order=1, mode='constant', cval=0)``
    applied per channel, but every channel comes from one gather of K-vectors per corner.
    """
    h, w, k = stack.shape
    flat = stack.reshape(h * w, k)
    y0, x0 = jnp.floor(coords[0]), jnp.floor(coords[1])
    fy, fx = coords[0] - y0, coords[1] - x0
    out = jnp.zeros(coords.shape[1:] + (k,), stack.dtype)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = y0 + dy, x0 + dx
        weight = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
        inside = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
        index = jnp.clip(y, 0, h - 1).astype(jnp.int32) * w + jnp.clip(x, 0, w - 1).astype(jnp.int32)
        out = out + jnp.where(inside, weight, 0.0)[..., None] * flat[index]
    return out


def _has_geometry(c) -> bool:
    s = c.strength
    return bool(c.hflip_prob or c.vflip_prob or (c.rotate_prob and c.max_rotate_deg * s)
                or (c.scale_prob and c.max_scale * s) or (c.translate_prob and c.max_translate * s)
                or (c.elastic_prob and c.elastic_alpha * s))


def augment_example(key: jax.Array, image: jax.Array, masks: jax.Array, config) -> tuple[jax.Array, jax.Array]:
    """Augments one example: float32 image [H, W, 3] in [0, 1] and float32 {0,1} masks [H, W, C].

    ``config`` must be complete (see `validate_config`); `augment_batch` is the public entry point.
    """
    draws = _Draws(key)
    image = _photometric(draws, image, config)
    if _has_geometry(config):
        coords = _source_coordinates(draws, image.shape[:2], config)
        # Warping image - fill makes the outside of the frame come out as fill_value after adding it back.
        warped = bilinear_sample(jnp.concatenate([image - config.fill_value, masks], axis=-1), coords)
        image = warped[..., :3] + config.fill_value
        masks = (warped[..., 3:] >= config.mask_threshold).astype(jnp.float32)
    if config.noise_prob and config.max_noise_std * config.strength:
        std = draws.draw("noise", config.noise_prob, 0.0, config.max_noise_std * config.strength, 0.0)
        image = image + std * jax.random.normal(draws.noise_key, image.shape, jnp.float32)
    return jnp.clip(image, 0.0, 1.0), masks


def augment_batch(key: jax.Array, image_u8: jax.Array, masks_u8: jax.Array, config=None
                  ) -> tuple[jax.Array, jax.Array]:
    """Augments a batch; pure, jittable, and meant to run per device inside the jitted step.

    Args:
      key: one PRNG key for this batch (fold the step and device index in beforehand); example i uses
        ``split(key, B)[i]``, so the result is a function of (key, inputs, config) only.
      image_u8: uint8 [B, H, W, 3].
      masks_u8: uint8 [B, H, W, C] with values in {0, 1} (C may be 0).
      config: `default_config()`-like settings (static Python values); None means the defaults.

    Returns:
      ``(image, masks)``: float32 [B, H, W, 3] in [0, 1] and float32 [B, H, W, C] in {0, 1}, geometrically aligned.
    """
    config = validate_config(default_config() if config is None else config)
    image = to_float(image_u8)
    masks = masks_u8.astype(jnp.float32)
    if image.ndim != 4 or image.shape[-1] != 3 or masks.shape[:3] != image.shape[:3]:
        raise ValueError(f"Expected image [B,H,W,3] and masks [B,H,W,C] of the same B, H, W; got {image_u8.shape} "
                         f"and {masks_u8.shape}.")
    if not config.enabled or config.strength == 0:
        return image, masks
    keys = jax.random.split(key, image.shape[0])
    return jax.vmap(lambda k, x, m: augment_example(k, x, m, config))(keys, image, masks)
