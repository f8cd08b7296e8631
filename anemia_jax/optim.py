"""The optimizer the trainer builds from ``config.optimizer``: global-norm clipping, then AdamW on a schedule.

Schedule: linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
``learning_rate * end_lr_ratio`` at ``total_steps`` (`optax.warmup_cosine_decay_schedule`). Weight decay is
decoupled (AdamW) and, unless ``decay_norm_and_bias`` is set, skips every parameter with fewer than two dimensions
(biases, normalisation scales and offsets): decaying those only fights the normalisation.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

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


def make_optimizer(
    config: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax transformation and its learning-rate schedule.

    Args:
        config: ``config.optimizer``: ``learning_rate``, ``end_lr_ratio``, ``weight_decay``, ``b1``, ``b2``,
            ``eps``, ``grad_clip_norm`` (0 disables clipping) and optionally ``decay_norm_and_bias``.
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
    return optax.chain(*parts), schedule
