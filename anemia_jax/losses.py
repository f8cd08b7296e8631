"""Per-example segmentation losses: pure functions, jit-, vmap- and grad-safe.

Every loss has the signature ``fn(logits, labels, *, weights=None, **hyper) -> [B]``:

* ``logits``: ``[B, H, W, C]`` raw scores (any float dtype; more spatial axes, e.g. ``[B, D, H, W, C]``, work too).
  Binary and multi-label losses apply a sigmoid per channel; `softmax_cross_entropy` treats ``C`` as classes.
* ``labels``: same shape as ``logits``, values in ``{0, 1}`` (bool/uint8/float) or soft values in ``[0, 1]``.
* ``weights``: optional non-negative array of the same rank as ``logits`` whose axes are either 1 or the full size,
  e.g. ``[B, 1, 1, C]`` (``mask_weights[:, None, None, :]``: 0 excludes a missing mask) or ``[B, H, W, 1]``
  (0 excludes pixels). ``None`` means all ones.
* result: ``[B]``, float32 (float64 only when the logits are float64 with x64 enabled) so the caller picks the
  reduction over the batch. The computation runs in (at least) float32 even for bfloat16 logits and uses
  ``log_sigmoid``/``softplus`` forms, so ``|logits|`` of 1e4 give finite values and gradients.

Reductions, identical for every loss of a kind:

* pixel-wise losses (`sigmoid_cross_entropy`, `softmax_cross_entropy`, `focal_loss`): the weighted mean over
  pixels and channels of each example, ``sum(w * l) / max(sum(w), EPS)``.
* region losses (`dice_loss`, `jaccard_loss`, `tversky_loss`, `focal_tversky_loss`, `lovasz_hinge_loss`):
  computed per example and channel over the pixels, from weighted soft counts ``tp = sum(w p y)``,
  ``fp = sum(w p (1 - y))``, ``fn = sum(w (1 - p) y)`` with ``p = sigmoid(logits)``; then the plain mean over the
  channels that carry any weight (``sum(w) > 0`` over that channel's pixels).

Adding a loss: decorate ``fn(logits, labels, *, weights=None, <hyper>=<default>, ...) -> [B]`` with
``@register_loss("<name>")``, in this module or in one's own (imported by the config file that uses it). Its
keyword-only arguments are its hyper-parameters and their defaults (`loss_hyperparameters`): configs take them as
``--config.loss.<hyper>=<value>`` after ``--config.loss.name=<name>`` (`anemia_jax.runs.loss_config`).

Conventions: an example whose weights are all zero gives loss 0 with zero (never NaN) gradients. An empty
prediction against an empty label is a perfect region score, loss exactly 0 (``p == 0`` exactly, e.g. logits
``-1e4``; for `lovasz_hinge_loss`, any logits ``<= -1``), also with ``smooth=0``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from anemia_jax.utils.registry import Registry

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
LossFn = Callable[..., Array]

# Floor of the pixel-wise denominator: only matters when every weight of an example is 0 (then the numerator is 0
# too and the loss is exactly 0); real weights sum to far more.
EPS = 1e-8

# Name -> loss, declared beside each definition with `register_loss`; configs name losses from here.
LOSSES: Registry[LossFn] = Registry("loss")
register_loss = LOSSES.register

__all__ = [
    "EPS", "sigmoid_cross_entropy", "softmax_cross_entropy", "focal_loss", "dice_loss", "jaccard_loss",
    "tversky_loss", "focal_tversky_loss", "lovasz_hinge_loss", "combo_loss", "deep_supervision_loss",
    "LOSSES", "get_loss", "loss_hyperparameters", "loss_names", "register_loss",
]


# ----------------------------------------------------------------------------------------------- helpers


def _prepare(
    fn_name: str, logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None
) -> tuple[Array, Array, Array]:
    """Validates shapes (statically, so jit-safe) and returns float logits, labels and broadcast weights."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"{fn_name}: logits must be [B, H, W, C] (at least [B, C]); got shape {logits.shape}.")
    if labels.shape != logits.shape:
        raise ValueError(
            f"{fn_name}: labels shape {labels.shape} must equal logits shape {logits.shape} "
            "(one channel per mask; one-hot encode class indices with jax.nn.one_hot)."
        )
    # Float64 survives only when the caller enabled x64 (finite-difference checks); everything else -> float32.
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    if weights is None:
        w = jnp.ones(logits.shape, dtype)
    else:
        weights = jnp.asarray(weights)
        ok = weights.ndim == logits.ndim and all(a in (1, b) for a, b in zip(weights.shape, logits.shape))
        if not ok:
            raise ValueError(
                f"{fn_name}: weights shape {weights.shape} does not broadcast to logits shape {logits.shape}: "
                "use the same rank with size-1 axes, e.g. mask_weights[:, None, None, :] for per-mask [B, C] "
                "weights or [B, H, W, 1] for per-pixel weights."
            )
        w = jnp.broadcast_to(weights.astype(dtype), logits.shape)
    return logits.astype(dtype), labels.astype(dtype), w


