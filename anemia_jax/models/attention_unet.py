"""Attention U-Net (Oktay et al. 2018): U-Net whose skip connections pass through attention gates.

Reference: O. Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018, arXiv:1804.03999 (additive "grid" attention gates, Fig. 2 and Eq. 1-2).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from anemia_jax.models.base import SegmentationOutput, register_model
from anemia_jax.models.layers import Dtype, SegmentationModel, check_images


class AttentionGate(nn.Module):
    """Additive attention gate: rescales a skip feature map by coefficients in (0, 1).

    With skip features ``x [B, H, W, C_x]`` and a gating signal ``g [B, H/2, W/2, C_g]`` from the
    next coarser level::

        q     = relu(W_x(x) + W_g(g))        # [B, H/2, W/2, features]
        alpha = sigmoid(psi(q))              # [B, H/2, W/2, 1]
        out   = x * resize(alpha, (H, W))    # bilinear "resampler"

    ``W_g`` and ``psi`` are 1x1 convolutions with bias (``b_g``, ``b_psi`` in the paper);
    ``W_x`` is a 2x2 stride-2 convolution without bias, the sub-sampling linear map of the
    authors' reference implementation that brings ``x`` to the gating signal's grid, so the gate
    itself runs at the coarse resolution. As in the paper's Fig. 2 there is no output transform
    after the multiplication. The coefficients are sown as ``intermediates/<gate>/alpha``
    (``[B, H/2, W/2, 1]``), retrievable with ``mutable=['intermediates']``.

    Attributes:
        features: channels of the intermediate map ``q`` (``F_int``).
        dtype: computation dtype; param_dtype: parameter dtype.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, g: jax.Array) -> jax.Array:
        """Gates ``x [B, H, W, C_x]`` with ``g [B, H/2, W/2, C_g]``; returns ``[B, H, W, C_x]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        theta = nn.Conv(self.features, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                        name="W_x", **kw)(x)
        phi = nn.Conv(self.features, (1, 1), name="W_g", **kw)(g)
        alpha = nn.sigmoid(nn.Conv(1, (1, 1), name="psi", **kw)(nn.relu(theta + phi)))
        self.sow("intermediates", "alpha", alpha)
        b, h, w, _ = x.shape
        alpha = jax.image.resize(alpha, (b, h, w, 1), method="bilinear").astype(x.dtype)
        return x * alpha


@register_model("attention_unet")
class AttentionUNet(SegmentationModel):
    """Attention U-Net: ``images [B, H, W, C_in] -> SegmentationOutput`` (one head of float32 logits).

    A `UNet` (same encoder, decoder, widths and fields) in which, at decoder level ``i``, the
    encoder skip ``X_i`` is first gated by an `AttentionGate` whose gating signal is the coarser
    decoder feature map (the bottleneck for the deepest level) -- the map that is upsampled and
    concatenated with the gated skip. Gate width ``F_int = max(1, features * 2**i // 2)``.

    With the defaults (``features=64, depth=4``, BatchNorm, transposed convolutions, 3 input
    channels, ``num_classes=1``) it has **32,083,077** parameters: the 31,037,633 of `UNet` plus
    1,045,444 in the four gates (``3 w^2 + w + 1`` for a level of width ``w``).

    Parameter scopes: ``encoder_{i}``, ``attention_{i}``, ``up_{i}``, ``decoder_{i}``, ``head``.
    """

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> SegmentationOutput:
        """Segments a batch; arguments and result as in `UNet.__call__`."""
        check_images(images, self.depth, type(self).__name__)
        widths = self.widths
        skips = self.encode(images, train=train)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            gate = AttentionGate(max(1, widths[i] // 2), dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"attention_{i}")
            skip = gate(skips[i], x)
            x = jnp.concatenate([self.up(x, widths[i], f"up_{i}"), skip], axis=-1)
            x = self.block(widths[i], f"decoder_{i}")(x, train=train)
        return SegmentationOutput.single(self.head(x, "head"))
