"""Tests of the transformer segmenters: TransUNet (anemia_jax.models.transunet) and SegFormer (.segformer).

Parameter counts are asserted against the reference implementations counted in PyTorch by
tests/fixtures/make_reference_fixtures.py (tests/fixtures/reference_param_counts.json): TransUNet's own
``VisionTransformer`` (R50-ViT-B_16 and ViT-B_16, 1 class, 224 and 256 px) and HuggingFace
``SegformerForSemanticSegmentation`` (MiT-B0..B2, 1 label); full sizes through ``jax.eval_shape`` (no compute).
Numerical equivalence of the MiT-B0 encoder with HuggingFace is in tests/test_pretrained.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference_weights import FIXTURES
from _step_equivalence import (
    assert_one_step_equal_on_1_and_8_devices,
    assert_train_forward_equal_on_1_and_8_devices,
    numpy_variables,
)

from anemia_jax.models import get_model
from anemia_jax.utils import parallel

COUNTS = json.loads((FIXTURES / "reference_param_counts.json").read_text())
TINY_TRANSUNET = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, resnet_width=32, resnet_layers=(1, 1, 1),
                      decoder_channels=(16, 16, 16, 8), head_channels=32)


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def shapes(model, size):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


@pytest.mark.parametrize("size", [224, 256])
def test_transunet_parameter_counts_equal_the_reference(size):
    assert n_params(shapes(get_model("transunet"), size)["params"]) == COUNTS[f"transunet_R50-ViT-B_16_{size}"]
    assert n_params(shapes(get_model("transunet_vit"), size)["params"]) == COUNTS[f"transunet_ViT-B_16_{size}"]
    assert COUNTS["transunet_R50-ViT-B_16_224"] == 105_275_921  # the paper's "105M"


@pytest.mark.parametrize("variant", ["b0", "b1", "b2"])
def test_segformer_parameter_counts_equal_huggingface(variant):
    variables = shapes(get_model("segformer", variant=variant), 64)
    assert n_params(variables["params"]) == COUNTS[f"hf_segformer_{variant}"]
    assert n_params(variables["params"]["encoder"]) == COUNTS[f"hf_mit_{variant}_encoder"]
    assert COUNTS["hf_segformer_b0"] == 3_714_401  # the paper's 3.8M (150 classes) with one class


@pytest.mark.parametrize("name, kwargs", [("transunet", TINY_TRANSUNET),
                                          ("transunet_vit", {**TINY_TRANSUNET, "resnet_layers": ()}),
                                          ("segformer", dict(variant="tiny"))])
def test_shapes_bf16_and_dropout(name, kwargs):
    model = get_model(name, num_classes=2, dtype=jnp.bfloat16, **kwargs)
    variables = numpy_variables(model, 64)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

    @jax.jit
    def run(variables, key):
        evaluation = model.apply(variables, images, train=False)
        train, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return evaluation.logits, train.logits, updates

    logits, train_a, updates = run(variables, jax.random.key(1))
    _, train_b, _ = run(variables, jax.random.key(2))
    assert logits.shape == (2, 64, 64, 2) and logits.dtype == jnp.float32 and train_a.dtype == jnp.float32
    assert np.isfinite(logits).all()
    assert set(updates["batch_stats"]) == set(variables["batch_stats"])
    assert np.abs(train_a - train_b).max() > 0  # dropout / stochastic depth keyed by the 'dropout' rng
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_transunet_other_image_size_resizes_position_embeddings():
    model = get_model("transunet", **TINY_TRANSUNET)
    variables = numpy_variables(model, 64)  # 4x4 grid
    assert variables["params"]["encoder"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 4, 4, 32)
    out = jax.jit(lambda v: model.apply(v, jnp.zeros((1, 96, 128, 3)), train=False))(variables)
    assert out.logits.shape == (1, 96, 128, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        model.apply(variables, jnp.zeros((1, 40, 40, 3)), train=False)


def test_bad_fields():
    with pytest.raises(ValueError, match="variant must be one of"):
        get_model("segformer", variant="b7")
    with pytest.raises(ValueError, match="patch_size"):
        get_model("transunet", patch_size=8)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        get_model("transunet", hidden_size=100)


def test_eight_devices_match_one_device_for_a_whole_step():
    # The ViT-only TransUNet: attention, LayerNorms and the decoder's synchronised BatchNorms, in the smallest
    # transformer program (its step compiles in 3.3-3.5 s here, the hybrid's in 7.2-8.1 s).
    model = get_model("transunet_vit", num_classes=2, bn_axis_name=parallel.DATA_AXIS,
                      **{**TINY_TRANSUNET, "resnet_layers": (), "dropout_rate": 0.0})
    assert_one_step_equal_on_1_and_8_devices(model, size=32, atol=1e-4)


# SegFormer at 64 px: at 32 each stage's spatially reduced keys are a single token, whose softmax weight is 1 whatever
# the query, so the query and key projections would get no gradient.
@pytest.mark.parametrize("name, kwargs, size", [
    ("transunet", {**TINY_TRANSUNET, "dropout_rate": 0.0}, 32),
    ("segformer", dict(variant="tiny", dropout_rate=0.0, drop_path_rate=0.0), 64)])
def test_eight_devices_match_one_device_in_the_training_forward_pass(name, kwargs, size):
    # The hybrid encoder (GroupNorm ResNet, skips) and SegFormer (Mix Transformer, the decode head's BatchNorm): any
    # operation across the batch that is not synchronised would show here (see tests/_step_equivalence.py), and the
    # gradient must reach every parameter.
    model = get_model(name, num_classes=2, bn_axis_name=parallel.DATA_AXIS, **kwargs)
    assert_train_forward_equal_on_1_and_8_devices(model, size=size, atol=1e-4)
