"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) for binary and multi-label segmentation.

Reference: "U-Net: Convolutional Networks for Biomedical Image Segmentation", arXiv:1505.04597.
Differences from the 2015 paper, shared with common modern practice and with the PyTorch peer
used in benchmarks: 'same' padding (output size = input size, no cropping of skips) and
normalisation after every 3x3 convolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from anemia_jax.models import resnet
from anemia_jax.models.base import SegmentationOutput, register_model
from anemia_jax.models.layers import SegmentationModel, check_images


@register_model("unet")
class UNet(SegmentationModel):
    """U-Net: ``images [B, H, W, C_in] -> SegmentationOutput`` (one head of float32 logits ``[B, H, W, classes]``).

    Encoder level ``i`` (``i = 0..depth``) is a `ConvBlock` of ``features * 2**i`` channels
    (levels ``i > 0`` after a 2x2 max pool); decoder level ``i`` upsamples the level below to
    ``features * 2**i`` channels, concatenates ``[upsampled, encoder skip]`` and applies a
    `ConvBlock`; a 1x1 convolution gives the logits. H and W must be multiples of ``2**depth``.

    The defaults (``features=64, depth=4``: widths 64-128-256-512-1024, BatchNorm, 2x2 transposed
    convolutions, 3 input channels, ``num_classes=1``) have **31,037,633** parameters, the same
    layer for layer as a plain PyTorch U-Net of these widths (BatchNorm scale and bias
    are parameters; running statistics live in ``'batch_stats'``).

    Parameter scopes: ``encoder_{i}``, ``up_{i}``, ``decoder_{i}``, ``head``.
    All fields are documented on `SegmentationModel`, except:

    Attributes:
        encoder: None (default) for the from-scratch U-Net above; a name of `anemia_jax.models.resnet.ENCODERS`
            (``'resnet18'``, ``'resnet34'``, ``'resnet50'``) builds segmentation_models_pytorch's ``Unet(encoder)``
            instead (`anemia_jax.models.resnet.smp_unet`; ``features``, ``depth``, ``upsample`` and
            ``dropout_rate`` are then unused, H and W must be multiples of 32).
        decoder_channels: the decoder widths with an encoder (smp's default ``(256, 128, 64, 32, 16)``).

    Example::

        model = UNet(num_classes=1, dtype=jnp.bfloat16)
        variables = initialize(model, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))  # anemia_jax.models
        output, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
        logits = output.logits
    """

    encoder: str | None = None
    decoder_channels: tuple[int, ...] = resnet.SMP_DECODER_CHANNELS

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> SegmentationOutput:
        """Segments a batch.

        Args:
            images: ``[B, H, W, C_in]`` floating-point images, H and W multiples of ``2**depth``.
            train: training mode: BatchNorm uses (and, with ``mutable=['batch_stats']``,
                updates) batch statistics, dropout is active (needs a ``'dropout'`` rng).

        Returns:
            `SegmentationOutput` with one head: float32 logits ``[B, H, W, num_classes]``.
        """
        if self.encoder is not None:
            return SegmentationOutput.single(resnet.smp_unet(self, images, train=train))
        check_images(images, self.depth, type(self).__name__)
        widths = self.widths
        skips = self.encode(images, train=train)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = jnp.concatenate([self.up(x, widths[i], f"up_{i}"), skips[i]], axis=-1)
            x = self.block(widths[i], f"decoder_{i}")(x, train=train)
        return SegmentationOutput.single(self.head(x, "head"))
