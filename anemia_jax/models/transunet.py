"""TransUNet (Chen et al. 2021): a ResNet-50 + ViT-B/16 hybrid encoder and a cascaded upsampler with skips.

Reference: J. Chen, Y. Lu, Q. Yu, X. Luo, E. Adeli, Y. Wang, L. Lu, A. L. Yuille, Y. Zhou, "TransUNet: Transformers
Make Strong Encoders for Medical Image Segmentation", arXiv:2102.04306, and its code (github.com/Beckschen/TransUNet,
``networks/vit_seg_modeling*.py``), which this module follows layer for layer:

* Hybrid encoder: the BiT-style ResNet-50 of google-research/vision_transformer (weight-standardised convolutions,
  GroupNorm with 32 groups, eps 1e-6, stages of 3, 4 and 9 bottleneck units, no BatchNorm), as TransUNet builds it:
  a 3x3/2 max-pool without padding (the 1/4 skip is zero-padded at the bottom/right to H/4), stride on the 3x3
  convolution, and the projection's GroupNorm per channel with eps 1e-5 (TransUNet's ``GroupNorm(cout, cout)``; the
  original Flax model used 32 groups and eps 1e-6: a difference TransUNet's pretrained weights are fine-tuned
  through). Then a 1x1 patch embedding (16x16 on the image for the ViT-only variant), learned position embeddings,
  ``num_layers`` pre-norm transformer layers (LayerNorm eps 1e-6, exact GELU) and a final LayerNorm.
* Decoder ("cascaded upsampler"): conv3x3-BN-ReLU to ``head_channels`` at 1/16, then per block a bilinear 2x
  upsampling (align_corners=True, as PyTorch's ``UpsamplingBilinear2d``), concatenation of the ResNet feature at that
  resolution (the first ``n_skip`` blocks: 1/8, 1/4, 1/2) and two conv3x3-BN-ReLU; a 3x3 convolution gives the logits.

Parameter names inside ``encoder`` are those of the ``.npz`` checkpoints (``conv_root``, ``gn_root``,
``block1/unit1/conv1``, ``embedding``, ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query``, ...), so
`anemia_jax.training.pretrained` loads ``R50+ViT-B_16.npz`` / ``ViT-B_16.npz`` by name. The position embeddings are a
parameter ``[1, H/16, W/16, hidden]`` sized by the ``init`` images and resized bilinearly when called on another size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anemia_jax.models.base import ModelCapabilities, SegmentationOutput, register_model
from anemia_jax.models.layers import check_images, group_count

Array = jax.Array
Dtype = Any


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` linear-interpolation weights with corners aligned (PyTorch ``align_corners=True``,
    ``scipy.ndimage.zoom(order=1)``): output ``o`` samples input position ``o * (n_in - 1) / (n_out - 1)``."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - lo
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m


def _upsample_align_corners(x: Array) -> Array:
    _, h, w, _ = x.shape
    mh = jnp.asarray(align_corners_matrix(h, 2 * h), x.dtype)
    mw = jnp.asarray(align_corners_matrix(w, 2 * w), x.dtype)
    return jnp.einsum("pw,bhwc->bhpc", mw, jnp.einsum("oh,bhwc->bowc", mh, x))


class StdConv(nn.Module):
    """Convolution with weight standardisation (per output channel, eps 1e-5 under the square root), no bias."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel
        w = self.param("kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], self.features), self.param_dtype)
        w = w.astype(jnp.float32)
        mean = w.mean(axis=(0, 1, 2), keepdims=True)
        var = w.var(axis=(0, 1, 2), keepdims=True)
        w = ((w - mean) / jnp.sqrt(var + 1e-5)).astype(self.dtype)
        p = self.padding
        return jax.lax.conv_general_dilated(x.astype(self.dtype), w, (self.stride,) * 2, ((p, p), (p, p)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Bottleneck(nn.Module):
    """TransUNet's ResNet unit: StdConv 1x1 -> GN -> ReLU -> StdConv 3x3 (strided) -> GN -> ReLU -> StdConv 1x1 -> GN,
    plus the (projected) input, then ReLU; ``4 * mid`` output channels."""

    mid: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = 4 * self.mid
        gn = lambda c, name: nn.GroupNorm(num_groups=group_count(c, 32), epsilon=1e-6, name=name, **kw)  # noqa: E731
        residual = x
        if self.stride != 1 or x.shape[-1] != out:
            residual = StdConv(out, 1, self.stride, name="conv_proj", **kw)(x)
            residual = nn.GroupNorm(num_groups=out, epsilon=1e-5, name="gn_proj", **kw)(residual)
        y = nn.relu(gn(self.mid, "gn1")(StdConv(self.mid, 1, name="conv1", **kw)(x)))
        y = nn.relu(gn(self.mid, "gn2")(StdConv(self.mid, 3, self.stride, 1, name="conv2", **kw)(y)))
        y = gn(out, "gn3")(StdConv(out, 1, name="conv3", **kw)(y))
        return nn.relu(residual + y)


class EncoderBlock(nn.Module):
    """Pre-norm ViT layer with the checkpoint's submodule names (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
    ``LayerNorm_2``, ``MlpBlock_3``)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = x.shape[-1]
        head_dim = hidden // self.num_heads
        init = nn.initializers.xavier_uniform()
        y = nn.LayerNorm(1e-6, name="LayerNorm_0", **kw)(x)

        class Attention(nn.Module):
            @nn.compact
            def __call__(self_, y: Array) -> Array:  # noqa: N805
                proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), kernel_init=init,  # noqa: E731
                                                    name=name, **kw)
                q, k, v = proj("query")(y), proj("key")(y), proj("value")(y)
                logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
                probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
                probs = nn.Dropout(self.attention_dropout_rate, deterministic=not train)(probs)
                out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
                out = nn.DenseGeneral(hidden, axis=(-2, -1), kernel_init=init, name="out", **kw)(out)
                return nn.Dropout(self.attention_dropout_rate, deterministic=not train)(out)

        x = x + Attention(name="MultiHeadDotProductAttention_1")(y)
        y = nn.LayerNorm(1e-6, name="LayerNorm_2", **kw)(x)

        class Mlp(nn.Module):
            @nn.compact
            def __call__(self_, y: Array) -> Array:  # noqa: N805
                drop = nn.Dropout(self.dropout_rate, deterministic=not train)
                y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=init, name="Dense_0", **kw)(y), approximate=False)
                return drop(nn.Dense(hidden, kernel_init=init, name="Dense_1", **kw)(drop(y)))

        return x + Mlp(name="MlpBlock_3")(y)


class ResNetStage(nn.Module):
    """``units`` bottleneck units named ``unit1..`` (the checkpoint's ``block{i}/unit{j}``), the first strided."""

    units: int
    mid: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for u in range(self.units):
            x = Bottleneck(self.mid, self.stride if u == 0 else 1, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"unit{u + 1}")(x)
        return x


class Transformer(nn.Module):
    """Position embeddings, ``num_layers`` `EncoderBlock` s (``encoderblock_{i}``) and ``encoder_norm`` over a token
    grid ``[B, gh, gw, hidden] -> [B, gh * gw, hidden]``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        b, gh, gw, c = x.shape

        class PositionEmbedding(nn.Module):
            @nn.compact
            def __call__(self_, x: Array) -> Array:  # noqa: N805
                if self_.has_variable("params", "pos_embedding"):  # read as stored: its grid is init's
                    pe = self_.get_variable("params", "pos_embedding")
                else:
                    pe = self_.param("pos_embedding", nn.initializers.normal(0.02), (1, gh, gw, c),
                                     self.param_dtype)
                if pe.shape[1:3] != (gh, gw):  # called on another image size than init's
                    pe = jax.image.resize(pe, (1, gh, gw, c), "bilinear")
                return x + pe.astype(x.dtype)

        x = PositionEmbedding(name="posembed_input")(x).reshape(b, gh * gw, c)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f"encoderblock_{i}")(x, train=train)
        return nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)


class TransUNetEncoder(nn.Module):
    """Hybrid (or ViT-only) encoder: ``images -> (tokens [B, H/16, W/16, hidden], skips [1/8, 1/4, 1/2])``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    resnet_layers: tuple[int, ...]
    resnet_width: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> tuple[Array, list[Array]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = x.shape
        skips: list[Array] = []
        patch = self.patch_size
        if self.resnet_layers:
            width = self.resnet_width
            x = StdConv(width, 7, 2, 3, name="conv_root", **kw)(x)
            x = nn.relu(nn.GroupNorm(num_groups=group_count(width, 32), epsilon=1e-6, name="gn_root", **kw)(x))
            skips.append(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            for i, units in enumerate(self.resnet_layers):
                x = ResNetStage(units, width * 2**i, 2 if i else 1, name=f"block{i + 1}", **kw)(x)
                if i < len(self.resnet_layers) - 1:
                    # TransUNet zero-pads a skip that the unpadded max-pool left one row/column short.
                    gh, gw = h // 2 ** (i + 2), w // 2 ** (i + 2)
                    skips.append(jnp.pad(x, ((0, 0), (0, gh - x.shape[1]), (0, gw - x.shape[2]), (0, 0))))
            patch = patch // 2 ** (len(self.resnet_layers) + 1)
        x = nn.Conv(self.hidden_size, (patch, patch), strides=(patch, patch), padding="VALID", name="embedding",
                    **kw)(x)
        gh, gw = x.shape[1:3]
        x = Transformer(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                        self.attention_dropout_rate, name="Transformer", **kw)(x, train=train)
        return x.reshape(b, gh, gw, self.hidden_size), skips[::-1]


@register_model("transunet")
class TransUNet(nn.Module):
    """TransUNet: ``images [B, H, W, C_in] -> SegmentationOutput`` (float32 logits ``[B, H, W, num_classes]``).

    The defaults are the paper's R50-ViT-B_16 with 3 skips. H and W must be multiples of ``patch_size`` (16).
    ``transunet_vit`` is the ViT-only variant (``resnet_layers=()``: 16x16 patches of the image, no skips).
    Parameter counts (3 input channels, 1 class) equal TransUNet's PyTorch ``VisionTransformer`` at the same image
    size: 105,275,921 (R50-ViT-B_16) and 91,673,041 (ViT-B_16) at 224 px, +46,080 at 256 px (the position
    embeddings grow with the image: ``hidden_size`` per 16x16 patch); see tests/test_transformers.py.

    Attributes:
        num_classes: output channels of the logits.
        hidden_size, num_layers, num_heads, mlp_dim: the ViT (B/16: 768, 12, 12, 3072).
        patch_size: token stride in pixels, ``2 ** len(decoder_channels)`` (16); with a ResNet it is reached by
            the ResNet's 1/16 output and a 1x1 embedding.
        resnet_layers: bottleneck units per ResNet stage ((3, 4, 9) for R50; () for the ViT-only variant).
        resnet_width: the ResNet's stem width (64).
        decoder_channels: output channels of the upsampling blocks ((256, 128, 64, 16)).
        head_channels: channels of the first decoder convolution (512).
        n_skip: how many ResNet features feed the decoder (0..3; ignored without a ResNet).
        dropout_rate: dropout after the embeddings and in the MLPs (0.1); attention_dropout_rate: on attention
            probabilities and the attention output (0.0).
        bn_axis_name: mesh axis over which the decoder's BatchNorm statistics are averaged.
        dtype: computation dtype; logits are returned in float32. param_dtype: parameter dtype.
    """

    num_classes: int = 1
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    resnet_layers: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 64
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    head_channels: int = 512
    n_skip: int = 3
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # Read by anemia_jax.training.steps: the decoder's BatchNorm must be synchronised over the data axis.
    norm = "batch"
    # Its encoder loads google-research/vision_transformer ``.npz`` (R50+)ViT-B/16 weights (`anemia_jax.models.base.ModelCapabilities`).
    capabilities = ModelCapabilities(pretrained="vit_npz")

    @property
    def input_multiple(self) -> int:
        """H and W of the input must be multiples of this: the token stride, ``patch_size``."""
        return int(self.patch_size)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if self.patch_size != 2 ** len(self.decoder_channels):
            raise ValueError(f"{cls}: patch_size ({self.patch_size}) must be 2**len(decoder_channels) "
                             f"(= {2 ** len(self.decoder_channels)}) for the decoder to reach the input size.")
        if self.resnet_layers and (len(self.resnet_layers) != 3 or self.patch_size != 16):
            raise ValueError(f"{cls}: the hybrid encoder has 3 ResNet stages and patch_size 16 (1/16 features); "
                             f"got resnet_layers={self.resnet_layers!r}, patch_size={self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{cls}: hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads}.")
        if not 0 <= self.n_skip <= 3:
            raise ValueError(f"{cls}.n_skip must be in 0..3; got {self.n_skip}.")
        for field in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{cls}.{field} must be in [0, 1); got {getattr(self, field)!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> SegmentationOutput:
        """Segments a batch; ``train`` enables BatchNorm batch statistics and dropout (rng ``'dropout'``)."""
        check_images(images, int(np.log2(self.patch_size)), type(self).__name__)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, skips = TransUNetEncoder(self.hidden_size, self.num_layers, self.num_heads, self.mlp_dim, self.patch_size,
                                    tuple(self.resnet_layers), self.resnet_width, self.dropout_rate,
                                    self.attention_dropout_rate, name="encoder", **kw)(images, train=train)

        def conv_bn_relu(x: Array, features: int, name: str) -> Array:
            x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=name, **kw)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                             name=f"{name}_bn", **kw)(x)
            return nn.relu(x)

        x = conv_bn_relu(x, self.head_channels, "conv_more")
        for i, width in enumerate(self.decoder_channels):
            x = _upsample_align_corners(x)
            if i < min(self.n_skip, len(skips)):
                x = jnp.concatenate([x, skips[i].astype(x.dtype)], axis=-1)
            x = conv_bn_relu(conv_bn_relu(x, width, f"decoder_{i}_conv1"), width, f"decoder_{i}_conv2")
        logits = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), name="head", **kw)(x)
        return SegmentationOutput.single(logits.astype(jnp.float32))


@register_model("transunet_vit")
class TransUNetViT(TransUNet):
    """TransUNet with the ViT-B/16-only encoder (``resnet_layers=()``): 16x16 image patches, no skips."""

    resnet_layers: tuple[int, ...] = ()
    n_skip: int = 0
