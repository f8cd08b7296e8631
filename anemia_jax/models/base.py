"""What every segmentation model shares: its output type and the registry it is declared in.

Every model returns a `SegmentationOutput`, whatever its architecture, so no caller ever branches on the type of a
model's result: ``output.logits`` is the prediction, ``output.heads`` every supervised head (one for most models;
UNet++ with deep supervision has one per nested level, shallowest first, the final head last).

Models register themselves beside their definition::

    @register_model("unet")
    class UNet(SegmentationModel): ...

and `anemia_jax.models.get_model` / config validation read `MODELS`.

What a model supports beyond being called is declared on the model too, as its ``capabilities`` property (a
`ModelCapabilities`): which pretrained encoder weights it loads, the UNet++ levels it can be pruned to, whether it
trains auxiliary heads. Code elsewhere reads `capabilities_of(model)` instead of comparing model names, so adding a
model touches only its own file.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from anemia_jax.utils.registry import Registry

__all__ = ["MODELS", "ModelCapabilities", "SegmentationOutput", "capabilities_of", "register_model"]

MODELS: Registry[type] = Registry("model")
register_model = MODELS.register


@flax.struct.dataclass
class SegmentationOutput:
    """The result of a model call: float32 logits of every supervised head.

    A pytree (``jax.tree.map`` reaches every head), so it passes through ``jit``, ``shard_map`` and ``grad``.

    Attributes:
        heads: float32 logits ``[B, H, W, num_classes]`` per head, shallowest first; the last is the model's final
            prediction. One head unless the model trains auxiliary heads (deep supervision).
    """

    heads: tuple[jax.Array, ...]

    @property
    def logits(self) -> jax.Array:
        """The final prediction's float32 logits ``[B, H, W, num_classes]`` (the last head)."""
        return self.heads[-1]

    @classmethod
    def single(cls, logits: jax.Array) -> SegmentationOutput:
        """The output of a model with one head."""
        return cls(heads=(logits,))


@dataclasses.dataclass(frozen=True)
class ModelCapabilities:
    """What a model (with its current fields) supports beyond ``__call__(images, train=...)``.

    Attributes:
        pretrained: the kind of pretrained encoder weights it loads (a key of
            `anemia_jax.training.pretrained.CONVERTERS`, e.g. ``'timm_resnet'``), or None when it has no pretrained
            encoder.
        prune_levels: the levels ``k`` accepted by ``__call__(..., prune_level=k)`` (UNet++ L^k; empty: none).
        deep_supervision: whether it returns several supervised heads in training (``output.heads``).
    """

    pretrained: str | None = None
    prune_levels: tuple[int, ...] = ()
    deep_supervision: bool = False


def capabilities_of(model) -> ModelCapabilities:
    """The model's declared `ModelCapabilities` (a model that declares none supports nothing beyond a call)."""
    declared = getattr(model, "capabilities", None)
    return declared if isinstance(declared, ModelCapabilities) else ModelCapabilities()
