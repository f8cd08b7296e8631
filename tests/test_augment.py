"""Tests of anemia_jax.data.augment: alignment of image and masks, determinism, ranges, jit and shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from anemia_jax.data import augment
from anemia_jax.data.normalization import to_float

B, H, W = 8, 32, 32
_PHOTOMETRIC = dict(brightness_prob=0.0, contrast_prob=0.0, saturation_prob=0.0, hue_prob=0.0, gamma_prob=0.0,
                    blur_prob=0.0, noise_prob=0.0)
_GEOMETRIC = dict(hflip_prob=0.0, vflip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0,
                  elastic_prob=0.0)


def _config(**overrides):
    c = augment.default_config()
    c.update(overrides)
    return c


def _red_shapes(seed=0):
    """Red ellipses on a blue background; the mask is exactly 'red channel > 0.5'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    masks = np.zeros((B, H, W, 1), np.uint8)
    for i in range(B):
        cy, cx = rng.uniform(10, 22, 2)
        ry, rx = rng.uniform(4, 9, 2)
        masks[i, ..., 0] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    images = np.where(masks.astype(bool), np.array([255, 0, 0], np.uint8), np.array([0, 0, 255], np.uint8))
    return jnp.asarray(images.astype(np.uint8)), jnp.asarray(masks)


def _iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / max((a | b).sum(), 1)


def test_geometric_transform_keeps_masks_aligned():
    images, masks = _red_shapes()
    config = _config(**_PHOTOMETRIC, vflip_prob=0.5, rotate_prob=1.0, max_rotate_deg=30.0, scale_prob=1.0,
                     translate_prob=1.0, elastic_prob=1.0, elastic_alpha=0.03)
    out_image, out_masks = jax.jit(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(0), images, masks)
    out_image, out_masks = np.asarray(out_image), np.asarray(out_masks)
    assert set(np.unique(out_masks)) <= {0.0, 1.0}
    changed = 0
    for i in range(B):
        recomputed = out_image[i, ..., 0] > 0.5
        assert _iou(recomputed, out_masks[i, ..., 0]) > 0.95, i
        changed += _iou(out_masks[i, ..., 0], masks[i, ..., 0]) < 0.9
    assert changed >= B // 2, "the geometric transform hardly moved anything"


def test_horizontal_flip_is_exact():
    images, masks = _red_shapes(seed=1)
    config = _config(**_PHOTOMETRIC, **dict(_GEOMETRIC, hflip_prob=1.0))
    out_image, out_masks = jax.jit(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(3), images, masks)
    np.testing.assert_allclose(out_image, to_float(images)[:, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(out_masks, np.asarray(masks, np.float32)[:, :, ::-1])


def test_photometric_changes_leave_masks_untouched():
    images, masks = _red_shapes(seed=2)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, images.shape, np.uint8))
    config = _config(**_GEOMETRIC, brightness_prob=1.0, contrast_prob=1.0, saturation_prob=1.0, hue_prob=1.0,
                     gamma_prob=1.0, blur_prob=1.0, noise_prob=1.0)
    out_image, out_masks = jax.jit(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(1), images, masks)
    np.testing.assert_array_equal(out_masks, np.asarray(masks, np.float32))
    assert out_image.dtype == jnp.float32 and 0.0 <= out_image.min() and out_image.max() <= 1.0
    assert np.abs(np.asarray(out_image) - np.asarray(to_float(images))).mean() > 0.01


def test_full_augmentation_in_shard_map_deterministic_and_in_range():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    config = _config(vflip_prob=0.5, elastic_prob=0.5)

    def per_device(key, image, masks):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        return augment.augment_batch(key, image, masks, config)

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=P("data")))
    images, masks = _red_shapes(seed=3)
    masks = jnp.concatenate([masks, 1 - masks], axis=-1)
    a_image, a_masks = step(jax.random.key(7), images, masks)
    b_image, b_masks = step(jax.random.key(7), images, masks)
    c_image, _ = step(jax.random.key(8), images, masks)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_masks, b_masks)
    assert not np.array_equal(a_image, c_image)
    assert a_image.shape == (B, H, W, 3) and a_masks.shape == (B, H, W, 2) and a_image.dtype == jnp.float32
    assert 0.0 <= a_image.min() and a_image.max() <= 1.0
    assert set(np.unique(np.asarray(a_masks))) <= {0.0, 1.0}
    # Both masks went through the same warp: they never overlap.
    assert not (np.asarray(a_masks)[..., 0] * np.asarray(a_masks)[..., 1]).any()


def test_bilinear_sample_matches_map_coordinates():
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.random((7, 9, 2), np.float32))
    coords = jnp.asarray(rng.uniform(-2, 10, (2, 5, 6)).astype(np.float32))
    got = jax.jit(augment.bilinear_sample)(stack, coords)
    reference = jax.jit(jax.vmap(lambda x: jax.scipy.ndimage.map_coordinates(
        x, [coords[0], coords[1]], order=1, mode="constant"), in_axes=2, out_axes=2))
    np.testing.assert_allclose(got, reference(stack), atol=1e-6)


def test_disabled_and_config_errors():
    images, masks = _red_shapes()
    out_image, out_masks = augment.augment_batch(jax.random.key(0), images, masks, _config(enabled=False))
    np.testing.assert_array_equal(out_image, to_float(images))
    np.testing.assert_array_equal(out_masks, np.asarray(masks, np.float32))
    with pytest.raises(ValueError, match="Unknown augmentation settings"):
        augment.validate_config({"hflip_probability": 0.5})
    with pytest.raises(ValueError, match="probability"):
        augment.validate_config({"rotate_prob": 1.5})
    with pytest.raises(ValueError, match="same B, H, W"):
        augment.augment_batch(jax.random.key(0), images, masks[:, :16], None)
