"""SegFormer (Xie et al., NeurIPS 2021): a Mix Transformer (MiT) encoder and an all-MLP decoder.

Reference: E. Xie, W. Wang, Z. Yu, A. Anandkumar, J. M. Alvarez, P. Luo, "SegFormer: Simple and Efficient Design for
Semantic Segmentation with Transformers", arXiv:2105.15203. The layers follow the HuggingFace ``transformers``
implementation (``SegformerModel`` / ``SegformerDecodeHead``), whose ``nvidia/mit-b0..b2`` checkpoints
`anemia_jax.training.pretrained` loads: overlapping patch embeddings (conv 7x7/4 then 3x3/2, LayerNorm), efficient
self-attention with spatial reduction (a strided conv over keys/values, ratios 8-4-2-1), Mix-FFN (linear, depthwise
3x3 conv, exact GELU, linear), LayerNorm eps 1e-5, stochastic depth rising linearly to ``drop_path_rate``. The decoder
projects each stage to ``decoder_hidden`` channels, upsamples them (bilinear) to 1/4 of the input, concatenates them
(deepest first), fuses with a 1x1 conv + BatchNorm + ReLU, applies dropout and a 1x1 classifier; the 1/4-resolution
logits are upsampled bilinearly to the input size, as SegFormer's loss and inference do.

Parameter scopes: ``encoder`` (the MiT: ``patch_embed_{s}``, ``block_{s}_{j}``, ``norm_{s}``), ``linear_c{s}``,
``linear_fuse``, ``bn``, ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anemia_jax.models.base import ModelCapabilities, SegmentationOutput, register_model
from anemia_jax.models.layers import check_images

Array = jax.Array
Dtype = Any

_DENSE_INIT = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class MiTSpec:
    """One Mix Transformer size: per-stage widths, depths, heads and spatial-reduction ratios."""

    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    decoder_hidden: int
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


VARIANTS: dict[str, MiTSpec] = {
    "b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8), 256),
    "b1": MiTSpec((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), 256),
    "b2": MiTSpec((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), 768),
    # For tests and CPU smoke runs only: no pretrained weights exist for it.
    "tiny": MiTSpec((8, 16, 32, 64), (1, 1, 1, 1), (1, 1, 2, 2), 32),
}
PATCH_SIZES, STRIDES = (7, 3, 3, 3), (4, 2, 2, 2)


class MixAttention(nn.Module):
    """Efficient self-attention: queries from every token, keys/values from a ``sr``-times reduced grid."""

    hidden: int
    heads: int
    sr: int
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int], *, train: bool) -> Array:
        b, n, c = x.shape
        dense = lambda name: nn.Dense(self.hidden, kernel_init=_DENSE_INIT, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=name)
        kv = x
        if self.sr > 1:
            kv = nn.Conv(c, (self.sr, self.sr), strides=(self.sr, self.sr), padding="VALID", dtype=self.dtype,
                         param_dtype=self.param_dtype, name="sr")(x.reshape(b, *hw, c)).reshape(b, -1, c)
            kv = nn.LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(kv)
        d = c // self.heads
        q = dense("query")(x).reshape(b, n, self.heads, d)
        k = dense("key")(kv).reshape(b, -1, self.heads, d)
        v = dense("value")(kv).reshape(b, -1, self.heads, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * d**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        probs = nn.Dropout(self.attention_dropout, deterministic=not train)(probs)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c)
        return dense("proj")(out)


class MixBlock(nn.Module):
    """Pre-norm transformer layer: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MixFFN(LN(x)))``."""

    hidden: int
    heads: int
    sr: int
    mlp_ratio: int
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int], *, train: bool) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Stochastic depth: one Bernoulli draw per example, broadcast over tokens and channels.
        drop = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)(y)  # noqa: E731
        y = nn.LayerNorm(1e-5, name="norm1", **kw)(x)
        x = x + drop(MixAttention(self.hidden, self.heads, self.sr, self.attention_dropout, name="attn", **kw)(
            y, hw, train=train))
        y = nn.LayerNorm(1e-5, name="norm2", **kw)(x)
        width = self.hidden * self.mlp_ratio
        y = nn.Dense(width, kernel_init=_DENSE_INIT, name="fc1", **kw)(y)
        b, n, _ = y.shape
        y = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=width, name="dwconv", **kw)(
            y.reshape(b, *hw, width)).reshape(b, n, width)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.hidden, kernel_init=_DENSE_INIT, name="fc2", **kw)(y)
        return x + drop(y)


class MixTransformer(nn.Module):
    """MiT encoder: ``images [B, H, W, C] -> 4 feature maps`` at 1/4, 1/8, 1/16, 1/32 with ``hidden_sizes``."""

    variant: str = "b0"
    drop_path_rate: float = 0.1
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> list[Array]:
        spec = VARIANTS[self.variant]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        total = sum(spec.depths)
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        features, index = [], 0
        for s in range(4):
            k = PATCH_SIZES[s]
            x = nn.Conv(spec.hidden_sizes[s], (k, k), strides=(STRIDES[s],) * 2, padding=((k // 2, k // 2),) * 2,
                        name=f"patch_embed_{s}_proj", **kw)(x)
            b, h, w, c = x.shape
            x = nn.LayerNorm(1e-5, name=f"patch_embed_{s}_norm", **kw)(x.reshape(b, h * w, c))
            for j in range(spec.depths[s]):
                x = MixBlock(c, spec.num_heads[s], spec.sr_ratios[s], spec.mlp_ratio, rates[index],
                             self.attention_dropout, name=f"block_{s}_{j}", **kw)(x, (h, w), train=train)
                index += 1
            x = nn.LayerNorm(1e-5, name=f"norm_{s}", **kw)(x).reshape(b, h, w, c)
            features.append(x)
        return features


@register_model("segformer")
class SegFormer(nn.Module):
    """SegFormer: ``images [B, H, W, C_in] -> SegmentationOutput`` (float32 logits ``[B, H, W, num_classes]``).

    H and W must be multiples of 32. Parameter counts (3 input channels, ``num_classes=1``; from ``jax.eval_shape``,
    equal to HuggingFace ``SegformerForSemanticSegmentation`` with one label): B0 3,714,401 (encoder 3,319,392),
    B1 13,677,505, B2 27,347,393 (see tests/test_transformers.py).

    Attributes:
        num_classes: output channels of the logits.
        variant: ``'b0'``, ``'b1'``, ``'b2'`` (the MiT sizes of the paper) or ``'tiny'`` (tests only).
        drop_path_rate: stochastic depth of the last encoder layer (linearly from 0; paper 0.1).
        dropout_rate: dropout before the classifier (paper 0.1).
        attention_dropout: dropout on attention probabilities (paper 0).
        bn_axis_name: mesh axis over which the decoder's BatchNorm statistics are averaged.
        dtype: computation dtype; logits are returned in float32. param_dtype: parameter dtype.
    """

    num_classes: int = 1
    variant: str = "b0"
    drop_path_rate: float = 0.1
    dropout_rate: float = 0.1
    attention_dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # Read by anemia_jax.training.steps: the decoder's BatchNorm must be synchronised over the data axis.
    norm = "batch"
    # Its encoder loads HuggingFace ``nvidia/mit-b*`` MiT encoder weights (`anemia_jax.models.base.ModelCapabilities`).
    capabilities = ModelCapabilities(pretrained="hf_mit")
    # H and W must be multiples of this (the last MiT stage is at 1/32).
    input_multiple = 32

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"SegFormer.variant must be one of {tuple(VARIANTS)}; got {self.variant!r}.")
        for field in ("drop_path_rate", "dropout_rate", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"SegFormer.{field} must be in [0, 1); got {getattr(self, field)!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> SegmentationOutput:
        """Segments a batch; ``train`` enables BatchNorm batch statistics, dropout and stochastic depth (rng
        ``'dropout'``)."""
        check_images(images, 5, type(self).__name__)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        spec = VARIANTS[self.variant]
        features = MixTransformer(self.variant, self.drop_path_rate, self.attention_dropout, name="encoder",
                                  **kw)(images, train=train)
        b, h4, w4, _ = features[0].shape
        dh = spec.decoder_hidden
        maps = []
        for s, f in enumerate(features):
            y = nn.Dense(dh, kernel_init=_DENSE_INIT, name=f"linear_c{s}", **kw)(f)
            if y.shape[1:3] != (h4, w4):
                y = jax.image.resize(y, (b, h4, w4, dh), "bilinear").astype(y.dtype)
            maps.append(y)
        x = nn.Conv(dh, (1, 1), use_bias=False, name="linear_fuse", **kw)(jnp.concatenate(maps[::-1], axis=-1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                         name="bn", **kw)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        logits = nn.Conv(self.num_classes, (1, 1), name="head", **kw)(x).astype(jnp.float32)
        logits = jax.image.resize(logits, (b, *images.shape[1:3], self.num_classes), "bilinear")
        return SegmentationOutput.single(logits)
