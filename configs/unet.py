"""U-Net (Ronneberger et al. 2015) on the conjunctiva masks.

    python -m anemia_jax.main --config=configs/unet.py
    python -m anemia_jax.main --config=configs/unet.py:data=phantom,size=128,steps=500

The argument keys (data, size, fold, loco, batch, epochs, steps, dtype, seed, test) are documented in
configs/common.py.
"""

import ml_collections

from anemia_jax import config_lib

common = config_lib.import_sibling(__file__, "common")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The U-Net training config; ``arg`` as in configs/common.py."""
    config, args = common.base_config(arg, name="unet")
    config.model = ml_collections.ConfigDict(dict(
        name="unet",
        features=64,  # 64-128-256-512-1024: the original U-Net, 31.0 M parameters.
        depth=4,
        norm="batch",
        upsample="transpose",
        dropout_rate=0.0,
    ))
    if args.test:
        config.model.features = 4
        config.model.depth = 2
    return config
