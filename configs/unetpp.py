"""UNet++ (Zhou et al. 2018) with deep supervision on the conjunctiva masks.

    python -m anemia_jax.main --config=configs/unetpp.py
    python -m anemia_jax.main --config=configs/unetpp.py:data=phantom,size=256,fold=0

The argument keys (data, size, fold, loco, batch, epochs, steps, dtype, seed, test) are documented in
configs/common.py. Deep supervision trains a head on every X^{0,j}; the loss is the weighted sum over those outputs
(`loss.deep_supervision_weights`, shallowest first), and evaluation scores the deepest output.
"""

from configs import common

MODEL = dict(
    name="unetpp",
    features=32,  # 32-64-128-256-512 as in the paper: 9.0 M parameters.
    depth=4,
    norm="batch",
    upsample="transpose",
    dropout_rate=0.0,
    deep_supervision=True,
)
TEST_MODEL = dict(features=4, depth=2)
# One weight per output X^{0,1}..X^{0,depth}; equal weights as in the paper.
LOSS = dict(deep_supervision_weights=(0.25, 0.25, 0.25, 0.25))
TEST_LOSS = dict(deep_supervision_weights=(0.5, 0.5))


def get_config(arg: str | None = None):
    """The UNet++ training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="unetpp", model=MODEL, test_model=TEST_MODEL, loss=LOSS,
                               test_loss=TEST_LOSS)
