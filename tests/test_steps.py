"""Tests of the data-parallel steps (anemia_jax.training.steps) and mesh helpers (anemia_jax.utils.parallel).

Eight fake CPU devices (tests/conftest.py). A tiny U-Net (features 4, depth 2, BatchNorm) on
16x16 images keeps compilation short; one module-scoped fixture compiles the 8-device and the
1-device train steps once and the tests share their results. Augmentation and dropout are off
in the equivalence tests: their per-device keys (fold_in of axis_index) depend on the device
count by design, see the module docstring of anemia_jax.training.steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from anemia_jax import losses, metrics
from anemia_jax.data import augment, input_pipeline
from anemia_jax.data.normalization import normalize
from anemia_jax.evaluation import evaluator
from anemia_jax.inference import probabilities
from anemia_jax.models.unet import UNet
from anemia_jax.models.unetpp import UNetPlusPlus
from anemia_jax.training import steps
from anemia_jax.utils import parallel

SIZE, GLOBAL_BATCH, TARGETS = 16, 8, 2


def make_batch(seed: int, batch: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
    """Synthetic host batch following the input-pipeline contract (with a padded row and a missing mask)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    # Masks correlated with the image, so a step has something to learn.
    masks = np.stack([image[..., 0] > 128, image[..., 1] > 100], axis=-1).astype(np.uint8)
    mask_weights = np.ones((batch, TARGETS), np.float32)
    mask_weights[1, 1] = 0.0  # missing second mask
    valid = np.ones(batch, bool)
    valid[-1] = False  # padding row
    return {"image": image, "masks": masks, "mask_weights": mask_weights, "valid": valid,
            "index": np.arange(batch, dtype=np.int32) + 100 * seed}


def loss_fn(outputs, labels, weights):
    return losses.combo_loss(outputs.logits, labels, weights=weights)


def global_mean_loss(per_example, batch):
    """The quantity the step must differentiate: mean over examples that contribute."""
    w = batch["mask_weights"] * batch["valid"][:, None]
    contributes = jnp.any(w > 0, axis=-1)
    return jnp.sum(jnp.where(contributes, per_example, 0.0)) / jnp.sum(contributes)


