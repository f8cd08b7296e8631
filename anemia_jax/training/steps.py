"""The data-parallel training step and train state: per-device code under `jax.shard_map`.

(Evaluation runs the same way in `anemia_jax.evaluation.evaluator`, on the inference functions of
`anemia_jax.inference.probabilities`.)

The pmap programming model, written the way JAX recommends for new code: the
step is `jax.jit(jax.shard_map(per_device_fn, mesh=mesh, ...))` over the 1-D
mesh of `anemia_jax.utils.parallel` (axis 'data', every device of every process).
Inside, code sees its device's slice of the batch and communicates through
explicit collectives on the axis name; the state is replicated (`P()`).

Gradient semantics under `check_vma=True` (kept on, so JAX type-checks which
values vary across devices): parameters enter unvarying (replicated); when
they meet device-varying data JAX inserts an implicit `pvary`, whose transpose
is a `psum`. Hence `jax.grad` of the *per-device* loss w.r.t. the parameters
already returns the gradient summed over devices, typed unvarying. The pmap
recipe (per-device mean loss, then `lax.pmean` of the gradients) is therefore
wrong here: `pmean` of an unvarying value is the identity, so the result is
the device count times too large (and a `psum` would multiply once more).
Each device instead computes `sum(its per-example losses) / global count`,
whose device-summed gradient is exactly the gradient of the global mean loss,
independent of the device count (tests/test_steps.py checks both the JAX
semantics and the step against plain `jax.grad`). BatchNorm statistics are synchronised
the same way: models are built with `bn_axis_name='data'`, which makes
flax's BatchNorm `pmean` its batch moments, so the running statistics come out
unvarying (identical on every device) and equal to a 1-device run on the same
global batch.

Randomness: by default the per-step key is `fold_in(state.rng, state.step)`,
so a step is a pure function of (state, batch) and a resumed run draws the
same keys as an uninterrupted one. `train_step(state, batch, key)` takes the
step key from the caller instead (e.g. for experiments
that resample augmentation independently of the step counter). Either way
each device folds in its `axis_index('data')`, so with augmentation or dropout
on, results depend on the device count (each device draws its own
transforms); with both off a step is device-count independent to float
tolerance.

Non-finite steps: if the loss or any gradient is NaN/inf, `train_step` returns
the *input* state unchanged (step counter included) and
`metrics['finite'] == False`, so the trainer can stop and keep the last good
state and checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from anemia_jax import metrics, models
from anemia_jax.data import augment
from anemia_jax.data.normalization import normalize, to_float
from anemia_jax.utils import parallel
from anemia_jax.utils.parallel import DATA_AXIS

PyTree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

_TRAIN_KEYS = ("image", "masks", "mask_weights", "valid")


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes; pure data (no callables).

    Attributes:
        step: int32 scalar, number of applied updates.
        params: model parameters.
        batch_stats: BatchNorm running statistics (`{}` for models without).
        opt_state: state of the optax transformation.
        rng: uint32 key data (`jax.random.key_data` form, so Orbax can save it);
            constant over training, per-step keys are folded from it and `step`.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array


# `train_step(state, batch, key=None) -> (state, metrics)`, see `make_train_step`.
TrainStep = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def _check_model(model: nn.Module) -> None:
    # A BatchNorm model without the axis name would normalise with per-device
    # statistics and leave device-varying running statistics behind.
    if getattr(model, "norm", None) == "batch" and getattr(model, "bn_axis_name", None) != DATA_AXIS:
        raise ValueError(
            f"{type(model).__name__} uses BatchNorm but bn_axis_name="
            f"{getattr(model, 'bn_axis_name', None)!r}; data-parallel steps need "
            f"statistics synchronised over the mesh axis: pass "
            f"model.clone(bn_axis_name={DATA_AXIS!r}).")


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng_key: jax.Array,
    sample_images: Any,
    mesh: Mesh,
) -> TrainState:
    """Initialises parameters, BatchNorm statistics and optimizer state, replicated.

    Args:
        model: a flax module called as `model(images, train=...)`.
        tx: the optax transformation the train step will apply.
        rng_key: typed key (`jax.random.key`) or raw uint32 key data
            (`jax.random.PRNGKey`); split into the init key and `state.rng`.
        sample_images: array of shape [b, H, W, 3]; only its spatial shape is
            used (initialisation runs on one zero image).
        mesh: the mesh from `parallel.make_mesh`; every process must pass the
            same `rng_key`.

    Returns:
        A `TrainState` at step 0, every leaf replicated over `mesh`.
    """
    if not jax.dtypes.issubdtype(jnp.asarray(rng_key).dtype, jax.dtypes.prng_key):
        rng_key = jax.random.wrap_key_data(jnp.asarray(rng_key, jnp.uint32))
    init_key, dropout_key, train_key = jax.random.split(rng_key, 3)
    shape = tuple(sample_images.shape)
    if len(shape) != 4:
        raise ValueError(f"sample_images must be [b, H, W, 3]; got shape {shape}.")

    # train=False: BatchNorm then reads running averages, so no axis name needs to be bound outside shard_map.
    variables = models.initialize(model, {"params": init_key, "dropout": dropout_key},
                                  jnp.zeros((1,) + shape[1:], jnp.float32))
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=jax.jit(tx.init)(params),
        rng=jax.random.key_data(train_key),
    )
    return parallel.replicate(state, mesh)


def model_variables(state: TrainState) -> dict[str, PyTree]:
    """The flax variables of ``state``'s model: ``{'params'[, 'batch_stats']}`` (what ``model.apply`` takes)."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def _check_batch(batch: Batch, keys: tuple[str, ...], mesh: Mesh) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"The batch lacks {missing}; it has {sorted(batch)}. See the input "
                       f"pipeline's batch contract (image, masks, mask_weights, valid, index).")
    size = batch[keys[0]].shape[0]
    if size % mesh.size:
        raise ValueError(f"Global batch size {size} is not divisible by the {mesh.size} "
                         f"devices of the mesh; pick a multiple of {mesh.size}.")


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    mesh: Mesh,
    *,
    augment_config: ml_collections.ConfigDict | None = None,
    compute_dtype: Any = jnp.float32,
) -> TrainStep:
    """Builds the jitted data-parallel training step (state donated).

    Args:
        model: flax module; BatchNorm models must have `bn_axis_name='data'`.
        tx: optax transformation; its update runs identically on every device.
        loss_fn: `loss_fn(outputs, labels, weights) -> [b]` per-example losses,
            where `outputs` is the model's `SegmentationOutput` (every head
            cast to float32), `labels` float32 [b, H, W, C] and
            `weights` float32 [b, 1, 1, C] (mask_weights; missing masks 0).
        mesh: 1-D mesh from `parallel.make_mesh`.
        augment_config: `augment.augment_batch` config, or None for no
            augmentation (images only converted with `normalization.to_float`).
        compute_dtype: dtype the normalised images are cast to before the
            model (e.g. jnp.bfloat16; the model's own `dtype` sets its compute
            precision). Losses and metrics are computed in float32.

    Returns:
        `train_step(state, batch, key=None) -> (new_state, metrics)`. `batch`
        holds global arrays sharded P('data'): image uint8 [B,H,W,3], masks
        uint8 [B,H,W,C], mask_weights f32 [B,C], valid bool [B]. `key` is the
        step's augmentation/dropout key: None (the default) derives it as
        `fold_in(wrap_key_data(state.rng), state.step)`, so the step is a
        pure function of (state, batch) and resumes reproducibly; a typed key
        (`jax.random.key`; raw uint32 key data is wrapped) replaces that
        derived key, and the caller must then pass a fresh one each step
        (e.g. `fold_in(base, step)`) and save what it needs to resume. Every
        process must pass the same key. `state.rng` (never consumed) and the
        step counter behave the same in both modes; each mode (and raw key
        data) compiles once. An example counts in the loss when it is valid
        and has at least one mask. Metrics are replicated: 'loss' (global
        mean), 'grad_norm', 'dice' f32 [C] (mean over examples having that
        mask of the per-image Dice of the final output at probability 0.5;
        NaN for a target absent from the batch) and 'finite' (bool). If not
        finite, `new_state` is `state`.
    """
    _check_model(model)

    def per_device(state: TrainState, batch: Batch, step_key: jax.Array):
        device_key = jax.random.fold_in(step_key, jax.lax.axis_index(DATA_AXIS))
        aug_key, dropout_key = jax.random.split(device_key)
        if augment_config is None:
            images, labels = to_float(batch["image"]), batch["masks"].astype(jnp.float32)
        else:
            images, labels = augment.augment_batch(aug_key, batch["image"], batch["masks"],
                                                   augment_config)
        x = normalize(images).astype(compute_dtype)

        weights = batch["mask_weights"].astype(jnp.float32) * batch["valid"][:, None]
        contributes = jnp.any(weights > 0, axis=-1)  # [b]: in the global mean
        num_global = jnp.maximum(jax.lax.psum(jnp.sum(contributes, dtype=jnp.float32), DATA_AXIS), 1.0)
        # A loss that divides by its weight sum would be 0/0 for an example
        # with no weight; its value is masked out below, but a NaN would still
        # reach the gradient through jnp.where, so such rows get unit weights.
        loss_weights = jnp.where(contributes[:, None], weights, 1.0)[:, None, None, :]

        def local_loss(params):
            outputs, updated = model.apply(
                {**model_variables(state), "params": params}, x, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_key})
            outputs = jax.tree.map(lambda o: o.astype(jnp.float32), outputs)
            per_example = loss_fn(outputs, labels, loss_weights)
            if per_example.shape != contributes.shape:
                raise ValueError(f"loss_fn must return per-example losses of shape "
                                 f"{contributes.shape}; got {per_example.shape}.")
            total = jnp.sum(jnp.where(contributes, per_example, 0.0))
            return total / num_global, (outputs, updated.get("batch_stats", {}))

        (loss, (outputs, batch_stats)), grads = jax.value_and_grad(local_loss, has_aux=True)(
            state.params)
        # `grads` is already the all-device sum (see module docstring).
        loss = jax.lax.psum(loss, DATA_AXIS)

        pred = metrics.binarize(outputs.logits)
        dice = metrics.dice_score(pred, labels, weights=weights[:, None, None, :])
        dice_sum = jax.lax.psum(jnp.sum(dice * weights, axis=0), DATA_AXIS)
        dice_den = jax.lax.psum(jnp.sum(weights, axis=0), DATA_AXIS)
        finite = jnp.isfinite(loss) & _all_finite(grads)

        def apply_update(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state, batch_stats=batch_stats)

        new_state = jax.lax.cond(finite, apply_update, lambda s: s, state)
        out = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "dice": jnp.where(dice_den > 0, dice_sum / jnp.where(dice_den > 0, dice_den, 1.0), jnp.nan),
            "finite": finite,
        }
        return new_state, out

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                            out_specs=(P(), P()), check_vma=True)

    def train_step(state: TrainState, batch: Batch, key: jax.Array | None = None):
        _check_batch(batch, _TRAIN_KEYS, mesh)
        if key is None:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        elif not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.dtype != jnp.uint32 or key.shape != state.rng.shape:
                raise TypeError(f"key must be a typed PRNG key (jax.random.key) or uint32 key data of shape "
                                f"{state.rng.shape}; got {key.dtype}{list(key.shape)}.")
            key = jax.random.wrap_key_data(key)
        elif key.shape:
            raise TypeError(f"key must be a single PRNG key; got a batch of keys of shape {key.shape}. "
                            f"Pass one key per step (e.g. jax.random.fold_in(base_key, step)).")
        return sharded(state, {k: batch[k] for k in _TRAIN_KEYS}, key)

    return jax.jit(train_step, donate_argnums=0)
