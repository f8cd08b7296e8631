"""TransUNet (Chen et al. 2021): R50-ViT-B/16 hybrid encoder, cascaded upsampler with skips.

    python -m anemia_jax.main --config=configs/transunet.py:data=phantom
    # From the ImageNet-21k checkpoint TransUNet starts from (google-research/vision_transformer R50+ViT-B_16.npz):
    python -m anemia_jax.main --config=configs/transunet.py --config.model.pretrained=~/weights/R50+ViT-B_16.npz \
        --config.optimizer.learning_rate=1e-4

The ViT-only variant: ``--config.model.name=transunet_vit --config.model.resnet_layers=()`` and ``ViT-B_16.npz``.
The argument keys are documented in configs/common.py. Image sizes must be multiples of 16 (the token stride).
"""

from configs import common

MODEL = dict(
    name="transunet",
    hidden_size=768,  # ViT-B/16: 12 layers, 12 heads, MLP 3072; 105.3 M parameters at 256 px.
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    patch_size=16,
    resnet_layers=(3, 4, 9),  # R50's first three stages, as in the R50+ViT-B_16 hybrid.
    resnet_width=64,
    decoder_channels=(256, 128, 64, 16),
    head_channels=512,
    n_skip=3,
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
    pretrained="",  # '' trains from scratch; an .npz (anemia_jax.training.pretrained) initialises the encoder.
)
TEST_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, resnet_width=32, resnet_layers=(1, 1, 1),
                  decoder_channels=(16, 16, 16, 8), head_channels=32)


def get_config(arg: str | None = None):
    """The TransUNet training config; ``arg`` as in configs/common.py."""
    return common.model_config(arg, name="transunet", model=MODEL, test_model=TEST_MODEL)
