"""ResNet encoders (He et al. 2016) and the U-Net / UNet++ decoders segmentation_models_pytorch builds on them.

The encoder follows the torchvision / timm layout exactly (ResNet-18/34 with BasicBlocks, ResNet-50 with v1.5
Bottlenecks, stride on the 3x3 convolution): stem conv 7x7/2 + BatchNorm + ReLU, max-pool 3x3/2, four stages. Padding
is explicit and symmetric as in PyTorch (Flax's 'SAME' pads stride-2 layers asymmetrically), so pretrained weights
give the reference's features to float tolerance. Parameter names map 1:1 to the PyTorch keys, with the dots of a
module path joined by '_' inside a stage: ``layer2.0.downsample.1.weight`` -> ``layer2_0/downsample_1/scale``
(`anemia_jax.training.pretrained` does the conversion).

The decoders are segmentation_models_pytorch 0.6's ``Unet`` and ``UnetPlusPlus`` (Yakubovskiy), built from the
encoder's features ``[images, stem (/2), layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32)]``: nearest 2x
upsampling, concatenation of the skips, two conv3x3-BN-ReLU per block, decoder channels (256, 128, 64, 32, 16) by
default, and a 3x3 convolution as segmentation head. `anemia_jax.models.unet.UNet` and
`anemia_jax.models.unetpp.UNetPlusPlus` delegate here when their ``encoder`` field names an encoder of `ENCODERS`.

Parameter scopes: the encoder under ``encoder`` (`ENCODER_SCOPE`: the subtree pretrained weights replace and the
optimizer can freeze or slow down), decoder blocks ``block_{i}`` (U-Net) or ``x_{d}_{l}`` (UNet++, smp's node
names), ``head``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anemia_jax.models.layers import check_images

Array = jax.Array
Dtype = Any

# The top-level parameter scope that holds a model's (pretrainable) encoder; see anemia_jax.training.optim.
ENCODER_SCOPE = "encoder"
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)

# PyTorch's default initialisation for ResNets (kaiming_normal_, mode='fan_out', ReLU gain).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A ResNet architecture: block type, blocks per stage, stem width."""

    block: str  # 'basic' or 'bottleneck'
    layers: tuple[int, int, int, int]
    width: int = 64

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the features ``[stem, layer1..layer4]`` (smp's ``out_channels`` without the image)."""
        expansion = 4 if self.block == "bottleneck" else 1
        return (self.width, *(self.width * 2**i * expansion for i in range(4)))


ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec("basic", (2, 2, 2, 2)),
    "resnet34": EncoderSpec("basic", (3, 4, 6, 3)),
    "resnet50": EncoderSpec("bottleneck", (3, 4, 6, 3)),
    # One BasicBlock per stage at width 8: for tests and CPU smoke runs only (no pretrained weights exist).
    "resnet_tiny": EncoderSpec("basic", (1, 1, 1, 1), width=8),
}


def encoder_spec(name: str) -> EncoderSpec:
    """The `EncoderSpec` of a name of `ENCODERS`; an unknown name fails listing the valid ones."""
    if name not in ENCODERS:
        raise ValueError(f"Unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}.")
    return ENCODERS[name]


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


class _Layers(nn.Module):
    """Shared constructor helpers (conv without bias, BatchNorm as PyTorch's: eps 1e-5, momentum 0.1)."""

    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, x: Array, features: int, k: int, stride: int, name: str) -> Array:
        return nn.Conv(features, (k, k), strides=(stride, stride), padding=_pad(k), use_bias=False,
                       kernel_init=_CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    def bn(self, x: Array, train: bool, name: str) -> Array:
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)


class BasicBlock(_Layers):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34); ``features`` output channels."""

    features: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        residual = x
        y = nn.relu(self.bn(self.conv(x, self.features, 3, self.stride, "conv1"), train, "bn1"))
        y = self.bn(self.conv(y, self.features, 3, 1, "conv2"), train, "bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = self.bn(self.conv(x, self.features, 1, self.stride, "downsample_0"), train, "downsample_1")
        return nn.relu(y + residual)


class Bottleneck(_Layers):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convolutions with a residual; ``4 * features`` output channels."""

    features: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        out = 4 * self.features
        residual = x
        y = nn.relu(self.bn(self.conv(x, self.features, 1, 1, "conv1"), train, "bn1"))
        y = nn.relu(self.bn(self.conv(y, self.features, 3, self.stride, "conv2"), train, "bn2"))
        y = self.bn(self.conv(y, out, 1, 1, "conv3"), train, "bn3")
        if self.stride != 1 or x.shape[-1] != out:
            residual = self.bn(self.conv(x, out, 1, self.stride, "downsample_0"), train, "downsample_1")
        return nn.relu(y + residual)


