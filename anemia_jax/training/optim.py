"""The optimizer the trainer builds from ``config.optimizer``: global-norm clipping, then AdamW on a schedule.

Schedule: linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
``learning_rate * end_lr_ratio`` at ``total_steps`` (`optax.warmup_cosine_decay_schedule`). Weight decay is
decoupled (AdamW) and, unless ``decay_norm_and_bias`` is set, skips every parameter with fewer than two dimensions
(biases, normalisation scales and offsets): decaying those only fights the normalisation.

Fine-tuning a pretrained encoder (the ``encoder`` parameter subtree, `anemia_jax.models.resnet.ENCODER_SCOPE`, that
`anemia_jax.training.pretrained` fills): ``encoder_lr_multiplier`` (default 1) scales the encoder's updates, i.e. its
learning rate and its weight decay, and ``freeze_encoder_steps`` (default 0) zeroes them for the first N updates. Adam's
moments keep accumulating the encoder's gradients while it is frozen (they are ready when it thaws), and its BatchNorm
statistics keep updating in training mode. With both at their defaults the transformation, and so the optimizer state of
a checkpoint, is exactly the one without these options.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from anemia_jax.models.resnet import ENCODER_SCOPE

PyTree = Any


def make_schedule(config: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step (number of updates applied so far).

    Args:
        config: ``config.optimizer`` (``learning_rate``, ``end_lr_ratio``).
        total_steps: training length; the cosine reaches its end value there.
        warmup_steps: linear warm-up length, clipped to ``total_steps - 1`` so a short run still decays.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    warmup = max(0, min(int(warmup_steps), total_steps - 1))
    peak = float(config.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=total_steps, end_value=peak * float(config.end_lr_ratio))


def decay_mask(params: PyTree) -> PyTree:
    """True for the parameters weight decay applies to: kernels (ndim >= 2), not biases or norm parameters."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def encoder_mask(params: PyTree) -> PyTree:
    """True for the parameters of the model's encoder (top-level scope ``'encoder'``).

    Raises:
        ValueError: the model has no encoder scope (encoder options would silently do nothing).
    """
    if ENCODER_SCOPE not in params:
        raise ValueError(
            f"optimizer.encoder_lr_multiplier / freeze_encoder_steps need a model with an {ENCODER_SCOPE!r} "
            f"parameter scope (unet/unetpp with encoder=resnet18/34/50, segformer, transunet); this model's "
            f"top-level scopes are {sorted(params)[:8]}. Remove those options or pick such a model.")
    return {k: jax.tree.map(lambda _: k == ENCODER_SCOPE, v) for k, v in params.items()}


def encoder_update_scale(multiplier: float, freeze_steps: int) -> optax.GradientTransformation:
    """Multiplies the encoder's updates by 0 for the first ``freeze_steps`` updates, then by ``multiplier``."""
    def factor(count: jax.Array) -> jax.Array:
        return jnp.where(count < freeze_steps, 0.0, multiplier)

    return optax.masked(optax.scale_by_schedule(factor), encoder_mask)


def make_optimizer(
    config: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax transformation and its learning-rate schedule.

    Args:
        config: ``config.optimizer``: ``learning_rate``, ``end_lr_ratio``, ``weight_decay``, ``b1``, ``b2``,
            ``eps``, ``grad_clip_norm`` (0 disables clipping) and optionally ``decay_norm_and_bias``,
            ``encoder_lr_multiplier`` (1.0) and ``freeze_encoder_steps`` (0) (see the module docstring).
        total_steps: training length in steps.
        warmup_steps: linear warm-up length in steps.

    Returns:
        ``(tx, schedule)``; ``schedule(step)`` is what the progress line reports.
    """
    schedule = make_schedule(config, total_steps=total_steps, warmup_steps=warmup_steps)
    mask = None if config.get("decay_norm_and_bias", False) else decay_mask
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(config.b1), b2=float(config.b2), eps=float(config.eps),
                             weight_decay=float(config.weight_decay), mask=mask))
    multiplier = float(config.get("encoder_lr_multiplier", 1.0))
    freeze = int(config.get("freeze_encoder_steps", 0))
    if multiplier < 0 or freeze < 0:
        raise ValueError(f"optimizer.encoder_lr_multiplier ({multiplier}) and freeze_encoder_steps ({freeze}) "
                         "must be >= 0.")
    if multiplier != 1.0 or freeze > 0:
        parts.append(encoder_update_scale(multiplier, freeze))
    return optax.chain(*parts), schedule
