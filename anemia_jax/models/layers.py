"""Building blocks shared by the U-Net family: conv blocks, normalisation, up/down-sampling, heads.

Conventions used throughout `anemia_jax.models`:

* Images and feature maps are NHWC, ``[batch, height, width, channels]``.
* ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``); parameters are kept in ``param_dtype``
  (float32 by default) and cast on use by the Flax layers. Feature maps, and therefore every
  skip-connection concatenation, stay in the computation dtype; only the final logits are cast to
  float32 so that losses always see float32.
* BatchNorm statistics live in the ``'batch_stats'`` collection and, when ``bn_axis_name`` is set,
  are averaged over that mesh axis (e.g. ``'data'`` under ``shard_map``), so every shard normalises
  with the statistics of the global batch.
* Dropout draws from the ``'dropout'`` rng collection and is active only when ``train=True``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from anemia_jax.models.base import ModelCapabilities

Array = jax.Array
Dtype = Any

NORMS = ("batch", "group", "none")
UPSAMPLES = ("transpose", "resize")

# He initialisation suits the ReLU that follows every 3x3 convolution in a block.
_CONV_INIT = nn.initializers.he_normal()
# Every output pixel of a 2x2 stride-2 transposed conv sees exactly one tap per input channel, so
# its fan-in is C_in (not 4 * C_in): exclude the spatial axes from the fan computation.
_UP_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0, 1))


def check_images(images: Array, depth: int, model: str) -> None:
    """Static checks of an input batch (shape and dtype only, so it works under `jax.jit`).

    Args:
        images: ``[B, H, W, C]`` floating-point images.
        depth: number of 2x2 poolings; H and W must be multiples of ``2**depth``.
        model: class name, used in the error messages.

    Raises:
        ValueError: if the input is not 4-D or H, W are not multiples of ``2**depth``.
        TypeError: if the images are not floating point (e.g. raw uint8).
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"{model} expects NHWC images [batch, height, width, channels]; got shape {shape}. "
            "Add a batch axis (images[None]) for a single image."
        )
    multiple = 2**depth
    if shape[1] % multiple or shape[2] % multiple:
        raise ValueError(
            f"{model} with depth={depth} needs image height and width divisible by {multiple} "
            f"(2**depth); got images of shape {shape}. Resize or pad the images to a multiple "
            f"of {multiple}, or use a smaller depth."
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{model} expects floating-point images (e.g. float32 in [0, 1]); got dtype "
            f"{images.dtype}. Convert uint8 images first (anemia_jax.data.normalization.to_float)."
        )


