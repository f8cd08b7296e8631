"""Tests of the encoder fine-tuning options of anemia_jax.training.optim: freezing, learning-rate multiplier, unchanged
state."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from anemia_jax.training import optim


def config(**extra):
    c = ml_collections.ConfigDict(dict(learning_rate=1e-2, end_lr_ratio=0.1, weight_decay=1e-2, b1=0.9, b2=0.999,
                                       eps=1e-8, grad_clip_norm=1.0))
    c.update(extra)
    return c


PARAMS = {"encoder": {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}},
          "head": {"kernel": jnp.ones((1, 1, 4, 1)), "bias": jnp.zeros(1)}}


def grads(step):
    return jax.tree.map(lambda p: jnp.full(p.shape, 0.1 * (step + 1), p.dtype), PARAMS)


def run(tx, steps):
    params, state, history = PARAMS, tx.init(PARAMS), []
    for step in range(steps):
        updates, state = tx.update(grads(step), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return history


def test_defaults_keep_the_optimizer_state_structure():
    """Checkpoints written before these options existed must restore: same transformation, same state tree."""
    tx, _ = optim.make_optimizer(config(), total_steps=10, warmup_steps=2)
    tx_explicit, _ = optim.make_optimizer(config(encoder_lr_multiplier=1.0, freeze_encoder_steps=0), total_steps=10,
                                          warmup_steps=2)
    schedule = optim.make_schedule(config(), total_steps=10, warmup_steps=2)
    before = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=optim.decay_mask))
    reference = jax.tree.structure(before.init(PARAMS))
    assert jax.tree.structure(tx.init(PARAMS)) == reference
    assert jax.tree.structure(tx_explicit.init(PARAMS)) == reference
    # A model without an encoder is fine with the defaults.
    tx.init({"encoder_0": PARAMS["head"], "head": PARAMS["head"]})


def test_freeze_then_multiplier():
    steps = 4
    base = run(optim.make_optimizer(config(), total_steps=10, warmup_steps=2)[0], steps)
    tuned = run(optim.make_optimizer(config(freeze_encoder_steps=2, encoder_lr_multiplier=0.1), total_steps=10,
                                     warmup_steps=2)[0], steps)
    for step in range(steps):
        for leaf in ("kernel", "bias"):
            # Decoder/head updates are untouched; params differ after a frozen step only in the encoder, and the
            # head's Adam update does not depend on the encoder's (grads are fixed, clipping is global but equal).
            np.testing.assert_allclose(tuned[step]["head"][leaf], base[step]["head"][leaf], rtol=1e-6, atol=1e-9)
        encoder = tuned[step]["encoder"]["conv"]["kernel"]
        if step < 2:
            np.testing.assert_array_equal(encoder, 0.0)
        else:
            assert np.abs(encoder).max() > 0
    # Once thawed, a step's encoder update is 0.1x the plain one taken from the same parameters.
    base_tx = optim.make_optimizer(config(), total_steps=10, warmup_steps=2)[0]
    slow_tx = optim.make_optimizer(config(encoder_lr_multiplier=0.1), total_steps=10, warmup_steps=2)[0]
    plain, _ = base_tx.update(grads(0), base_tx.init(PARAMS), PARAMS)
    slow, _ = slow_tx.update(grads(0), slow_tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(slow["encoder"]["conv"]["kernel"], 0.1 * plain["encoder"]["conv"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(slow["head"]["kernel"], plain["head"]["kernel"], rtol=1e-6)


def test_encoder_options_need_an_encoder():
    tx, _ = optim.make_optimizer(config(freeze_encoder_steps=5), total_steps=10, warmup_steps=2)
    with pytest.raises(ValueError, match="need a model with an 'encoder' parameter scope"):
        tx.init({"encoder_0": PARAMS["head"], "head": PARAMS["head"]})
    with pytest.raises(ValueError, match=">= 0"):
        optim.make_optimizer(config(encoder_lr_multiplier=-1.0), total_steps=10, warmup_steps=2)
