"""UNet++ with a ResNet-34 encoder and segmentation_models_pytorch's decoder (``smp.UnetPlusPlus('resnet34')``).

    python -m anemia_jax.main --config=configs/unetpp_resnet34.py:data=phantom
    python -m anemia_jax.main --config=configs/unetpp_resnet34.py --config.model.pretrained=PATH \
        --config.optimizer.encoder_lr_multiplier=0.1

One head (as smp's model: no deep supervision, no pruning). ``--config.model.encoder=resnet18|resnet50`` swaps the
encoder. The argument keys are documented in configs/common.py. Image sizes must be multiples of 32.
"""

from configs import common

MODEL = dict(
    name="unetpp",
    encoder="resnet34",  # 26.1 M parameters with the decoder, as smp.UnetPlusPlus('resnet34').
    decoder_channels=(256, 128, 64, 32, 16),
    pretrained="",  # '' trains from scratch; a weight file (anemia_jax.training.pretrained) initialises the encoder.
)
TEST_MODEL = dict(encoder="resnet_tiny", decoder_channels=(32, 16, 16, 8, 8))


def get_config(arg: str | None = None):
    """The UNet++-ResNet34 training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="unetpp_resnet34", model=MODEL, test_model=TEST_MODEL)