# SGD with lr 1 and momentum: the first update is exactly -grad, and the momentum trace
# (optimizer state) equals the gradient, so both are checked against a reference.
TX = optax.sgd(1.0, momentum=0.9)
MODEL = UNet(num_classes=TARGETS, features=4, depth=2, bn_axis_name=parallel.DATA_AXIS)


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def host_state(model, tx, seed: int) -> steps.TrainState:
    """A host TrainState with random parameters, built without compiling the model's init."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes["params"])
    batch_stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes.get("batch_stats", {}))
    return steps.TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                            opt_state=tx.init(params), rng=np.array([0, seed], np.uint32))


@pytest.fixture(scope="module")
def runs():
    """One step on 1 device and on 8 from the same state; the 8-device step run twice more."""
    assert jax.device_count() == 8
    traces = []

    def counting_loss(*args):
        traces.append(1)  # runs at trace time only
        return loss_fn(*args)

    mesh8 = parallel.make_mesh()
    out = {"init": host_state(MODEL, TX, seed=0)}
    for name, mesh in (("one", parallel.make_mesh(jax.devices()[:1])), ("eight", mesh8)):
        state = parallel.replicate(out["init"], mesh)
        step = steps.make_train_step(MODEL, TX, counting_loss, mesh)
        new_state, m = step(state, parallel.host_local_to_global(make_batch(0), mesh))
        out[name] = (parallel.fetch(new_state), parallel.fetch(m))
        out[name + "_donated"] = all(x.is_deleted() for x in jax.tree.leaves(state))
        out[name + "_state"], out[name + "_step"], out[name + "_mesh"] = new_state, step, mesh
    traces.clear()
    state, step, mesh = out["eight_state"], out["eight_step"], out["eight_mesh"]
    for seed in (1, 2):
        state, _ = step(state, parallel.host_local_to_global(make_batch(seed), mesh))
    out["eight_state"], out["retraces"] = state, len(traces)
    return out


def test_eight_devices_match_one_device(runs):
    (s1, m1), (s8, m8) = runs["one"], runs["eight"]
    tree_allclose(s1.params, s8.params)
    tree_allclose(s1.batch_stats, s8.batch_stats)
    tree_allclose(s1.opt_state, s8.opt_state)
    assert int(s1.step) == int(s8.step) == 1
    for k in ("loss", "grad_norm", "dice"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6)
    assert m8["dice"].shape == (TARGETS,) and bool(m8["finite"])


def test_state_stays_replicated_and_step_does_not_retrace(runs):
    state = runs["eight_state"]
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 8
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0])
    assert int(parallel.fetch(state.step)) == 3
    assert runs["retraces"] == 0
    assert runs["eight_step"]._cache_size() == 1
    assert runs["eight_donated"] and runs["one_donated"]


def test_gradient_is_global_mean_gradient(runs):
    """The step's gradient equals plain jax.grad of the global mean loss, on 1 and 8 devices.

    The pmap recipe (per-device mean loss, pmean of gradients) fails this by up to 8x.
    """
    init = runs["init"]
    batch = make_batch(0)
    images = normalize(batch["image"] / 255.0)
    weights = (batch["mask_weights"] * batch["valid"][:, None])[:, None, None, :]
    plain = MODEL.clone(bn_axis_name=None)  # BatchNorm over the whole batch, one device

    def objective(params):
        out, upd = plain.apply({"params": params, "batch_stats": init.batch_stats}, images, train=True,
                               mutable=["batch_stats"])
        return global_mean_loss(loss_fn(out, batch["masks"].astype(jnp.float32), weights), batch), (out, upd)

    (loss, (out, updated)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(init.params)
    logits = out.logits
    w = batch["mask_weights"] * batch["valid"][:, None]
    dice = metrics.mean_over_images(metrics.dice_score(metrics.binarize(logits), batch["masks"],
                                                       weights=w[:, None, None, :]), w)
    for name in ("one", "eight"):
        state, m = runs[name]
        step_grads = jax.tree.map(lambda p0, p1: p0 - p1, init.params, state.params)
        tree_allclose(step_grads, grads, rtol=1e-4, atol=1e-6)
        tree_allclose(state.batch_stats, updated["batch_stats"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
        np.testing.assert_allclose(m["dice"], dice, rtol=1e-5)


@pytest.mark.parametrize("reduction, factor", [(None, 1.0), ("pmean", 1.0), ("psum", 4.0)])
def test_shard_map_gradient_of_replicated_parameter_is_device_sum(reduction, factor):
    """The JAX rule the steps rely on (check_vma=True): grad w.r.t. an unvarying argument is
    already psum'ed over the axis; pmean of it is the identity, psum scales it by the axis size."""
    mesh = parallel.make_mesh(jax.devices()[:4])
    w, x = jnp.arange(3.0), jnp.arange(24.0).reshape(8, 3) / 10

    def global_loss(w, x_shard):  # per-device share of the global mean over 8 rows
        return jnp.sum(jnp.tanh(x_shard @ w) ** 2) / 8

    def per_device(w, x_shard):
        g = jax.grad(global_loss)(w, x_shard)
        return g if reduction is None else getattr(jax.lax, reduction)(g, parallel.DATA_AXIS)

    grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                                 out_specs=P(), check_vma=True))(w, x)
    np.testing.assert_allclose(grad, factor * jax.grad(global_loss)(w, x), rtol=1e-6)


def test_non_finite_step_returns_input_state(runs):
    mesh, step = runs["eight_mesh"], runs["eight_step"]
    good = parallel.fetch(runs["eight_state"])
    params = jax.tree.map(np.copy, good.params)
    params["head"]["kernel"] = np.full_like(params["head"]["kernel"], np.nan)
    bad = good.replace(params=params)
    new_state, m = step(parallel.replicate(bad, mesh), parallel.host_local_to_global(make_batch(3), mesh))
    assert not bool(parallel.fetch(m["finite"]))
    tree_allclose(parallel.fetch(new_state), bad, rtol=0, atol=0)  # NaNs compare equal here
    assert int(parallel.fetch(new_state.step)) == int(good.step)


TINY = UNet(num_classes=TARGETS, features=2, depth=1, norm="none")


@pytest.fixture(scope="module")
def tiny_state():
    """create_train_state of a tiny GroupNorm-free model on a 2-device mesh (key data seed 1)."""
    mesh = parallel.make_mesh(jax.devices()[:2])
    return mesh, steps.create_train_state(TINY, optax.sgd(0.1), jax.random.PRNGKey(1),
                                          np.zeros((4, SIZE, SIZE, 3), np.uint8), mesh)


