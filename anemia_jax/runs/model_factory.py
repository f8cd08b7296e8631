"""The model a run's config describes, and its variables' shapes: shared by training and serving.

One function builds the flax model of ``config.model`` (`build_model`), so the trainer, a restored run, the exports
and the benchmarks all construct exactly the same module; `abstract_variables` gives the shapes of its variables
(no compute), which is what a checkpoint is restored into. Nothing here touches data, optimizers or losses, so
serving code that restores a run imports none of them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from anemia_jax import models
from anemia_jax.utils import parallel

__all__ = ["abstract_variables", "build_model", "init_variables", "replicated_shapes"]


def build_model(config: ml_collections.ConfigDict):
    """The flax model of ``config.model`` with one output channel per target and BatchNorm synced over 'data'."""
    # `pretrained` is where the encoder's weights come from (the trainer's business), not a field of the model.
    kwargs = {k: v for k, v in config.model.items() if k not in ("name", "pretrained")}
    return models.get_model(config.model.name, num_classes=len(config.targets), dtype=config.compute_dtype,
                            bn_axis_name=parallel.DATA_AXIS, **kwargs)


def init_variables(model, image_size) -> dict[str, Any]:
    """``model.init`` on one zero image of ``image_size`` (H, W): the variables of a fresh model (seed 0)."""
    key = jax.random.key(0)
    return model.init({"params": key, "dropout": key}, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)


def replicated_shapes(tree, mesh: Mesh):
    """``tree``'s leaves as `jax.ShapeDtypeStruct`s replicated over ``mesh``: what a checkpoint restores into."""
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def abstract_variables(model, image_size, mesh: Mesh) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``model`` as replicated `jax.ShapeDtypeStruct`s: what inference restores
    from a checkpoint (`checkpointing.CheckpointManager.restore_variables`), with no optimizer involved."""
    variables = jax.eval_shape(lambda: init_variables(model, image_size))
    return replicated_shapes({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, mesh)
