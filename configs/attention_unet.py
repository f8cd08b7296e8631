"""Attention U-Net (Oktay et al. 2018): U-Net with additive attention gates on the skip connections.

    python -m anemia_jax.main --config=configs/attention_unet.py
    python -m anemia_jax.main --config=configs/attention_unet.py:data=kvasir

The argument keys (data, size, fold, loco, batch, epochs, steps, dtype, seed, test) are documented in
configs/common.py.
"""

import ml_collections

from anemia_jax import config_lib

common = config_lib.import_sibling(__file__, "common")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Attention U-Net training config; ``arg`` as in configs/common.py."""
    config, args = common.base_config(arg, name="attention_unet")
    config.model = ml_collections.ConfigDict(dict(
        name="attention_unet",
        features=64,  # 64-128-256-512-1024 like U-Net, plus the gates: 32.1 M parameters.
        depth=4,
        norm="batch",
        upsample="transpose",
        dropout_rate=0.0,
    ))
    if args.test:
        config.model.features = 4
        config.model.depth = 2
    return config