def test_create_train_state(tiny_state):
    mesh, state = tiny_state
    shapes = jax.eval_shape(lambda: TINY.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    assert jax.tree.structure(state.params) == jax.tree.structure(shapes["params"])
    assert state.batch_stats == {}
    assert state.rng.dtype == jnp.uint32 and state.step.dtype == jnp.int32 and int(state.step) == 0
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding == parallel.replicated(mesh)
    # Same key -> same parameters, whatever the mesh (every process must agree).
    again = steps.create_train_state(TINY, optax.sgd(0.1), jax.random.key(1),
                                     np.zeros((1, SIZE, SIZE, 3)), parallel.make_mesh())
    tree_allclose(parallel.fetch(again), parallel.fetch(state), rtol=0, atol=0)


def test_non_finite_gradient_with_finite_loss_is_detected(tiny_state):
    mesh, state = tiny_state
    tx = optax.sgd(0.1)

    def sqrt_loss(outputs, labels, weights):  # value 0, gradient of sqrt at 0 is inf
        return jnp.sqrt(0.0 * losses.sigmoid_cross_entropy(outputs.logits, labels, weights=weights))

    before = parallel.fetch(state)
    new_state, m = steps.make_train_step(TINY, tx, sqrt_loss, mesh)(
        parallel.replicate(before, mesh), parallel.host_local_to_global(make_batch(0), mesh))
    m = parallel.fetch(m)
    assert np.isfinite(m["loss"]) and not m["finite"]
    tree_allclose(parallel.fetch(new_state), before, rtol=0, atol=0)


def test_explicit_key_replaces_derived_key(tiny_state):
    """train_step(state, batch, key): the derived key reproduces the default; another key draws other
    augmentations; neither mode retraces from step to step."""
    mesh, state = tiny_state
    host = parallel.fetch(state)
    aug = augment.default_config()
    for name in ("scale_prob", "translate_prob", "contrast_prob", "saturation_prob", "hue_prob", "gamma_prob",
                 "blur_prob", "noise_prob", "rotate_prob"):
        aug[name] = 0.0  # flips and brightness suffice, and compile quickly
    traces = []

    def counting_loss(*args):
        traces.append(1)  # runs at trace time only
        return loss_fn(*args)

    step = steps.make_train_step(TINY, optax.sgd(0.1), counting_loss, mesh, augment_config=aug)
    batches = [parallel.host_local_to_global(make_batch(seed), mesh) for seed in (0, 1)]
    base = jax.random.wrap_key_data(host.rng)

    def two_steps(keys):
        s, out = parallel.replicate(host, mesh), []
        for batch, key in zip(batches, keys):
            s, m = step(s, batch) if key is None else step(s, batch, key)
            out.append((parallel.fetch(s), parallel.fetch(m)))
        return out

    default = two_steps([None, None])
    derived = two_steps([jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)])
    other = two_steps([jax.random.key(7), jax.random.key(8)])
    # One trace per mode (derived key, given key), none per step.
    assert len(traces) == 2 and step._cache_size() == 2
    raw = two_steps([jax.random.key_data(jax.random.fold_in(base, 0)), None])
    for (s_d, m_d), (s_k, m_k), (s_r, m_r) in zip(default, derived, raw):
        tree_allclose(s_k, s_d, rtol=0, atol=0)
        tree_allclose(m_k, m_d, rtol=0, atol=0)
        tree_allclose(s_r, s_d, rtol=0, atol=0)
    assert int(default[-1][0].step) == int(other[-1][0].step) == 2
    np.testing.assert_array_equal(other[-1][0].rng, host.rng)  # state.rng is never consumed
    # Another key, other flips/brightness: another loss from the very first step on the same batch.
    assert abs(float(other[0][1]["loss"]) - float(default[0][1]["loss"])) > 1e-4
    with pytest.raises(TypeError, match="single PRNG key"):
        step(parallel.replicate(host, mesh), batches[0], jax.random.split(base, 2))


def test_batch_norm_model_without_axis_name_is_rejected():
    with pytest.raises(ValueError, match="bn_axis_name"):
        steps.make_train_step(MODEL.clone(bn_axis_name=None), TX, loss_fn, parallel.make_mesh())


