"""UNet++ (Zhou et al. 2018): U-Net with nested, dense skip pathways, deep supervision and pruning.

Reference: Z. Zhou, M. M. Rahman Siddiquee, N. Tajbakhsh, J. Liang, "UNet++: A Nested U-Net
Architecture for Medical Image Segmentation", DLMIA 2018, arXiv:1807.10165.

Node ``X^{i,j}`` sits at resolution level ``i`` (``H / 2**i``) and column ``j``:

* ``X^{i,0}`` is the encoder: ``Block(X^{0,0} = images)``, ``Block(maxpool(X^{i-1,0}))``;
* ``X^{i,j} = Block(concat[X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})])`` for ``j >= 1``;
* the outputs are ``X^{0,1} .. X^{0,depth}``, each with its own 1x1 logits head.

``X^{0,k}`` depends only on nodes with ``i + j <= k``, which is the paper's pruned network
"UNet++ L^k": at inference `UNetPlusPlus` can evaluate only that sub-network.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from anemia_jax.models import resnet
from anemia_jax.models.base import ModelCapabilities, SegmentationOutput, register_model
from anemia_jax.models.layers import SegmentationModel, check_images


@register_model("unetpp", aliases=("unet++", "nested_unet"))
class UNetPlusPlus(SegmentationModel):
    """UNet++: ``images [B, H, W, C_in] -> SegmentationOutput`` (float32 logits of one head, or of every level).

    Levels ``i = 0..depth`` have ``features * 2**i`` channels (default 32-64-128-256-512); every
    node is a `ConvBlock`; ``Up`` is a 2x2 transposed convolution (or resize + 3x3 conv) from
    level ``i+1`` to level ``i`` channels, one per node (weights are not shared between nodes).

    Outputs (a `SegmentationOutput`; ``output.logits`` is always the final prediction):

    * ``deep_supervision=False`` (default): only ``X^{0,depth}`` has a head; ``output.heads`` is that one head.
    * ``deep_supervision=True``: heads on ``X^{0,1}..X^{0,depth}``; ``output.heads`` holds their logits,
      shallowest first, in training and in evaluation alike, and ``output.logits`` is ``X^{0,depth}``'s.
    * ``prune_level=k`` (inference only, ``train=False``): computes only the nodes ``X^{i,j}`` with
      ``i + j <= k`` (encoder levels ``0..k`` included); the one head is ``X^{0,k}``'s. The same variables (from
      ``init`` of the full network) serve every level. Levels ``k < depth`` need the heads of a
      ``deep_supervision=True`` model, because a head on ``X^{0,k}`` is only trained with deep supervision;
      ``k = depth`` works for both.

    Parameter counts with the defaults (``features=32, depth=4``, BatchNorm, transposed-conv
    upsampling, 3 input channels, ``num_classes=1``): **9,045,825** with
    ``deep_supervision=False`` -- layer for layer a plain PyTorch UNet++ of these widths -- and **9,045,924** with ``deep_supervision=True`` (three more
    1x1 heads of 33 parameters each).

    Parameter scopes: ``X_{i}_{j}`` (node blocks), ``up_{i}_{j}`` (the upsampling feeding
    ``X^{i,j}``), ``head_{j}`` (the head on ``X^{0,j}``; with ``deep_supervision=False`` only
    ``head_{depth}``, so such variables load into a deep-supervised model's ``head_{depth}``).

    Attributes:
        deep_supervision: whether heads on every ``X^{0,j}`` exist and are returned.
        encoder: None (default) for the from-scratch UNet++ above; a name of `anemia_jax.models.resnet.ENCODERS`
            (``'resnet18'``, ``'resnet34'``, ``'resnet50'``) builds segmentation_models_pytorch's
            ``UnetPlusPlus(encoder)`` instead (`anemia_jax.models.resnet.smp_unetpp`: one head, no deep
            supervision or pruning; ``features``, ``depth``, ``upsample``, ``dropout_rate`` unused; H and W
            multiples of 32).
        decoder_channels: the decoder widths with an encoder (smp's default ``(256, 128, 64, 32, 16)``).
        (The other fields, with ``features=32`` here, are documented on `SegmentationModel`.)
    """

    features: int = 32
    deep_supervision: bool = False
    encoder: str | None = None
    decoder_channels: tuple[int, ...] = resnet.SMP_DECODER_CHANNELS

    @property
    def capabilities(self) -> ModelCapabilities:
        """Pruning to every level ``1..depth`` and deep supervision with ``deep_supervision=True`` (only the full
        network, ``depth``, without it); with a ResNet ``encoder``, timm weights and neither of the others."""
        if self.encoder is not None:
            return super().capabilities
        levels = tuple(range(1, self.depth + 1)) if self.deep_supervision else (self.depth,)
        return ModelCapabilities(prune_levels=levels, deep_supervision=self.deep_supervision)

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, prune_level: int | None = None
    ) -> SegmentationOutput:
        """Segments a batch.

        Args:
            images: ``[B, H, W, C_in]`` floating-point images, H and W multiples of ``2**depth``.
            train: training mode (BatchNorm batch statistics, dropout with rng ``'dropout'``).
            prune_level: ``k`` in ``1..depth`` to evaluate only UNet++ L^k (requires
                ``train=False``); None evaluates the full network.

        Returns:
            `SegmentationOutput`: float32 logits ``[B, H, W, num_classes]`` of ``X^{0,depth}`` (or of
            ``X^{0,k}`` when pruned); with ``deep_supervision=True`` and no ``prune_level``, ``depth`` heads for
            ``X^{0,1}..X^{0,depth}``.

        Raises:
            ValueError: for a bad input shape or an unsupported ``prune_level``.
        """
        name = type(self).__name__
        if self.encoder is not None:
            if self.deep_supervision or prune_level is not None:
                raise ValueError(f"{name}(encoder={self.encoder!r}) has smp's single head: deep_supervision and "
                                 "prune_level need the from-scratch UNet++ (encoder=None).")
            return SegmentationOutput.single(resnet.smp_unetpp(self, images, train=train))
        check_images(images, self.depth, name)
        top = self.depth if prune_level is None else self._check_prune_level(prune_level, train)
        widths = self.widths

        # Every node is computed once and reused by all the nodes to its right.
        nodes: dict[tuple[int, int], jax.Array] = {
            (i, 0): x for i, x in enumerate(self.encode(images, train=train, levels=top + 1, scope="X_{}_0"))}
        for j in range(1, top + 1):
            for i in range(top - j + 1):
                up = self.up(nodes[i + 1, j - 1], widths[i], f"up_{i}_{j}")
                inputs = [nodes[i, m] for m in range(j)] + [up]
                nodes[i, j] = self.block(widths[i], f"X_{i}_{j}")(
                    jnp.concatenate(inputs, axis=-1), train=train
                )

        if prune_level is not None:
            return SegmentationOutput.single(self.head(nodes[0, top], f"head_{top}"))
        if self.deep_supervision:
            return SegmentationOutput(tuple(self.head(nodes[0, j], f"head_{j}") for j in range(1, self.depth + 1)))
        return SegmentationOutput.single(self.head(nodes[0, self.depth], f"head_{self.depth}"))

    def _check_prune_level(self, prune_level: int, train: bool) -> int:
        name = type(self).__name__
        if train:
            raise ValueError(
                f"{name}: prune_level={prune_level} is an inference mode; call with train=False "
                "(train the full network, with deep_supervision=True, then prune)."
            )
        if (isinstance(prune_level, bool) or not isinstance(prune_level, numbers.Integral)
                or not 1 <= prune_level <= self.depth):
            raise ValueError(
                f"{name}: prune_level must be an int in 1..{self.depth} (depth) or None; "
                f"got {prune_level!r}."
            )
        if prune_level < self.depth and not self.deep_supervision:
            raise ValueError(
                f"{name}: prune_level={prune_level} needs the head on X^(0,{prune_level}), which "
                "only a deep_supervision=True model has (and trains). Construct the model with "
                f"deep_supervision=True, or use prune_level={self.depth} (the full network)."
            )
        return int(prune_level)