def _check_hyper(fn_name: str, **values: Any) -> None:
    """Rejects negative Python-number hyper-parameters early (traced values are left alone, to stay jittable)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{fn_name}: {name} must be >= 0; got {value}.")


def _pixel_mean(per_pixel: Array, w: Array) -> Array:
    """``sum(w * l) / max(sum(w), EPS)`` over every axis but the batch axis -> [B]."""
    axes = tuple(range(1, per_pixel.ndim))
    return jnp.sum(w * per_pixel, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), EPS)


def _safe_ratio(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 1 (the 0/0 of two empty masks is a perfect score).

    The inner ``where`` keeps the unused branch finite, so gradients stay finite too.
    """
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1.0), 1.0)


def _soft_counts(logits: Array, labels: Array, w: Array) -> tuple[Array, Array, Array]:
    """Weighted soft tp, fp, fn over the spatial axes -> three [B, C] arrays."""
    p = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim - 1))
    tp = jnp.sum(w * p * labels, axis=axes)
    fp = jnp.sum(w * p * (1.0 - labels), axis=axes)
    fn = jnp.sum(w * (1.0 - p) * labels, axis=axes)
    return tp, fp, fn


def _channel_mean(per_channel: Array, w: Array) -> Array:
    """Mean of [B, C] values over the channels with any weight -> [B]; 0 for examples with none."""
    carries = jnp.sum(w, axis=tuple(range(1, w.ndim - 1))) > 0
    count = jnp.sum(carries, axis=-1)
    total = jnp.sum(jnp.where(carries, per_channel, 0.0), axis=-1)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _tversky_index(logits: Array, labels: Array, w: Array, *, alpha: float, beta: float, smooth: float) -> Array:
    """``(tp + smooth) / (tp + alpha fp + beta fn + smooth)`` per example and channel -> [B, C]."""
    tp, fp, fn = _soft_counts(logits, labels, w)
    return _safe_ratio(tp + smooth, tp + alpha * fp + beta * fn + smooth)


# ----------------------------------------------------------------------------------------- pixel-wise losses


@register_loss("sigmoid_cross_entropy")
def sigmoid_cross_entropy(
    logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None, pos_weight: ArrayLike | None = None
) -> Array:
    """Binary cross-entropy on sigmoid probabilities, weighted mean over pixels and channels -> [B].

    Per pixel ``l = -(pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x)))`` computed as
    ``pos_weight * y * softplus(-x) + (1 - y) * softplus(x)``. ``pos_weight`` (default 1) up-weights the positive
    term, a scalar or an array broadcastable to the logits (e.g. ``[C]`` per channel); it is not part of the
    normaliser ``sum(w)``.
    """
    x, y, w = _prepare("sigmoid_cross_entropy", logits, labels, weights)
    _check_hyper("sigmoid_cross_entropy", pos_weight=pos_weight)
    pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, x.dtype)
    return _pixel_mean(pw * y * jax.nn.softplus(-x) + (1.0 - y) * jax.nn.softplus(x), w)


