"""Tests of the ResNet encoders and smp's U-Net / UNet++ decoders (anemia_jax.models.resnet).

Parameter counts are asserted against segmentation_models_pytorch 0.6 and timm, counted in PyTorch by
tests/fixtures/make_reference_fixtures.py (tests/fixtures/reference_param_counts.json); the full-size models are
counted through ``jax.eval_shape`` (no compute). Numerical equivalence with timm and smp is in tests/test_pretrained.py.
"""

import json

import jax
import jax.numpy as jnp
import pytest
from _reference_weights import FIXTURES
from _step_equivalence import assert_one_step_equal_on_1_and_8_devices, numpy_variables

from anemia_jax.models import get_model
from anemia_jax.models.resnet import ENCODERS, ResNet
from anemia_jax.utils import parallel

COUNTS = json.loads((FIXTURES / "reference_param_counts.json").read_text())
TINY = dict(encoder="resnet_tiny", decoder_channels=(32, 16, 16, 8, 8))


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def shapes(model, size=64):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_parameter_counts_equal_smp_and_timm(arch):
    for name, smp_name in (("unet", "Unet"), ("unetpp", "UnetPlusPlus")):
        variables = shapes(get_model(name, encoder=arch, num_classes=1))
        assert n_params(variables["params"]) == COUNTS[f"smp_{smp_name}_{arch}"]
    # timm's count includes its 1000-class classifier (fc), which the encoder drops.
    encoder = shapes(ResNet(arch=arch))["params"]
    fc = ENCODERS[arch].channels[-1] * 1000 + 1000
    assert n_params(encoder) + fc == COUNTS[f"timm_{arch}"]
    assert COUNTS["smp_UnetPlusPlus_resnet34"] == 26_078_609 and COUNTS["timm_resnet34"] == 21_797_672


def test_shapes_dtypes_and_scopes():
    images = jnp.ones((2, 64, 64, 3))
    for name in ("unet", "unetpp"):
        model = get_model(name, num_classes=2, dtype=jnp.bfloat16, **TINY)
        variables = numpy_variables(model, 64)
        assert {"encoder", "head"} <= set(variables["params"])
        assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
        out, updates = jax.jit(lambda v, m=model: m.apply(v, images, train=True, mutable=["batch_stats"]))(variables)
        assert out.logits.shape == (2, 64, 64, 2) and out.logits.dtype == jnp.float32 and len(out.heads) == 1
        assert set(updates["batch_stats"]) == set(variables["batch_stats"])


def test_encoder_field_errors():
    with pytest.raises(ValueError, match="Unknown encoder 'resnet35'"):
        shapes(get_model("unet", encoder="resnet35"))
    with pytest.raises(ValueError, match="divisible by 32"):
        shapes(get_model("unet", **TINY), size=48)
    with pytest.raises(ValueError, match="deep_supervision and prune_level"):
        shapes(get_model("unetpp", deep_supervision=True, **TINY))
    with pytest.raises(ValueError, match="use BatchNorm"):
        shapes(get_model("unet", norm="group", **TINY))


def test_eight_devices_match_one_device():
    # U-Net rather than UNet++ keeps the two compilations short; the encoder and decoder blocks are the same. At
    # 32 px the deepest BatchNorms see 1x1 maps of 8 examples, whose small variances amplify float32 reordering.
    assert_one_step_equal_on_1_and_8_devices(get_model("unet", num_classes=2, bn_axis_name=parallel.DATA_AXIS,
                                                       **TINY), size=32, atol=1e-4)
