"""U-Net (Ronneberger et al. 2015) on the conjunctiva masks.

    python -m anemia_jax.main --config=configs/unet.py
    python -m anemia_jax.main --config=configs/unet.py:data=phantom,size=128,steps=500

The argument keys (data, size, fold, loco, batch, epochs, steps, dtype, seed, test) are documented in
configs/common.py.
"""

from configs import common

MODEL = dict(
    name="unet",
    features=64,  # 64-128-256-512-1024: the original U-Net, 31.0 M parameters.
    depth=4,
    norm="batch",
    upsample="transpose",
    dropout_rate=0.0,
)
TEST_MODEL = dict(features=4, depth=2)


def get_config(arg: str | None = None):
    """The U-Net training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="unet", model=MODEL, test_model=TEST_MODEL)