@register_loss("softmax_cross_entropy")
def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None) -> Array:
    """Cross-entropy of a softmax over the channel (class) axis, for one-hot (or soft) labels -> [B].

    The channel axis is the class axis, so each pixel is one term: ``l = -sum_c y_c log softmax(x)_c``, weighted by
    the weight of its labelled class, ``w_pix = sum_c w_c y_c`` (so ``[B, 1, 1, C]`` weights act as class weights,
    ``[B, H, W, 1]`` weights as pixel weights, and pixels with all-zero labels are ignored). Result
    ``sum(w_pix * l) / max(sum(w_pix), EPS)`` over the pixels; for one-hot labels this is PyTorch's weighted
    ``CrossEntropyLoss`` mean. Needs ``C >= 2``.
    """
    x, y, w = _prepare("softmax_cross_entropy", logits, labels, weights)
    if x.shape[-1] < 2:
        raise ValueError(
            f"softmax_cross_entropy needs C >= 2 classes on the last axis; got shape {x.shape}. "
            "Use sigmoid_cross_entropy for a single binary channel."
        )
    log_p = jax.nn.log_softmax(x, axis=-1)
    axes = tuple(range(1, x.ndim))
    return jnp.sum(-w * y * log_p, axis=axes) / jnp.maximum(jnp.sum(w * y, axis=axes), EPS)


@register_loss("focal")
def focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
) -> Array:
    """Sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), pixel-wise mean -> [B].

    Per pixel ``l = -alpha_t (1 - p_t)^gamma log(p_t)``, written for soft labels as
    ``alpha y (1 - p)^gamma softplus(-x) + (1 - alpha)(1 - y) p^gamma softplus(x)``: ``alpha`` weighs the positive
    class (the paper's defaults ``gamma=2, alpha=0.25``); ``alpha=None`` weighs both classes 1. ``gamma=0,
    alpha=None`` is `sigmoid_cross_entropy`. The powers use ``exp(gamma * log_sigmoid(.))``, finite for any logits.
    Reduced like the other pixel-wise losses (weighted mean, not the paper's division by the positive count).
    """
    x, y, w = _prepare("focal_loss", logits, labels, weights)
    _check_hyper("focal_loss", gamma=gamma, alpha=alpha)
    if isinstance(alpha, (int, float)) and alpha > 1:
        raise ValueError(f"focal_loss: alpha must be in [0, 1] (or None); got {alpha}.")
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    pos = a_pos * y * jnp.exp(gamma * jax.nn.log_sigmoid(-x)) * jax.nn.softplus(-x)
    neg = a_neg * (1.0 - y) * jnp.exp(gamma * jax.nn.log_sigmoid(x)) * jax.nn.softplus(x)
    return _pixel_mean(pos + neg, w)


# --------------------------------------------------------------------------------------------- region losses

_REGION_DOC = """
    Computed per example and channel from weighted soft counts, then averaged over the channels that carry any
    weight; examples without any give 0. ``smooth`` (default 1.0) is added to numerator and denominator: it keeps
    near-empty predictions against empty labels close to loss 0 and the gradients bounded. An exactly empty
    prediction against an empty label (or an excluded channel) is loss 0 even with ``smooth=0``."""


@register_loss("dice")
def dice_loss(
    logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None, smooth: float = 1.0
) -> Array:
    """Soft Dice loss ``1 - (2 tp + smooth) / (2 tp + fp + fn + smooth)`` (Milletari et al. 2016) -> [B].
    """
    x, y, w = _prepare("dice_loss", logits, labels, weights)
    _check_hyper("dice_loss", smooth=smooth)
    return _channel_mean(1.0 - _tversky_index(x, y, w, alpha=0.5, beta=0.5, smooth=smooth / 2), w)


@register_loss("jaccard")
def jaccard_loss(
    logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None, smooth: float = 1.0
) -> Array:
    """Soft Jaccard (IoU) loss ``1 - (tp + smooth) / (tp + fp + fn + smooth)`` -> [B].
    """
    x, y, w = _prepare("jaccard_loss", logits, labels, weights)
    _check_hyper("jaccard_loss", smooth=smooth)
    return _channel_mean(1.0 - _tversky_index(x, y, w, alpha=1.0, beta=1.0, smooth=smooth), w)


@register_loss("tversky")
def tversky_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
) -> Array:
    """Tversky loss ``1 - (tp + smooth) / (tp + alpha fp + beta fn + smooth)`` (Salehi et al. 2017) -> [B].

    ``alpha`` weighs false positives and ``beta`` false negatives, as in the paper (whose best setting,
    ``alpha=0.3, beta=0.7``, is the default); ``alpha = beta = 1`` is `jaccard_loss`, ``alpha = beta = 0.5`` is
    `dice_loss` with twice this ``smooth``.
    """
    x, y, w = _prepare("tversky_loss", logits, labels, weights)
    _check_hyper("tversky_loss", alpha=alpha, beta=beta, smooth=smooth)
    return _channel_mean(1.0 - _tversky_index(x, y, w, alpha=alpha, beta=beta, smooth=smooth), w)


