"""Attention U-Net (Oktay et al. 2018): U-Net with additive attention gates on the skip connections.

    python -m anemia_jax.main --config=configs/attention_unet.py
    python -m anemia_jax.main --config=configs/attention_unet.py:data=kvasir

The argument keys (data, size, fold, loco, batch, epochs, steps, dtype, seed, test) are documented in
configs/common.py.
"""

from configs import common

MODEL = dict(
    name="attention_unet",
    features=64,  # 64-128-256-512-1024 like U-Net, plus the gates: 32.1 M parameters.
    depth=4,
    norm="batch",
    upsample="transpose",
    dropout_rate=0.0,
)
TEST_MODEL = dict(features=4, depth=2)


def get_config(arg: str | None = None):
    """The Attention U-Net training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="attention_unet", model=MODEL, test_model=TEST_MODEL)
