"""One data-parallel train step of a model on 1 and on 8 fake devices from the same state (see tests/test_steps.py
for the semantics); shared by the tests of the pretrained-encoder and transformer model families.

Two strengths: `assert_one_step_equal_on_1_and_8_devices` runs the whole train step (loss, gradients, optimizer)
on both meshes; `assert_train_forward_equal_on_1_and_8_devices` compares the model's training-mode forward pass under
`jax.shard_map` (outputs and updated BatchNorm statistics) and takes the gradient on 1 device only. A model can only
make the step depend on the device count through an operation across the examples of a batch that is not
synchronised over the mesh axis (a BatchNorm without ``bn_axis_name``), and that already shows in the forward pass;
the gradient of the synchronised forward is JAX's (tests/test_steps.py checks the step's gradient semantics on 1 and
8 devices). The second compiles two smaller programs instead of two whole steps (8.3-8.4 s against 19-21 s for the hybrid
TransUNet and SegFormer), so model families whose whole step is checked once use it for their other variants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from anemia_jax import losses
from anemia_jax.training import steps
from anemia_jax.utils import parallel
from anemia_jax.utils.parallel import DATA_AXIS

TARGETS = 2


def make_batch(size: int, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    masks = np.stack([image[..., 0] > 128, image[..., 1] > 100], axis=-1).astype(np.uint8)
    mask_weights = np.ones((batch, TARGETS), np.float32)
    mask_weights[1, 1] = 0.0
    valid = np.ones(batch, bool)
    valid[-1] = False
    return {"image": image, "masks": masks, "mask_weights": mask_weights, "valid": valid,
            "index": np.arange(batch, dtype=np.int32)}


def loss_fn(outputs, labels, weights):
    return losses.combo_loss(outputs.logits, labels, weights=weights)


def numpy_variables(model, size: int, seed: int = 0) -> dict:
    """Variables of the model's shapes drawn with numpy: compiling ``model.init`` (its random initialisers) costs
    tens of seconds on 2 CPU cores, ``jax.eval_shape`` nothing. Kernels ~ N(0, 1/fan_in), norms identity."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        leaf = path[-1].key
        if leaf in ("scale", "var"):
            return np.ones(s.shape, s.dtype)
        if leaf in ("bias", "mean"):
            return np.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if leaf == "kernel" else 50
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def host_state(model, tx, size: int, seed: int = 0) -> steps.TrainState:
    """A host TrainState with `numpy_variables`."""
    variables = numpy_variables(model, size, seed)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return steps.TrainState(step=np.int32(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                            rng=np.array([0, seed], np.uint32))


def assert_one_step_equal_on_1_and_8_devices(model, size: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raises if a step on 8 devices differs from the same global step on 1 (params, statistics, optimizer, loss)."""
    assert jax.device_count() == 8
    tx = optax.sgd(0.1, momentum=0.9)
    init = host_state(model, tx, size)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        mesh = parallel.make_mesh(devices)
        step = steps.make_train_step(model, tx, loss_fn, mesh)
        state, metrics = step(parallel.replicate(init, mesh), parallel.host_local_to_global(make_batch(size), mesh))
        out[name] = (parallel.fetch(state), parallel.fetch(metrics))
    (s1, m1), (s8, m8) = out["one"], out["eight"]
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)  # noqa: E731
    jax.tree.map(close, s1.params, s8.params)
    jax.tree.map(close, s1.batch_stats, s8.batch_stats)
    jax.tree.map(close, s1.opt_state, s8.opt_state)
    close(m1["loss"], m8["loss"])
    assert bool(m8["finite"]) and int(s8.step) == 1
    # The step changed the parameters (the comparison above is not between two untouched states).
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(s8.params)))


def assert_train_forward_equal_on_1_and_8_devices(model, size: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raises if the training-mode forward pass of a global batch of 8 differs between 1 and 8 devices: every output
    head, and the updated BatchNorm statistics (which must come out replicated: an unsynchronised BatchNorm leaves
    device-varying statistics, which `jax.shard_map` refuses to return as replicated). The 1-device program also
    takes the gradient of a loss on every head, which must be finite and reach every parameter (what the whole step
    would check of the backward pass)."""
    assert jax.device_count() == 8
    variables = numpy_variables(model, size)
    images = np.random.default_rng(1).standard_normal((8, size, size, 3)).astype(np.float32)

    def forward(params, variables, images):
        outputs, updated = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(0)})
        loss = sum(jnp.mean(jnp.square(head - 0.5)) for head in outputs.heads)
        return loss, (outputs.heads, updated.get("batch_stats", {}))

    def forward_only(variables, images):
        return forward(variables["params"], variables, images)[1]

    def with_gradient(variables, images):
        (_, out), grads = jax.value_and_grad(forward, has_aux=True)(variables["params"], variables, images)
        return out, grads

    out = {}
    for name, devices, fn, out_specs in (("one", jax.devices()[:1], with_gradient, ((P(DATA_AXIS), P()), P())),
                                         ("eight", jax.devices(), forward_only, (P(DATA_AXIS), P()))):
        mesh = parallel.make_mesh(devices)
        program = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=out_specs,
                                        check_vma=True))
        out[name] = parallel.fetch(program(parallel.replicate(variables, mesh),
                                           parallel.host_local_to_global(images, mesh)))
    ((heads1, stats1), grads), (heads8, stats8) = out["one"], out["eight"]
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)  # noqa: E731
    jax.tree.map(close, heads1, heads8)
    jax.tree.map(close, stats1, stats8)
    if "batch_stats" in variables:  # the statistics moved (not two untouched copies compared)
        assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(variables["batch_stats"]),
                                                            jax.tree.leaves(stats8)))
    unreached = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
                 if not (np.all(np.isfinite(g)) and np.any(g != 0))]
    assert not unreached, f"gradient not finite or zero for {unreached}"