def group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (GroupNorm's group count)."""
    for groups in range(min(channels, max_groups), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling with stride 2: ``[B, H, W, C] -> [B, H/2, W/2, C]`` (H, W even).

    Written as reshape + max rather than ``nn.max_pool``: the gradient of a plain reduction is an
    elementwise select that XLA fuses, whereas ``reduce_window``'s gradient (``select_and_scatter``)
    is a slow standalone kernel on GPUs (U-Net train step +4% on an H100). Gradient ties inside a
    window are shared equally instead of going to one element; both are valid subgradients.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvTranspose2x2(nn.Module):
    """2x2 stride-2 transposed convolution: ``[B, H, W, C_in] -> [B, 2H, 2W, features]``.

    The same function, with the same parameters (``kernel [2, 2, C_in, features]``, ``bias
    [features]``), as ``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')``, so
    variables are interchangeable. With stride equal to kernel size every input pixel emits its
    own 2x2 output patch, so the layer is a 1x1 convolution to ``4 * features`` channels followed
    by depth-to-space. XLA lowers ``nn.ConvTranspose`` to a convolution over a zero-dilated input
    instead; on an H100 (bf16, batch 32, 256x256) this formulation made the UNet++ train step
    1.6x and the U-Net step 1.2x faster.

    Attributes:
        features: output channels.
        dtype: computation dtype; param_dtype: parameter dtype.
        kernel_init, bias_init: initialisers (default: LeCun normal with fan-in ``C_in``; zeros).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = _UP_INIT
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        f = self.features
        kernel = self.param("kernel", self.kernel_init, (2, 2, c, f), self.param_dtype)
        bias = self.param("bias", self.bias_init, (f,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        # nn.ConvTranspose (transpose_kernel=False) applies the spatially flipped kernel: output
        # offset (p, q) inside a patch uses kernel[1 - p, 1 - q]. Channel order after the reshape
        # is (p, q, feature), matching the depth-to-space below.
        kernel = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(1, 1, c, 4 * f)
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y.reshape(b, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f)
        return y + bias


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv3x3(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _kernel_grad_by_output_channels(x: Array, dy: Array) -> Array:
    """Weight gradient of `_conv3x3`, ``[3, 3, C_in, C_out]``, computed as a convolution over ``dy``.

    XLA computes a weight gradient as a convolution whose batch is one operand's channels and whose
    contraction runs over the examples, so its CPU backend first transposes that operand to
    ``[C, H, W, B]`` (the batch becomes the minor axis, a slow gather) and the other to
    ``[H, W, B, C]`` (a cheap row copy). Autodiff chooses ``x`` for the slow side; this formulation
    chooses ``dy``, whose channels are fewer than ``x``'s after every skip concatenation and equal
    elsewhere, and so also packs fewer image patches. Same sums, another order: equal to float
    tolerance (tests/test_models.py).
    """
    # out[o, p, q, i] = sum_{b,h,w} dy_pad[b, h + p, w + q, o] * x[b, h, w, i]: a correlation of the
    # zero-padded dy (batch = dy's channels, features = examples) with x as the kernel.
    spec = jax.lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(0, 3, 1, 2))
    out = jax.lax.conv_general_dilated(dy, x, (1, 1), ((1, 1), (1, 1)), dimension_numbers=spec)
    # out[o, p, q, i] is the kernel tap (2 - p, 2 - q).
    return out[:, ::-1, ::-1, :].transpose(1, 2, 3, 0)


@jax.custom_vjp
def conv3x3_cpu(x: Array, kernel: Array) -> Array:
    """3x3, stride-1, zero-padded ('SAME') NHWC convolution whose weight gradient suits XLA's CPU backend.

    The same function as ``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')`` with NHWC / HWIO
    layouts; only the backward pass differs: when ``C_in >= C_out`` the kernel gradient is
    `_kernel_grad_by_output_channels`. Reverse-mode only (``jax.grad``, ``jax.vjp``); forward-mode
    autodiff (``jax.jvp``) is not defined for it. `ConvBlock` uses it on the CPU backend only.

    Args:
        x: ``[B, H, W, C_in]``; kernel: ``[3, 3, C_in, C_out]``.

    Returns:
        ``[B, H, W, C_out]``.
    """
    return _conv3x3(x, kernel)


def _conv3x3_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    dx = jax.vjp(lambda x: _conv3x3(x, kernel), x)[1](dy)[0]
    if x.shape[-1] >= dy.shape[-1]:
        dkernel = _kernel_grad_by_output_channels(x, dy)
    else:  # fewer input channels (an encoder's first conv): autodiff's own choice is the cheaper one
        dkernel = jax.vjp(lambda k: _conv3x3(x, k), kernel)[1](dy)[0]
    return dx, dkernel.astype(kernel.dtype)


conv3x3_cpu.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _conv3x3_for_flax(lhs: Array, rhs: Array, window_strides: Any, padding: Any, lhs_dilation: Any = None,
                      rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
                      precision: Any = None) -> Array:
    """`conv3x3_cpu` behind ``nn.Conv``'s ``conv_general_dilated`` hook, for the one case it covers."""
    plain = (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1) and feature_group_count == 1
             and padding in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)]) and precision is None
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain:
        raise ValueError("conv3x3_cpu covers 3x3, stride-1, 'SAME', undilated, ungrouped NHWC convolutions only.")
    # Inside shard_map (check_vma) the replicated kernel meets per-device images. Autodiff would vary
    # it implicitly and sum its gradient over devices in the transpose; a custom_vjp rule must return
    # a gradient of its input's type, so the kernel is varied here, outside the rule, and that cast's
    # transpose does the sum.
    axes = _varying_axes(lhs) - _varying_axes(rhs)
    if axes:
        rhs = jax.lax.pcast(rhs, tuple(sorted(axes)), to="varying")
    return conv3x3_cpu(lhs, rhs)


