"""SegFormer (Xie et al. 2021): Mix Transformer encoder (MiT-B0..B2) and an all-MLP decoder at 1/4, upsampled.

    python -m anemia_jax.main --config=configs/segformer.py:data=phantom
    python -m anemia_jax.main --config=configs/segformer.py --config.model.variant=b2 \
        --config.model.pretrained=~/weights/mit-b2.safetensors --config.optimizer.learning_rate=6e-5

The argument keys are documented in configs/common.py. Image sizes must be multiples of 32.
"""

from configs import common

MODEL = dict(
    name="segformer",
    variant="b0",  # b0 3.7 M, b1 13.7 M, b2 27.3 M parameters.
    drop_path_rate=0.1,
    dropout_rate=0.1,
    attention_dropout=0.0,
    pretrained="",  # '' trains from scratch; nvidia/mit-bN model.safetensors (anemia_jax.training.pretrained) initialises MiT.
)
TEST_MODEL = dict(variant="tiny")


def get_config(arg: str | None = None):
    """The SegFormer training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="segformer", model=MODEL, test_model=TEST_MODEL)
