"""U-Net with a ResNet-34 encoder and segmentation_models_pytorch's decoder (``smp.Unet('resnet34')``).

    python -m anemia_jax.main --config=configs/unet_resnet34.py:data=phantom
    # From ImageNet weights (timm's resnet34.tv_in1k model.safetensors; see the README's "Pretrained weights"):
    python -m anemia_jax.main --config=configs/unet_resnet34.py --config.model.pretrained=~/weights/resnet34.safetensors \
        --config.optimizer.encoder_lr_multiplier=0.1

``--config.model.encoder=resnet18|resnet50`` swaps the encoder. The argument keys (data, size, fold, loco, batch,
epochs, steps, dtype, seed, test) are documented in configs/common.py. Image sizes must be multiples of 32.
"""

from configs import common

MODEL = dict(
    name="unet",
    encoder="resnet34",  # 24.4 M parameters with the decoder, as smp.Unet('resnet34').
    decoder_channels=(256, 128, 64, 32, 16),
    pretrained="",  # '' trains from scratch; a weight file (anemia_jax.training.pretrained) initialises the encoder.
)
TEST_MODEL = dict(encoder="resnet_tiny", decoder_channels=(32, 16, 16, 8, 8))


def get_config(arg: str | None = None):
    """The U-Net-ResNet34 training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="unet_resnet34", model=MODEL, test_model=TEST_MODEL)
