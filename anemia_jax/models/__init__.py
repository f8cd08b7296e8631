"""Segmentation networks (flax.linen): `UNet`, `UNetPlusPlus`, `AttentionUNet`, and `get_model`.

Every model maps NHWC floating-point images ``[B, H, W, C_in]`` (H, W multiples of
``2**depth``) to float32 logits ``[B, H, W, num_classes]`` and is used functionally::

    model = get_model("unetpp", num_classes=1, dtype=jnp.bfloat16, bn_axis_name="data")
    variables = model.init(jax.random.key(0), images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})   # the rng only if dropout_rate > 0

Common fields (see `SegmentationModel`): ``num_classes``, ``features``, ``depth``, ``norm``,
``norm_groups``, ``upsample``, ``dropout_rate``, ``bn_axis_name``, ``dtype``, ``param_dtype``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from anemia_jax.models.attention_unet import AttentionGate, AttentionUNet
from anemia_jax.models.layers import ConvBlock, ConvTranspose2x2, SegmentationModel, field_names
from anemia_jax.models.unet import UNet
from anemia_jax.models.unetpp import UNetPlusPlus

__all__ = [
    "AttentionGate",
    "AttentionUNet",
    "ConvBlock",
    "ConvTranspose2x2",
    "MODELS",
    "SegmentationModel",
    "UNet",
    "UNetPlusPlus",
    "get_model",
]

# Registry names used by configs; aliases map to the same classes.
MODELS: dict[str, type[SegmentationModel]] = {
    "unet": UNet,
    "unetpp": UNetPlusPlus,
    "unet++": UNetPlusPlus,
    "nested_unet": UNetPlusPlus,
    "attention_unet": AttentionUNet,
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model from its name and constructor fields.

    Args:
        name: ``'unet'``, ``'unetpp'`` (aliases ``'unet++'``, ``'nested_unet'``) or
            ``'attention_unet'``; case-insensitive.
        **kwargs: fields of the model class, e.g. ``num_classes=2, dtype='bfloat16'``. ``dtype``
            and ``param_dtype`` may be given as strings (as configs store them).

    Returns:
        The unbound Flax module.

    Raises:
        ValueError: unknown name (the message lists the valid names) or a bad field value.
        TypeError: a keyword that is not a field of the model (the message lists the fields).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid names: {sorted(MODELS)}.")
    cls = MODELS[key]
    fields = field_names(cls)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(
            f"get_model({name!r}) got unknown argument(s) {unknown}; {cls.__name__} accepts: "
            f"{', '.join(fields)}."
        )
    for dtype_field in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(dtype_field), str):
            kwargs[dtype_field] = jnp.dtype(kwargs[dtype_field])
    return cls(**kwargs)