class ResNet(_Layers):
    """ResNet feature extractor: ``images [B, H, W, C] -> [stem, layer1, layer2, layer3, layer4]``.

    Feature ``i`` is ``[B, H / 2**(i+1), W / 2**(i+1), spec.channels[i]]`` (H, W multiples of 32 keep every size
    exact); the stem feature is taken after its ReLU, before the max-pool, as smp's encoders do.

    Attributes:
        arch: a key of `ENCODERS` (``'resnet18'``, ``'resnet34'``, ``'resnet50'``, ``'resnet_tiny'``).
        bn_axis_name, dtype, param_dtype: as in `anemia_jax.models.layers.SegmentationModel`.
    """

    arch: str = "resnet34"

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> list[Array]:
        spec = encoder_spec(self.arch)
        block = BasicBlock if spec.block == "basic" else Bottleneck
        x = nn.relu(self.bn(self.conv(x, spec.width, 7, 2, "conv1"), train, "bn1"))
        features = [x]
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        for stage, blocks in enumerate(spec.layers):
            for b in range(blocks):
                x = block(features=spec.width * 2**stage, stride=2 if stage and not b else 1,
                          bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"layer{stage + 1}_{b}")(x, train=train)
            features.append(x)
        return features


class DecoderBlock(_Layers):
    """smp's decoder block: nearest 2x upsampling, ``concat[x, skip]``, two conv3x3-BN-ReLU."""

    features: int = 16

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, *, train: bool) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if skip is not None:
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for k in (1, 2):
            x = nn.relu(self.bn(self.conv(x, self.features, 3, 1, f"conv{k}"), train, f"bn{k}"))
        return x


def _check(model: nn.Module, images: Array, decoder_channels: Sequence[int]) -> None:
    name = f"{type(model).__name__}(encoder={model.encoder!r})"
    encoder_spec(model.encoder)
    check_images(images, 5, name)
    if model.norm != "batch":
        raise ValueError(f"{name}: the ResNet encoder and smp decoder use BatchNorm; got norm={model.norm!r}. "
                         "Leave norm='batch' (the default) with an encoder.")
    if len(decoder_channels) != 5 or any(not isinstance(c, int) or c < 1 for c in decoder_channels):
        raise ValueError(f"{name}: decoder_channels must be 5 positive ints (one per upsampling); "
                         f"got {decoder_channels!r}.")


def _encode(model: nn.Module, images: Array, train: bool) -> list[Array]:
    return ResNet(arch=model.encoder, bn_axis_name=model.bn_axis_name, dtype=model.dtype, param_dtype=model.param_dtype,
                  name=ENCODER_SCOPE)(images, train=train)


def _block(model: nn.Module, features: int, name: str) -> DecoderBlock:
    return DecoderBlock(features=features, bn_axis_name=model.bn_axis_name, dtype=model.dtype,
                        param_dtype=model.param_dtype, name=name)


def _head(model: nn.Module, x: Array) -> Array:
    logits = nn.Conv(model.num_classes, (3, 3), padding=_pad(3), dtype=model.dtype, param_dtype=model.param_dtype,
                     name="head")(x)
    return logits.astype(jnp.float32)


def smp_unet(model: nn.Module, images: Array, *, train: bool) -> Array:
    """smp ``Unet(encoder)``'s forward pass inside ``model``'s compact method; returns float32 logits.

    ``model`` provides ``encoder``, ``decoder_channels``, ``num_classes``, ``norm``, ``bn_axis_name``, ``dtype`` and
    ``param_dtype`` (`UNet` does). Block ``i`` upsamples and concatenates the encoder feature of the next finer
    resolution (none for the last block, which reaches the input resolution).
    """
    _check(model, images, model.decoder_channels)
    features = _encode(model, images, train)[::-1]  # deepest first: layer4, layer3, layer2, layer1, stem
    x = features[0]
    for i, width in enumerate(model.decoder_channels):
        skip = features[i + 1] if i + 1 < len(features) else None
        x = _block(model, width, f"block_{i}")(x, skip, train=train)
    return _head(model, x)


def smp_unetpp(model: nn.Module, images: Array, *, train: bool) -> Array:
    """smp ``UnetPlusPlus(encoder)``'s forward pass inside ``model``'s compact method; returns float32 logits.

    Node ``x_{d}_{l}`` (smp's names) upsamples ``x_{d}_{l-1}`` (or encoder feature ``d``) and concatenates the
    nodes ``x_{d+1..l}_{l}`` and encoder feature ``l + 1``; node ``x_{d}_{l}`` has ``decoder_channels[l]`` channels
    when ``d = 0`` and the channels of encoder feature ``l + 1`` otherwise (as smp sizes them).
    """
    _check(model, images, model.decoder_channels)
    feats = _encode(model, images, train)[::-1]
    skip_channels = [f.shape[-1] for f in feats[1:]]
    n = len(model.decoder_channels) - 1
    dense: dict[tuple[int, int], Array] = {}

    def node(d: int, layer: int, x: Array, skip: Array | None) -> Array:
        width = model.decoder_channels[layer] if d == 0 else skip_channels[layer]
        return _block(model, width, f"x_{d}_{layer}")(x, skip, train=train)

    for layer_idx in range(n):
        for d in range(n - layer_idx):
            if layer_idx == 0:
                dense[d, d] = node(d, d, feats[d], feats[d + 1])
            else:
                top = d + layer_idx
                cat = [dense[idx, top] for idx in range(d + 1, top + 1)] + [feats[top + 1]]
                dense[d, top] = node(d, top, dense[d, top - 1], jnp.concatenate(cat, axis=-1))
    x = node(0, n, dense[0, n - 1], None)
    return _head(model, x)