def _varying_axes(x: Array) -> frozenset[str]:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def conv3x3_impl() -> Any:
    """``nn.Conv(conv_general_dilated=...)`` for a 3x3 'SAME' conv on the default backend, at trace time.

    The CPU backend gets `conv3x3_cpu` (see experiments/results/cpu_speed); GPUs and TPUs keep
    ``lax.conv_general_dilated`` (None), whose backward pass their compilers already lay out well.
    Parameters are the same either way.
    """
    return _conv3x3_for_flax if jax.default_backend() == "cpu" else None


def upsample_2x(
    x: Array,
    features: int,
    *,
    method: str,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> Array:
    """Doubles H and W and maps channels to ``features``; must be called inside a compact method.

    ``'transpose'``: a 2x2 stride-2 transposed convolution with bias (`ConvTranspose2x2`), as in
    Ronneberger et al.
    ``'resize'``: bilinear resize followed by a 3x3 convolution (with bias), which avoids the
    checkerboard artefacts transposed convolutions can produce.

    Args:
        x: ``[B, H, W, C]`` feature map.
        features: output channels.
        method: ``'transpose'`` or ``'resize'``.
        dtype: computation dtype; param_dtype: parameter dtype.
        name: name of the convolution's parameter scope in the calling module.

    Returns:
        ``[B, 2H, 2W, features]`` in ``dtype``.
    """
    if method == "transpose":
        return ConvTranspose2x2(features, dtype=dtype, param_dtype=param_dtype, name=name)(x)
    if method == "resize":
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear").astype(x.dtype)
        return nn.Conv(features, (3, 3), dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv3x3_impl(),
                       name=name)(x)
    raise ValueError(f"upsample must be one of {UPSAMPLES}; got {method!r}.")


def logits_head(x: Array, num_classes: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> Array:
    """1x1 convolution to ``num_classes`` logits, returned as float32 ``[B, H, W, num_classes]``."""
    logits = nn.Conv(num_classes, (1, 1), dtype=dtype, param_dtype=param_dtype, name=name)(x)
    return logits.astype(jnp.float32)


class ConvBlock(nn.Module):
    """Two (3x3 conv -> norm -> ReLU) layers, then optional dropout: ``[B,H,W,C] -> [B,H,W,features]``.

    The convolutions carry no bias when a normalisation follows (the norm's shift makes it redundant),
    exactly as in the PyTorch reference models.

    Attributes:
        features: output channels of both convolutions.
        norm: ``'batch'``, ``'group'`` or ``'none'``.
        norm_groups: upper bound on GroupNorm's group count (the largest divisor of ``features`` that
            does not exceed it is used, so narrow test models work too).
        dropout_rate: dropout after the block, active only with ``train=True`` (0 disables it).
        bn_axis_name: mesh axis over which BatchNorm statistics are averaged (None: local batch).
        dtype: computation dtype; param_dtype: parameter dtype.
    """

    features: int
    norm: str = "batch"
    norm_groups: int = 32
    dropout_rate: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _norm(self, x: Array, train: bool, name: str) -> Array:
        if self.norm == "batch":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                axis_name=self.bn_axis_name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)
        if self.norm == "group":
            return nn.GroupNorm(
                num_groups=group_count(self.features, self.norm_groups),
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)
        return x

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        use_bias = self.norm == "none"
        for k in (1, 2):
            x = nn.Conv(
                self.features,
                (3, 3),
                use_bias=use_bias,
                kernel_init=_CONV_INIT,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_general_dilated=conv3x3_impl(),
                name=f"conv{k}",
            )(x)
            x = nn.relu(self._norm(x, train, f"norm{k}"))
        if self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x


class SegmentationModel(nn.Module):
    """Fields and helpers shared by `UNet`, `UNetPlusPlus` and `AttentionUNet`.

    Attributes:
        num_classes: output channels of the logits (1 for a binary mask, C for C multi-label masks).
        features: width of the first level; level ``i`` has ``features * 2**i`` channels.
        depth: number of 2x2 poolings (the encoder has ``depth + 1`` levels); H and W of the input
            must be multiples of ``2**depth``.
        norm: ``'batch'`` (BatchNorm, momentum 0.9, epsilon 1e-5), ``'group'`` (GroupNorm) or ``'none'``.
        norm_groups: maximum GroupNorm group count (see `ConvBlock`).
        upsample: ``'transpose'`` (2x2 stride-2 transposed conv) or ``'resize'`` (bilinear + 3x3 conv).
        dropout_rate: dropout after every conv block in training (0 disables it; rng ``'dropout'``).
        bn_axis_name: mesh axis name over which BatchNorm statistics are synchronised (e.g. ``'data'``
            when the model runs per shard inside ``shard_map``); None uses the local batch.
        dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are always returned in float32.
        param_dtype: parameter dtype (float32 by default, also under bfloat16 computation).
    """

    num_classes: int = 1
    features: int = 64
    depth: int = 4
    norm: str = "batch"
    norm_groups: int = 32
    upsample: str = "transpose"
    dropout_rate: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for field, value in (("num_classes", self.num_classes), ("features", self.features),
                             ("depth", self.depth), ("norm_groups", self.norm_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{field} must be a positive int; got {value!r}.")
        if self.norm not in NORMS:
            raise ValueError(f"{cls}.norm must be one of {NORMS}; got {self.norm!r}.")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"{cls}.upsample must be one of {UPSAMPLES}; got {self.upsample!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"{cls}.dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")
        super().__post_init__()

    @property
    def input_multiple(self) -> int:
        """H and W of the input must be multiples of this: ``2**depth`` (every level halves the resolution), or 32
        with a ResNet encoder (``encoder`` field of U-Net / UNet++: five stride-2 stages)."""
        return 32 if getattr(self, "encoder", None) else 2**self.depth

    @property
    def capabilities(self) -> ModelCapabilities:
        """What this model supports (`anemia_jax.models.base.ModelCapabilities`): none of the extras by default; a
        ResNet ``encoder`` field (U-Net, UNet++) loads timm's pretrained ResNet weights."""
        encoder = getattr(self, "encoder", None)
        pretrained = "timm_resnet" if encoder and encoder.startswith("resnet") and encoder != "resnet_tiny" else None
        return ModelCapabilities(pretrained=pretrained)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of levels ``0..depth``: ``features * 2**i``."""
        return tuple(self.features * 2**i for i in range(self.depth + 1))

    def block(self, features: int, name: str) -> ConvBlock:
        """A `ConvBlock` configured from this model's fields (call from a compact method)."""
        return ConvBlock(
            features,
            norm=self.norm,
            norm_groups=self.norm_groups,
            dropout_rate=self.dropout_rate,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def encode(self, images: Array, *, train: bool, levels: int | None = None,
               scope: str = "encoder_{}") -> list[Array]:
        """The contracting path (call from a compact method): level ``i`` is a `ConvBlock` of
        ``widths[i]`` channels, applied to the images (``i = 0``) or to the 2x2 max pool of level
        ``i - 1``.

        Args:
            images: ``[B, H, W, C_in]`` floating-point images (checked by the caller).
            train: training mode, passed to every block.
            levels: how many levels to build, ``1..depth + 1`` (default ``depth + 1``, all of them;
                pruned UNet++ stops earlier).
            scope: parameter scope of level ``i``, as ``scope.format(i)``; the names are part of
                the checkpoint format, so each model keeps its own.

        Returns:
            The feature map of each level, ``[B, H / 2**i, W / 2**i, widths[i]]`` for ``i = 0..levels-1``.
        """
        levels = self.depth + 1 if levels is None else levels
        features, x = [], images
        for i, width in enumerate(self.widths[:levels]):
            if i:
                x = max_pool_2x2(x)
            x = self.block(width, scope.format(i))(x, train=train)
            features.append(x)
        return features

    def up(self, x: Array, features: int, name: str) -> Array:
        """`upsample_2x` with this model's method and dtypes."""
        return upsample_2x(x, features, method=self.upsample, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)

    def head(self, x: Array, name: str) -> Array:
        """`logits_head` with this model's ``num_classes`` and dtypes: float32 logits."""
        return logits_head(x, self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


def field_names(cls: type[nn.Module]) -> tuple[str, ...]:
    """Constructor fields of a Flax module class, without Flax's internal ``parent``."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "parent")

