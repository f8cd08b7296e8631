"""Tests of anemia_jax.losses against the independent NumPy reference in _loss_reference.py, plus gradients
(finite differences in float64), monotonicity, conventions (empty masks, excluded examples), dtypes and transforms.

CPU time here is mostly XLA compilation, so each test compiles one jitted function per case and packs its
variants (weights, soft labels, empty masks) into the batch axis: the losses are per example, so that is exact.
"""

import functools

import _loss_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anemia_jax import losses

# (registry name, hyper-parameters): defaults plus non-default values, so that every hyper-parameter reaches the math.
DEFAULT_CASES = [(name, {}) for name in ref.REFERENCE]
CASES = DEFAULT_CASES + [
    ("sigmoid_cross_entropy", {"pos_weight": 2.5}),
    ("focal", {"gamma": 1.5, "alpha": None}),
    ("dice", {"smooth": 0.0}),
    ("jaccard", {"smooth": 0.0}),
    ("tversky", {"alpha": 0.2, "beta": 0.8, "smooth": 0.5}),
    ("focal_tversky", {"gamma": 2.0, "smooth": 0.0}),
    ("combo", {"ce_weight": 0.3, "dice_weight": 1.2, "pos_weight": 2.0}),
]
# Cases whose guards (safe division, the focal-Tversky power) differ from the defaults.
GUARD_CASES = DEFAULT_CASES + [case for case in CASES if case[1].get("smooth") == 0.0]


def _ids(cases):
    return [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in cases]


def _labels(rng, name, shape, *, soft=False):
    if name == "softmax_cross_entropy":
        onehot = np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]
        onehot[0, 0, :] = 0.0  # an unlabelled row of pixels: ignored by the class-weighted normaliser
        return onehot
    y = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.4).astype(np.float64)
    y[0, ..., 0] = 0.0  # an empty mask
    return y


def _weights(rng, kind, shape):
    """Weights of one kind, materialised to `shape` (broadcast shapes are tested in test_weight_broadcasting)."""
    b, c = shape[0], shape[-1]
    if kind == "none":
        w = np.ones((b, 1, 1, 1))
    elif kind == "pixels":  # excluded pixels and non-binary values, shared by the channels
        w = rng.uniform(0.2, 2.0, size=shape[:-1] + (1,)) * (rng.uniform(size=shape[:-1] + (1,)) > 0.3)
    elif kind == "masks":  # one missing mask, and one fully excluded example
        w = np.ones((b, 1, 1, c))
        w[0, ..., -1] = 0.0
        w[-1] = 0.0
    else:
        w = rng.uniform(0.0, 1.5, size=shape) * (rng.uniform(size=shape) > 0.2)
    return np.broadcast_to(w, shape)


@functools.cache
def _jitted(name, kwargs_items):
    """jit(value_and_grad) of one loss: (logits, labels, weights) -> ([B] losses, d sum(losses) / d logits)."""
    fn = losses.get_loss(name, **dict(kwargs_items))

    def value_and_grad(x, y, w):
        values, vjp = jax.vjp(lambda z: fn(z, y, weights=w), x)
        return values, vjp(jnp.ones_like(values))[0]

    return jax.jit(value_and_grad)


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# Softmax needs two classes: its second shape keeps C = 2.
REFERENCE_PARAMS = [(name, kw, shape) for name, kw in CASES
                    for shape in [(2, 6, 8, 3), (3, 5, 7, 2 if name == "softmax_cross_entropy" else 1)]]


@pytest.mark.parametrize("name,kwargs,shape", REFERENCE_PARAMS,
                         ids=[f"{i}-{s}" for i in _ids(CASES) for s in ("C3", "C1")])
