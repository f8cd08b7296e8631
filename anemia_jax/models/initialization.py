"""`initialize`: a model's variables from ``model.init``, jitted and compiled for a quick start on the CPU.

``model.init`` run op by op compiles every initialiser and layer separately; jitted at XLA's default optimisation
level, LLVM's optimisation of the unrolled threefry random-number code dominates on the CPU (UNet++ at full width: 49 s
to compile at the default level, 7 s at level 0, two loaded cores; a 4-feature U-Net 3.4 s against 0.7 s).
Initialisation runs once, so its run time does not matter; its parameters agreed with the default level's to 1e-7
where compared (UNet++ at full width, threefry keys; a tiny U-Net with rbg keys in tests/test_models.py), and the
trainer has initialised this way since. On other backends the default level is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

__all__ = ["initialize"]


def _init(model: nn.Module, rngs: Any, images: jax.Array, train: bool) -> Any:
    return model.init(rngs, images, train=train)


@functools.cache
def _jitted_init(fast_compile: bool) -> Callable[..., Any]:
    # Cached, and keyed on the (hashable) model through static_argnums: one compilation per model and image shape.
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    return jax.jit(_init, static_argnums=(0, 3), compiler_options=options)


def initialize(model: nn.Module, rngs: jax.Array | Mapping[str, jax.Array], images: jax.Array, *,
               train: bool = False) -> dict[str, Any]:
    """``model.init(rngs, images, train=train)``, jitted (at XLA level 0 on the CPU, see the module docstring).

    Args:
        model: a flax module called as ``model(images, train=...)`` (e.g. from `anemia_jax.models.get_model`);
            hashable, as the package's models are (it is a static argument: one program per model and shape).
        rngs: a typed key (``jax.random.key``) for the parameters, or a dict of keys by rng name (``'params'``,
            ``'dropout'``), as ``model.init`` takes them.
        images: ``[B, H, W, C]``; only its shape and dtype matter (one zero image is enough).
        train: the mode the model is traced in; ``False`` (the default) needs no mesh axis for synchronised
            BatchNorm, so a model built with ``bn_axis_name`` initialises outside ``jax.shard_map`` too.

    Returns:
        The variables: ``{'params': ...}`` plus ``'batch_stats'`` for models with BatchNorm.
    """
    return _jitted_init(jax.default_backend() == "cpu")(model, rngs, images, train)