def test_evaluator_per_example_outputs(runs):
    mesh, state = runs["eight_mesh"], runs["eight_state"]
    batch = make_batch(5)
    keep = batch["valid"]  # the evaluator pads its own batches; the padded row is not an example
    host = input_pipeline.HostExamples(batch["image"][keep], batch["masks"][keep], batch["mask_weights"][keep],
                                       batch["index"][keep], {}, ("a", "b"))
    dataset = input_pipeline.DeviceDataset.from_host(host, mesh, batch_size=GLOBAL_BATCH)
    result = evaluator.Evaluator(dataset, probabilities.probability_fn(MODEL), ("a", "b")).run(
        steps.model_variables(state))
    out = result.per_image
    fetched = parallel.fetch(state)
    logits = MODEL.apply({"params": fetched.params, "batch_stats": fetched.batch_stats},
                         normalize(batch["image"][keep] / 255.0), train=False).logits
    weights = batch["mask_weights"][keep]
    counts = metrics.confusion_counts(metrics.binarize(logits), batch["masks"][keep],
                                      weights=weights[:, None, None, :])
    scores = metrics.scores_from_counts(counts)
    np.testing.assert_array_equal(out["index"], batch["index"][keep])
    for k in ("tp", "fp", "fn", "tn"):
        np.testing.assert_allclose(out[k], counts[k], atol=0.5)
    for k in ("dice", "iou", "precision", "recall"):
        np.testing.assert_allclose(out[k], scores[k], atol=1e-5)
    np.testing.assert_array_equal(out["weights"], weights)
    # A missing mask: zero weight and zero counts, so it drops out of any sum and of the summary.
    assert out["weights"][1, 1] == 0 and sum(out[k][1, 1] for k in ("tp", "fp", "fn", "tn")) == 0
    assert result.summary["targets"]["b"]["num_missing_mask"] == 1
    assert result.scalars["num_images/a"] == keep.sum() and result.scalars["num_images/b"] == keep.sum() - 1
    assert out["tp"][0].sum() + out["fp"][0].sum() + out["fn"][0].sum() + out["tn"][0].sum() == \
        SIZE * SIZE * TARGETS


def test_probability_fn_unetpp_prune_level():
    mesh = parallel.make_mesh()
    model = UNetPlusPlus(num_classes=TARGETS, features=4, depth=2, deep_supervision=True,
                         bn_axis_name=parallel.DATA_AXIS)
    host = host_state(model, TX, seed=2)
    images = np.random.default_rng(0).integers(0, 256, (GLOBAL_BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    x = normalize(images / 255.0)
    full = model.apply(variables, x, train=False).heads
    assert len(full) == 2
    for prune_level, expected in ((None, full[-1]), (1, model.apply(variables, x, train=False, prune_level=1).logits)):
        probs = probabilities.sharded(probabilities.probability_fn(model, prune_level=prune_level), mesh)(
            parallel.replicate(variables, mesh), parallel.host_local_to_global(images, mesh))
        assert probs.shape == (GLOBAL_BATCH, SIZE, SIZE, TARGETS) and probs.dtype == jnp.float32
        assert probs.sharding.spec == P(parallel.DATA_AXIS)
        np.testing.assert_allclose(parallel.fetch(probs), jax.nn.sigmoid(expected), atol=1e-5)
    assert not np.allclose(jax.nn.sigmoid(full[0]), jax.nn.sigmoid(full[-1]), atol=1e-3)
    # An ensemble of a model with itself is the model; members keep each probability apart.
    both = probabilities.ensemble_fn([probabilities.probability_fn(model)] * 2)
    np.testing.assert_allclose(jax.jit(both)((variables, variables), images[:2]),
                               jax.nn.sigmoid(full[-1][:2]), atol=1e-5)
    members = jax.jit(probabilities.members_fn([probabilities.probability_fn(model)] * 3))((variables,) * 3, images[:2])
    assert members.shape == (3, 2, SIZE, SIZE, TARGETS)


def test_parallel_helpers_roundtrip_and_errors():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == 8
    batch = make_batch(0)
    global_batch = parallel.host_local_to_global(batch, mesh)
    assert global_batch["image"].sharding.spec == P(parallel.DATA_AXIS)
    tree_allclose(parallel.fetch(global_batch), batch, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of"):
        parallel.host_local_to_global({"x": np.zeros((6, 2))}, mesh)
    rep = parallel.replicate({"a": np.arange(3), "b": 2.0}, mesh)
    assert rep["a"].sharding.is_fully_replicated and float(rep["b"]) == 2.0