@register_loss("focal_tversky")
def focal_tversky_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 0.75,
    smooth: float = 1.0,
) -> Array:
    """Focal Tversky loss ``(1 - TI)^gamma`` (Abraham & Khan 2019) with TI the Tversky index of `tversky_loss` -> [B].

    Exponent convention: ``gamma`` IS the exponent. The paper writes ``(1 - TI)^(1/gamma_paper)`` and recommends
    ``gamma_paper = 4/3``, i.e. the default ``gamma = 0.75`` here (as in the authors' code); ``gamma=1`` is
    `tversky_loss`. ``alpha`` weighs false positives and ``beta`` false negatives, as in `tversky_loss`; the
    paper's ``alpha=0.7`` on false negatives is the default ``beta=0.7`` here. The power is guarded at
    ``1 - TI = 0``, where ``gamma < 1`` would give an infinite derivative.
    """
    x, y, w = _prepare("focal_tversky_loss", logits, labels, weights)
    _check_hyper("focal_tversky_loss", alpha=alpha, beta=beta, gamma=gamma, smooth=smooth)
    u = 1.0 - _tversky_index(x, y, w, alpha=alpha, beta=beta, smooth=smooth)
    pos = u > 0  # also drops a rounding-level negative 1 - TI, which a fractional power would turn into NaN
    return _channel_mean(jnp.where(pos, jnp.where(pos, u, 1.0) ** gamma, 0.0), w)


for _fn in (dice_loss, jaccard_loss, tversky_loss, focal_tversky_loss):
    _fn.__doc__ = _fn.__doc__.rstrip() + "\n" + _REGION_DOC + "\n    "
del _fn


@register_loss("lovasz_hinge")
def lovasz_hinge_loss(logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None) -> Array:
    """Binary Lovasz hinge loss (Berman et al. 2018, "The Lovasz-Softmax loss"), per image and channel -> [B].

    For each example and channel: hinge errors ``e = 1 - x (2 y - 1)`` sorted in decreasing order, dotted with the
    gradient of the Lovasz extension of the Jaccard loss, ``loss = sum_i relu(e_(i)) (J_i - J_(i-1))``, where
    ``J_i`` is the Jaccard loss when the first ``i`` sorted pixels are mispredicted (the paper's ``per_image=True``
    form). Pixel weights act as pixel multiplicities inside the Jaccard set function, so a weight of 0 removes a
    pixel exactly like the paper's ``ignore`` label. Labels should be binary; then averaged over the channels that
    carry any weight (0 for examples without any). An empty label with all logits ``<= -1`` gives exactly 0.
    """
    x, y, w = _prepare("lovasz_hinge_loss", logits, labels, weights)
    b, c = x.shape[0], x.shape[-1]

    def rows(a: Array) -> Array:  # one row per (example, channel): [B*C, N]
        return jnp.moveaxis(a, -1, 1).reshape(b * c, -1)

    errors = 1.0 - rows(x) * (2.0 * rows(y) - 1.0)
    order = jnp.argsort(-errors, axis=-1)
    errors = jnp.take_along_axis(errors, order, axis=-1)
    y_s, w_s = jnp.take_along_axis(rows(y), order, axis=-1), jnp.take_along_axis(rows(w), order, axis=-1)
    gts = jnp.sum(w_s * y_s, axis=-1, keepdims=True)
    intersection = gts - jnp.cumsum(w_s * y_s, axis=-1)
    union = gts + jnp.cumsum(w_s * (1.0 - y_s), axis=-1)
    # union == 0 only before the first weighted pixel of an empty-label row: no error yet, J = 0.
    jaccard = 1.0 - _safe_ratio(intersection, union)
    lovasz_grad = jax.lax.stop_gradient(jnp.diff(jaccard, axis=-1, prepend=0.0))
    per_channel = jnp.sum(jax.nn.relu(errors) * lovasz_grad, axis=-1).reshape(b, c)
    return _channel_mean(per_channel, w)


# -------------------------------------------------------------------------------------------- combinations


