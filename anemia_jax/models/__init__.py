"""Segmentation networks (flax.linen), registered by name: `get_model`, `MODELS`, `SegmentationOutput`, `initialize`.

Every model maps NHWC floating-point images ``[B, H, W, C_in]`` to a `SegmentationOutput` whose ``logits`` are
float32 ``[B, H, W, num_classes]`` (``heads`` holds every supervised head, the final one last), and is used
functionally::

    model = get_model("unetpp", num_classes=1, dtype=jnp.bfloat16, bn_axis_name="data")
    variables = initialize(model, jax.random.key(0), images)   # model.init, jitted for a quick start
    output, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})   # the rng only if the model has dropout
    logits = output.logits

Adding a model: write ``anemia_jax/models/<name>.py`` with the class decorated ``@register_model("<name>")``
(`anemia_jax.models.base`); every module of this package is imported here, so the registry, ``get_model`` and config
validation know it at once.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from anemia_jax.models.base import MODELS, ModelCapabilities, SegmentationOutput, capabilities_of, register_model
from anemia_jax.models.layers import field_names

# Every module of the package registers its models on import.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from anemia_jax.models.attention_unet import AttentionGate, AttentionUNet  # noqa: E402
from anemia_jax.models.initialization import initialize  # noqa: E402
from anemia_jax.models.layers import ConvBlock, ConvTranspose2x2, SegmentationModel  # noqa: E402
from anemia_jax.models.unet import UNet  # noqa: E402
from anemia_jax.models.unetpp import UNetPlusPlus  # noqa: E402

__all__ = [
    "AttentionGate",
    "AttentionUNet",
    "ConvBlock",
    "ConvTranspose2x2",
    "MODELS",
    "ModelCapabilities",
    "SegmentationModel",
    "SegmentationOutput",
    "UNet",
    "UNetPlusPlus",
    "capabilities_of",
    "get_model",
    "initialize",
    "register_model",
]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model from its name and constructor fields.

    Args:
        name: a name or alias of `MODELS` (e.g. ``'unet'``, ``'unetpp'`` alias ``'unet++'``, ``'attention_unet'``);
            case-insensitive.
        **kwargs: fields of the model class, e.g. ``num_classes=2, dtype='bfloat16'``. ``dtype`` and ``param_dtype``
            may be given as strings (as configs store them).

    Returns:
        The unbound Flax module.

    Raises:
        ValueError: unknown name (the message lists the valid names) or a bad field value.
        TypeError: a keyword that is not a field of the model (the message lists the fields).
    """
    cls = MODELS.get(name)
    fields = field_names(cls)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"get_model({name!r}) got unknown argument(s) {unknown}; {cls.__name__} accepts: "
                        f"{', '.join(fields)}.")
    for dtype_field in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(dtype_field), str):
            kwargs[dtype_field] = jnp.dtype(kwargs[dtype_field])
    return cls(**kwargs)
