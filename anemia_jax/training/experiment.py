"""From a config to the training objects of an experiment: loss, optimizer, train state.

One place builds each, so the trainer (`anemia_jax.training.train`), the experiment scripts and the benchmark train
exactly the same thing; what they share with serving lives lower down (the model: `anemia_jax.runs.model_factory`;
the data and their splits: `anemia_jax.data.loading`):

* `build_loss`, `build_optimizer`: the per-example loss on a `models.SegmentationOutput` (deep supervision when the
  model has several heads), AdamW on a warm-up + cosine schedule.
* `init_train_state` / `abstract_train_state`: a fresh replicated `steps.TrainState`, and its shapes-only template
  that checkpoints restore into.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from anemia_jax import losses, models
from anemia_jax.runs import loss_config, model_factory
from anemia_jax.training import optim, steps
from anemia_jax.utils import parallel

ConfigDict = ml_collections.ConfigDict
LossFn = Callable[[models.SegmentationOutput, jax.Array, jax.Array], jax.Array]

__all__ = ["abstract_train_state", "build_loss", "build_optimizer", "init_train_state"]


# ------------------------------------------------------------------------------------------ model and loss


def build_loss(config: ConfigDict) -> LossFn:
    """``loss_fn(outputs, labels, weights) -> [B]`` from ``config.loss``; a model output with several heads (deep
    supervision) gets `losses.deep_supervision_loss` with ``loss.deep_supervision_weights`` (empty: the average)."""
    kwargs = {k: v for k, v in config.loss.items() if k != "name" and k not in loss_config.WRAPPER_KEYS}
    base = losses.get_loss(config.loss.name, **kwargs)
    output_weights = tuple(config.loss.get("deep_supervision_weights", ())) or None

    def loss_fn(outputs: models.SegmentationOutput, labels: jax.Array, weights: jax.Array) -> jax.Array:
        if len(outputs.heads) > 1:
            return losses.deep_supervision_loss(base, outputs.heads, labels, output_weights, pixel_weights=weights)
        return base(outputs.logits, labels, weights=weights)

    return loss_fn


def build_optimizer(config: ConfigDict, *, total_steps: int, warmup_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` of ``config.optimizer`` for a run of ``total_steps`` (`optim.make_optimizer`)."""
    return optim.make_optimizer(config.optimizer, total_steps=total_steps, warmup_steps=warmup_steps)


# ------------------------------------------------------------------------------------------------- states


def _sample_images(config: ConfigDict) -> np.ndarray:
    return np.zeros((1, *config.image_size, 3), np.float32)


def init_train_state(config: ConfigDict, model, tx: optax.GradientTransformation, mesh: Mesh) -> steps.TrainState:
    """A fresh `steps.TrainState` (seeded by ``config.seed``), replicated over ``mesh``; with
    ``config.model.pretrained`` set, its encoder holds those weights (`anemia_jax.training.pretrained`)."""
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), _sample_images(config), mesh)
    if not config.model.get("pretrained", ""):
        return state
    from anemia_jax.training import pretrained  # noqa: PLC0415 -- only runs that start from pretrained weights need it

    variables = pretrained.apply_to_variables(config.model, parallel.fetch(steps.model_variables(state)),
                                              model=model)
    params = parallel.replicate(variables["params"], mesh)
    logging.info("Encoder initialised from %s.", config.model.pretrained)
    return state.replace(params=params, batch_stats=parallel.replicate(variables.get("batch_stats", {}), mesh),
                         opt_state=jax.jit(tx.init)(params))


def abstract_train_state(model, tx: optax.GradientTransformation, image_size, mesh: Mesh):
    """The `steps.TrainState` of ``model``/``tx`` as `jax.ShapeDtypeStruct`s replicated over ``mesh`` (no compute).

    What a checkpoint restores into, on any mesh: pass it to `checkpointing.CheckpointManager.restore`. Mirrors
    `steps.create_train_state` (same fields, shapes and dtypes; a test checks they agree).
    """

    def init():
        variables = model_factory.init_variables(model, image_size)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                                rng=jax.random.key_data(jax.random.key(0)))

    return model_factory.replicated_shapes(jax.eval_shape(init), mesh)

