"""Tests of anemia_jax.inference.tta: exact flip inversion, scale round trips, probability averaging, odd sizes, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anemia_jax.inference import tta


def _smooth_images(b=2, h=32, w=48):
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = [0.5 + 0.4 * np.sin(2 * np.pi * (xx + 0.3 * k)) * np.cos(np.pi * yy) for k in range(3)]
    img = np.stack(chans, -1)
    return jnp.asarray(np.stack([img * (0.8 + 0.2 * i) for i in range(b)]), jnp.float32)


# Jitted once per (predict_fn, transforms, multiple, shape): one compilation instead of op-by-op dispatch, and the way
# callers use it.
_tta_jit = jax.jit(tta.predict_with_tta, static_argnums=0, static_argnames=("transforms", "multiple"))


@functools.partial(jax.jit, static_argnames=("transform", "multiple"))
def _round_trip(x, *, transform, multiple):
    y = transform.apply(x, multiple=multiple)
    return y, transform.invert(y, size=x.shape[1:3])


def _ramp_fn(images):
    """Not flip-equivariant: red channel times a left-to-right ramp over the input's own grid."""
    w = images.shape[2]
    return images[..., :1] * jnp.linspace(0.0, 1.0, w)[None, None, :, None]


@pytest.mark.parametrize("flip", tta.FLIPS)
def test_flip_inverts_exactly(flip):
    x = jax.random.uniform(jax.random.key(0), (2, 7, 9, 3))
    t = tta.Transform(flip)
    y = t.apply(x, multiple=1)
    assert y.shape == x.shape
    np.testing.assert_array_equal(t.invert(y, size=(7, 9)), x)
    if flip != "none":
        assert not np.array_equal(y, x)


@pytest.mark.parametrize("flip, scale", [("none", 0.5), ("hv", 0.75), ("h", 1.25), ("v", 1.5)])
def test_scale_round_trip_on_smooth_images(flip, scale):
    x = _smooth_images()
    y, back = _round_trip(x, transform=tta.Transform(flip, scale), multiple=8)
    assert y.shape[1] % 8 == 0 and y.shape[2] % 8 == 0 and y.shape[1:3] != x.shape[1:3]
    assert back.shape == x.shape
    assert float(jnp.max(jnp.abs(back - x))) < 0.05


def test_scaled_size():
    assert tta.scaled_size(37, 1.0, 8) == 40
    assert tta.scaled_size(37, 0.75, 8) == 24  # 27.75 -> 3.47 multiples -> 3
    assert tta.scaled_size(5, 0.5, 8) == 8  # never below one multiple
    assert tta.scaled_size(64, 1.0, 16) == 64
    with pytest.raises(ValueError):
        tta.scaled_size(10, 0.0, 8)


def test_transform_list_and_validation():
    ts = tta.tta_transforms(flips=("none", "h"), scales=(0.75, 1.0))
    assert [(t.flip, t.scale) for t in ts] == [("none", 0.75), ("h", 0.75), ("none", 1.0), ("h", 1.0)]
    assert tta.tta_transforms() == (tta.Transform("none"), tta.Transform("h"))
    with pytest.raises(ValueError, match="flip"):
        tta.Transform("diagonal")


def test_equivariant_predict_fn_is_unchanged_by_flip_tta():
    x = _smooth_images()

    def identity_fn(images):
        return images[..., :2]

    plain = identity_fn(x)
    flips = tta.tta_transforms(flips=tta.FLIPS)
    np.testing.assert_allclose(_tta_jit(identity_fn, x, transforms=flips), plain, atol=1e-6)
    scaled = tta.tta_transforms(flips=("none", "h"), scales=(0.75, 1.0, 1.25))
    np.testing.assert_allclose(_tta_jit(identity_fn, x, transforms=scaled, multiple=8), plain, atol=0.03)


def test_non_equivariant_predict_fn_gives_the_average():
    x = _smooth_images()
    got = _tta_jit(_ramp_fn, x, transforms=tta.tta_transforms(flips=("none", "h")))
    ramp = jnp.linspace(0.0, 1.0, 48)
    expected = x[..., :1] * ((ramp + ramp[::-1]) / 2)[None, None, :, None]  # flip, predict, flip back
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, _ramp_fn(x), atol=1e-2)


def test_odd_sizes_with_scales():
    x = jax.random.uniform(jax.random.key(1), (2, 37, 53, 3))
    seen = []

    def fn(images):
        seen.append(images.shape)  # runs at trace time: one entry per transform
        return jax.nn.sigmoid(4.0 * (images[..., :2] - 0.5))

    transforms = tta.tta_transforms(flips=("h",), scales=(0.75, 1.0, 1.3))
    out = _tta_jit(fn, x, transforms=transforms, multiple=8)
    assert out.shape == (2, 37, 53, 2) and out.dtype == jnp.float32
    assert all(s[1] % 8 == 0 and s[2] % 8 == 0 for s in seen) and len(seen) == 3
    assert {s[1:3] for s in seen} == {(24, 40), (40, 56), (48, 72)}
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_jit_matches_eager():
    x = jax.random.uniform(jax.random.key(2), (2, 12, 8, 3))
    transforms = tta.tta_transforms(flips=tta.FLIPS)
    eager = tta.predict_with_tta(_ramp_fn, x, transforms=transforms, multiple=4)
    jitted = jax.jit(functools.partial(tta.predict_with_tta, _ramp_fn, transforms=transforms, multiple=4))
    np.testing.assert_allclose(jitted(x), eager, atol=1e-6)


def test_wrong_output_grid_is_reported():
    with pytest.raises(ValueError, match="predict_fn"):
        jax.eval_shape(functools.partial(tta.predict_with_tta, lambda im: im[:, ::2]), _smooth_images())
