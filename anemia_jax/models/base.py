"""What every segmentation model shares: its output type and the registry it is declared in.

Every model returns a `SegmentationOutput`, whatever its architecture, so no caller ever branches on the type of a
model's result: ``output.logits`` is the prediction, ``output.heads`` every supervised head (one for most models;
UNet++ with deep supervision has one per nested level, shallowest first, the final head last).

Models register themselves beside their definition::

    @register_model("unet")
    class UNet(SegmentationModel): ...

and `anemia_jax.models.get_model` / config validation read `MODELS`.
"""

from __future__ import annotations

import flax.struct
import jax

from anemia_jax.utils.registry import Registry

__all__ = ["MODELS", "SegmentationOutput", "register_model"]

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