@register_loss("combo")
def combo_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
    pos_weight: ArrayLike | None = None,
    smooth: float = 1.0,
) -> Array:
    """``ce_weight * sigmoid_cross_entropy + dice_weight * dice_loss`` (a combo loss, cf. Taghanaki et al. 2019).

    Each term keeps its own reduction (pixel-wise mean; mean over weighted channels), both with the same
    ``weights``; ``pos_weight`` goes to the cross-entropy and ``smooth`` to Dice. Returns [B].
    """
    _check_hyper("combo_loss", ce_weight=ce_weight, dice_weight=dice_weight)
    ce = sigmoid_cross_entropy(logits, labels, weights=weights, pos_weight=pos_weight)
    return ce_weight * ce + dice_weight * dice_loss(logits, labels, weights=weights, smooth=smooth)


def deep_supervision_loss(
    loss_fn: LossFn,
    logits_list: Sequence[ArrayLike],
    labels: ArrayLike,
    weights: Sequence[float] | ArrayLike | None = None,
    *,
    pixel_weights: ArrayLike | None = None,
) -> Array:
    """Weighted sum of one loss over several outputs of the same resolution (e.g. UNet++ X^{0,1}..X^{0,4}) -> [B].

    Args:
      loss_fn: any loss of this module (or `get_loss(...)` result), ``(logits, labels, *, weights) -> [B]``.
      logits_list: the outputs, each ``[B, H, W, C]`` shaped exactly like ``labels``; nothing is resized.
      labels: ``[B, H, W, C]``.
      weights: PER-OUTPUT weights, a length-``len(logits_list)`` sequence used as given (not normalised);
        ``None`` averages the outputs (each ``1 / len(logits_list)``).
      pixel_weights: the usual per-pixel / per-mask ``weights`` of `loss_fn`, passed to every output.
    """
    outputs = list(logits_list) if isinstance(logits_list, (list, tuple)) else None
    if not outputs:
        raise ValueError("deep_supervision_loss: logits_list must be a non-empty list or tuple of logits arrays.")
    labels = jnp.asarray(labels)
    for i, out in enumerate(outputs):
        if jnp.shape(out) != labels.shape:
            raise ValueError(
                f"deep_supervision_loss: output {i} has shape {jnp.shape(out)} but labels have {labels.shape}; "
                "all outputs must already be at the label resolution (this function resizes nothing)."
            )
    k = len(outputs)
    output_weights = jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights)
    if output_weights.shape != (k,):
        raise ValueError(
            f"deep_supervision_loss: weights are per-output weights and must have shape ({k},) for {k} outputs; "
            f"got shape {output_weights.shape}. Pass per-pixel or per-mask weights as pixel_weights=."
        )
    losses = [loss_fn(out, labels, weights=pixel_weights) for out in outputs]
    return sum(output_weights[i].astype(l.dtype) * l for i, l in enumerate(losses))


# -------------------------------------------------------------------------------------------------- registry


def loss_names() -> tuple[str, ...]:
    """The names `get_loss` accepts."""
    return LOSSES.names()


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """``{hyper-parameter: default}`` of the loss registered as ``name``: its keyword-only arguments other than
    ``weights`` (e.g. ``{'alpha': 0.3, 'beta': 0.7, 'smooth': 1.0}`` for 'tversky'). This is where a loss declares
    its hyper-parameters; configs show and validate exactly these (`anemia_jax.runs.loss_config`).

    Raises:
        ValueError: an unknown name (the message lists the close and the valid names).
    """
    fn = LOSSES.get(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "weights"}


def get_loss(name: str, **kwargs: Any) -> LossFn:
    """Looks a loss up by name and binds its hyper-parameters -> ``fn(logits, labels, *, weights=None) -> [B]``.

    Names: those of `LOSSES` ('sigmoid_cross_entropy', 'softmax_cross_entropy', 'dice', 'jaccard', 'tversky',
    'focal', 'focal_tversky', 'lovasz_hinge', 'combo'). ``kwargs`` are the keyword hyper-parameters of that function
    (`loss_hyperparameters`; e.g. ``get_loss('tversky', alpha=0.3, beta=0.7)``); an unknown name raises ValueError,
    an unknown or misspelt hyper-parameter TypeError, both listing what is valid.
    """
    fn = LOSSES.get(name)
    valid = list(loss_hyperparameters(name))
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise TypeError(
            f"Loss {name!r} has no hyper-parameter(s) {', '.join(map(repr, bad))}; "
            f"valid: {', '.join(valid) if valid else 'none'}."
        )
    return functools.partial(fn, **kwargs)