def test_matches_numpy_reference(name, kwargs, shape):
    rng = np.random.default_rng(0)
    variants = [(soft, kind) for soft in (False, True) for kind in ("none", "pixels", "masks", "full")
                if not (soft and name == "lovasz_hinge")]  # Lovasz is defined for binary labels
    xs = [rng.normal(0.0, 2.5, size=shape) for _ in variants]
    ys = [_labels(rng, name, shape, soft=soft) for soft, _ in variants]
    ws = [_weights(rng, kind, shape) for _, kind in variants]
    got, _ = _jitted(name, tuple(kwargs.items()))(*_f32(*map(np.concatenate, (xs, ys, ws))))
    assert got.dtype == jnp.float32 and got.shape == (len(variants) * shape[0],)
    for i, (soft, kind) in enumerate(variants):
        expected = ref.REFERENCE[name](xs[i], ys[i], ws[i], **kwargs)
        np.testing.assert_allclose(got[i * shape[0]:(i + 1) * shape[0]], expected, rtol=2e-5, atol=2e-6,
                                   err_msg=f"{soft=} weights={kind}")


@pytest.mark.parametrize("name", ref.REFERENCE)
def test_weight_broadcasting(name):
    """[B,1,1,C] per-mask and [B,H,W,1] per-pixel weights mean the same as their materialised [B,H,W,C] form."""
    rng = np.random.default_rng(9)
    shape = (2, 5, 6, 2)
    x, y = rng.normal(0, 2, shape), _labels(rng, name, shape)
    w_mask, w_pix = np.array([[1.0, 0.0], [0.5, 2.0]])[:, None, None, :], rng.uniform(size=shape[:-1] + (1,))
    fn = jax.jit(losses.get_loss(name))
    for w in (w_mask, w_pix):
        np.testing.assert_allclose(fn(*_f32(x, y), weights=w), ref.REFERENCE[name](x, y, np.broadcast_to(w, shape)),
                                   rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(fn(*_f32(x, y)), ref.REFERENCE[name](x, y), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,kwargs", GUARD_CASES, ids=_ids(GUARD_CASES))
def test_gradient_matches_central_differences_float64(name, kwargs):
    rng = np.random.default_rng(1)
    shape = (2, 4, 5, 2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(0.0, 2.0, size=shape))
        y = jnp.asarray(_labels(rng, name, shape, soft=name != "lovasz_hinge"))
        w = jnp.asarray(_weights(rng, "pixels", shape))
        c = jnp.asarray(rng.normal(size=shape[0]))
        fn = losses.get_loss(name, **kwargs)
        f = jax.jit(lambda z: jnp.sum(c * fn(z, y, weights=w)))
        assert jax.eval_shape(f, x).dtype == jnp.float64  # so the differences below are meaningful
        g, h = jax.jit(jax.grad(f))(x), 1e-6
        for _ in range(3):
            v = jnp.asarray(rng.normal(size=shape))
            numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
            np.testing.assert_allclose(jnp.vdot(g, v), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,kwargs", CASES, ids=_ids(CASES))
def test_decreases_as_logits_move_towards_labels(name, kwargs):
    rng = np.random.default_rng(2)
    shape = (4, 6, 6, 2)
    y = _labels(rng, name, shape)
    x0, target = rng.normal(0.0, 1.0, size=shape), 8.0 * (2.0 * y - 1.0)
    # Ends at hard logits: with smooth=0 a soft prediction on an empty mask keeps Dice loss 1 until p == 0 exactly.
    path = [(1 - t) * x0 + t * target for t in np.linspace(0.0, 1.0, 5)] + [1e4 * (2.0 * y - 1.0)]
    values = np.stack([_jitted(name, tuple(kwargs.items()))(*_f32(x, y, np.ones(shape)))[0] for x in path])
    assert np.all(np.diff(values, axis=0) <= 1e-6), values
    if kwargs.get("smooth", 1.0) > 0:
        assert np.all(values[-2] < 0.7 * values[0]), values
    assert np.all(values[-1] < 0.05 * values[0]), values


@pytest.mark.parametrize("name,kwargs", CASES, ids=_ids(CASES))
def test_conventions_excluded_examples_empty_masks_large_logits(name, kwargs):
    """One batch: [0] empty prediction (p == 0 exactly) on an empty label, [1] all weights 0, [2] a plain example,
    [3] |logits| ~ 1e4 against random labels."""
    rng = np.random.default_rng(3)
    shape = (4, 6, 6, 2)
    x, y = rng.normal(0, 3, shape), _labels(rng, name, shape)
    x[0], x[3] = -1e4, 1e4 * rng.choice([-1.0, 1.0], size=shape[1:]) * rng.uniform(0.5, 1.0, size=shape[1:])
    if name != "softmax_cross_entropy":
        y[0] = 0.0
    w = np.ones(shape)
    w[1] = 0.0
    values, grad = _jitted(name, tuple(kwargs.items()))(*_f32(x, y, w))
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(values))
    assert values[1] == 0.0 and np.all(grad[1] == 0.0)
    if name != "softmax_cross_entropy":  # softmax has no "empty" prediction
        assert values[0] == 0.0, "empty prediction on an empty label must be exactly perfect"
    np.testing.assert_allclose(values[2], ref.REFERENCE[name](x[2:3], y[2:3], **kwargs)[0], rtol=2e-5)
    assert values[3] > 0.1  # mostly wrong with huge margins, still finite


def test_large_logit_cross_entropy_value():
    x = jnp.array([1e4, -1e4, 3e4, -3e4], jnp.float32).reshape(1, 2, 2, 1)
    y = jnp.array([0.0, 1.0, 1.0, 0.0]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(losses.sigmoid_cross_entropy(x, y), [5e3])  # (1e4 + 1e4 + 0 + 0) / 4


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky", "focal_tversky"])
def test_region_losses_on_hard_masks(name):
    y = np.zeros((4, 4, 4, 1))
    y[:, :2] = 1.0
    y[3] = 0.0
    hard = 1e4 * (2 * y - 1)
    # perfect, inverted, empty prediction on a non-empty label, full prediction on an empty label.
    x = np.stack([hard[0], -hard[1], np.full_like(hard[2], -1e4), np.full_like(hard[3], 1e4)])
    values, _ = _jitted(name, (("smooth", 0.0),))(*_f32(x, y, np.ones_like(y)))
    np.testing.assert_array_equal(values, [0.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("name,kwargs", DEFAULT_CASES, ids=_ids(DEFAULT_CASES))
def test_bfloat16_logits_give_float32(name, kwargs):
    rng = np.random.default_rng(5)
    shape = (2, 8, 8, 2)
    x, y = rng.normal(0, 2, shape), _labels(rng, name, shape)
    x16 = jnp.asarray(x, jnp.bfloat16)
    w16 = jnp.ones((2, 1, 1, 2), jnp.bfloat16)
    got = jax.jit(losses.get_loss(name))(x16, jnp.asarray(y, jnp.bfloat16), weights=w16)
    assert got.dtype == jnp.float32
    # float32 maths on the rounded inputs (exact up to float32), close to the unrounded inputs.
    np.testing.assert_allclose(got, ref.REFERENCE[name](np.asarray(x16, np.float64), y), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got, ref.REFERENCE[name](x, y), rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("name,kwargs", DEFAULT_CASES, ids=_ids(DEFAULT_CASES))
def test_vmap_under_jit(name, kwargs):
    rng = np.random.default_rng(6)
    shape = (2, 6, 6, 2)
    x = rng.normal(0, 2, (3,) + shape)
    y = np.stack([_labels(rng, name, shape) for _ in range(3)])
    w = np.stack([_weights(rng, "pixels", shape) for _ in range(3)])
    fn = losses.get_loss(name)
    batched = jax.jit(jax.vmap(lambda a, b, c: fn(a, b, weights=c)))(*_f32(x, y, w))
    np.testing.assert_allclose(batched, [ref.REFERENCE[name](x[i], y[i], w[i]) for i in range(3)], rtol=2e-5,
                               atol=2e-6)


def test_special_cases_coincide():
    rng = np.random.default_rng(7)
    x, y = _f32(rng.normal(0, 2, (2, 8, 8, 2)), rng.uniform(size=(2, 8, 8, 2)) < 0.5)

    @jax.jit
    def pairs(x, y):
        return [
            (losses.tversky_loss(x, y, alpha=0.5, beta=0.5, smooth=0.5), losses.dice_loss(x, y, smooth=1.0)),
            (losses.tversky_loss(x, y, alpha=1.0, beta=1.0), losses.jaccard_loss(x, y)),
            (losses.focal_tversky_loss(x, y, gamma=1.0), losses.tversky_loss(x, y)),
            (losses.focal_loss(x, y, gamma=0.0, alpha=None), losses.sigmoid_cross_entropy(x, y)),
            (losses.combo_loss(x, y, ce_weight=1.0, dice_weight=0.0), losses.sigmoid_cross_entropy(x, y)),
        ]

    for a, b in pairs(x, y):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_get_loss_registry_and_errors():
    assert set(losses.loss_names()) == {"sigmoid_cross_entropy", "softmax_cross_entropy", "dice", "jaccard",
                                        "tversky", "focal", "focal_tversky", "lovasz_hinge", "combo"}
    with pytest.raises(ValueError, match="Valid loss names: sigmoid_cross_entropy.*combo"):
        losses.get_loss("dcie")
    with pytest.raises(TypeError, match="'smoth'.*valid: smooth"):
        losses.get_loss("dice", smoth=1.0)
    with pytest.raises(TypeError, match="'weights'"):
        losses.get_loss("dice", weights=1.0)  # weights are per call, not a hyper-parameter
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        losses.get_loss("focal", gamma=-1.0)(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))


def test_input_validation_messages():
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="must equal logits shape"):
        losses.dice_loss(x, jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"mask_weights\[:, None, None, :\]"):
        losses.sigmoid_cross_entropy(x, x, weights=jnp.ones((2, 3)))  # [B, C] must be reshaped, not guessed
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.lovasz_hinge_loss(x, x, weights=jnp.ones((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="C >= 2"):
        losses.softmax_cross_entropy(x[..., :1], x[..., :1])
    with pytest.raises(ValueError, match="alpha must be in"):
        losses.focal_loss(x, x, alpha=1.5)


def test_deep_supervision_loss():
    rng = np.random.default_rng(8)
    shape = (2, 6, 6, 1)
    outs = [rng.normal(0, 2, shape) for _ in range(4)]
    y = (rng.uniform(size=shape) < 0.5).astype(np.float64)
    pw = _weights(rng, "pixels", shape)[..., :1]
    each = [ref.dice_loss(o, y, np.broadcast_to(pw, shape)) for o in outs]
    given, mean = jax.jit(lambda o, y, pw: (
        losses.deep_supervision_loss(losses.dice_loss, o, y, [0.1, 0.2, 0.3, 0.4], pixel_weights=pw),
        losses.deep_supervision_loss(losses.dice_loss, o, y, pixel_weights=pw)))(_f32(*outs), *_f32(y, pw))
    np.testing.assert_allclose(given, sum(a * l for a, l in zip([0.1, 0.2, 0.3, 0.4], each)), rtol=2e-5)
    np.testing.assert_allclose(mean, np.mean(each, axis=0), rtol=2e-5)
    combo = losses.get_loss("combo")
    grads = jax.jit(jax.grad(lambda o: jnp.sum(losses.deep_supervision_loss(combo, o, jnp.asarray(y)))))(_f32(*outs))
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)
    with pytest.raises(ValueError, match=r"shape \(4,\).*pixel_weights"):
        losses.deep_supervision_loss(losses.dice_loss, outs, y, pw)  # pixel weights in the per-output slot
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        losses.deep_supervision_loss(losses.dice_loss, outs, y, [1.0, 1.0])
    with pytest.raises(ValueError, match="resizes nothing"):
        losses.deep_supervision_loss(losses.dice_loss, outs[:3] + [outs[3][:, ::2, ::2]], y)
    with pytest.raises(ValueError, match="non-empty"):
        losses.deep_supervision_loss(losses.dice_loss, [], y)
