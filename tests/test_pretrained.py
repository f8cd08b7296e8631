"""Tests of anemia_jax.training.pretrained and anemia_jax.convert_weights: the three weight formats, their checks, and
numerical equivalence with the PyTorch reference implementations.

Key lists (tests/fixtures/keys_*.txt) are the real checkpoints' names and shapes, listed from the reference
implementations by tests/fixtures/make_reference_fixtures.py. The golden files tests/fixtures/golden_*.npz hold the
outputs of those PyTorch models (eval mode) with the numpy-seeded weights of tests/_reference_weights.py on a
1x64x64x3 input; they were made once, on the CPU, with (see that script's docstring for the venv)::

    PYTHONPATH=/tmp/hf4:/tmp/transunet_ref /tmp/refvenv/bin/python tests/fixtures/make_reference_fixtures.py torch

(torch 2.14.1, timm 1.0.31, segmentation_models_pytorch 0.6.0, transformers 4.57.6). No PyTorch is needed here.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _reference_weights import FIXTURES, read_key_list, reference_weights

from anemia_jax import convert_weights
from anemia_jax.models import get_model
from anemia_jax.models.resnet import ResNet
from anemia_jax.models.segformer import MixTransformer
from anemia_jax.training import pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_TRANSUNET = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, resnet_width=32,
                      resnet_layers=(1, 1, 1), decoder_channels=(16, 16, 16, 8), head_channels=32)


def shapes_of(model, size):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def lazy_tensors(key_list):
    """Zero tensors of the key list's shapes without memory (broadcast views): full-size name/shape checks."""
    return {k: np.broadcast_to(np.zeros((), d), s) for k, s, d in read_key_list(key_list)}


FULL_SIZE = [
    ("keys_timm_resnet18.txt", "unet", dict(encoder="resnet18"), 64),
    ("keys_timm_resnet34.txt", "unetpp", dict(encoder="resnet34"), 64),
    ("keys_timm_resnet50.txt", "unet", dict(encoder="resnet50"), 64),
    ("keys_hf_mit_b0.txt", "segformer", dict(variant="b0"), 64),
    ("keys_hf_mit_b1.txt", "segformer", dict(variant="b1"), 64),
    ("keys_hf_mit_b2.txt", "segformer", dict(variant="b2"), 64),
    ("keys_vit_R50_ViT-B_16.txt", "transunet", {}, 256),
    ("keys_vit_ViT-B_16.txt", "transunet_vit", {}, 224),
]


@pytest.mark.parametrize("key_list, name, kwargs, size", FULL_SIZE)
def test_real_key_lists_fill_every_encoder_variable(key_list, name, kwargs, size):
    model = get_model(name, **kwargs)
    target = shapes_of(model, size)
    converted = pretrained.convert(lazy_tensors(key_list), model=model, target=target)
    encoder = jax.tree.leaves(target["params"]["encoder"]) + jax.tree.leaves(target.get("batch_stats", {}).get(
        "encoder", {}))
    assert len(converted) == len(encoder)
    ignored = {k for k, _, _ in read_key_list(key_list)
               if k.startswith(("fc.", "classifier.", "head/", "pre_logits/")) or k == "cls"
               or k.endswith("num_batches_tracked")}
    assert len(read_key_list(key_list)) - len(ignored) == len(converted)
    if name.startswith("transunet"):  # class token dropped, 14x14 grid resized to the model's
        pos = converted["params", "encoder", "Transformer", "posembed_input", "pos_embedding"]
        assert pos.shape == (1, size // 16, size // 16, 768)


def test_problems_are_named():
    model = get_model("unet", encoder="resnet18")
    tensors = lazy_tensors("keys_timm_resnet18.txt")
    del tensors["layer3.1.bn2.running_var"]
    tensors["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    tensors["layer1.0.conv2.weight"] = np.zeros((64, 32, 3, 3), np.float32)
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.convert(tensors, model=model, target=shapes_of(model, 64), source="r18.safetensors")
    message = str(e.value)
    assert "r18.safetensors" in message
    assert "unexpected tensor(s) (not in the model): layer5.0.conv1.weight" in message
    assert "missing from the file: batch_stats/encoder/layer3_1/bn2/var" in message
    assert "mis-shaped tensor(s): layer1.0.conv2.weight" in message
    with pytest.raises(pretrained.PretrainedError, match="no pretrained encoder"):
        pretrained.convert({}, model=get_model("unet"), target={})
    with pytest.raises(pretrained.PretrainedError, match="segformer.encoder.block.0.0.attention.self.query.weight"):
        m = get_model("segformer", variant="b1")  # b0 weights into b1
        pretrained.convert(lazy_tensors("keys_hf_mit_b0.txt"), model=m, target=shapes_of(m, 64))


def test_safetensors_reader_dtypes(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    tensors = {"f32": x, "f16": x.astype(np.float16), "bf16": x.astype(ml_dtypes.bfloat16),
               "i64": np.arange(3, dtype=np.int64)}
    pretrained.write_safetensors(tmp_path / "w.safetensors", tensors)
    raw = (tmp_path / "w.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {header[k]["dtype"] for k in tensors} == {"F32", "F16", "BF16", "I64"}
    back = pretrained.read_safetensors(tmp_path / "w.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(pretrained.PretrainedError, match="not JSON"):
        pretrained.read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(pretrained.PretrainedError, match="Download them first"):
        pretrained.read_checkpoint(tmp_path / "absent.safetensors")


def concrete(shapes, seed=0):
    """Random numpy variables of the given shapes (no compiled init)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "var":  # BatchNorm variances must be positive
            return np.ones(s.shape, s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def apply_jit(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))


def _features(module, variables, x):
    sub = {c: variables[c]["encoder"] for c in variables if "encoder" in variables[c]}
    return apply_jit(module, sub, x)


def test_resnet34_matches_timm(tmp_path):
    golden = np.load(FIXTURES / "golden_resnet34.npz")
    path = tmp_path / "resnet34.safetensors"
    pretrained.write_safetensors(path, reference_weights(read_key_list("keys_timm_resnet34.txt"), layout="torch"))
    model = get_model("unetpp", encoder="resnet34")
    variables = pretrained.load_pretrained(shapes_of(model, 64), path, model=model)
    feats = _features(ResNet(arch="resnet34"), variables, golden["input"])
    b, h, w, c = feats[0].shape
    np.testing.assert_allclose(feats[0].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)), golden["stem_pool2"],
                               rtol=1e-4, atol=1e-4)
    for i in range(1, 5):
        np.testing.assert_allclose(feats[i], golden[f"layer{i}"], rtol=1e-4, atol=1e-4)


def test_unetpp_resnet34_matches_smp():
    """The whole smp UnetPlusPlus('resnet34') (decoder and head too), its keys mapped here by hand."""
    golden = np.load(FIXTURES / "golden_smp_unetpp_resnet34.npz")
    weights = reference_weights(read_key_list("keys_smp_unetpp_resnet34.txt"), layout="torch")
    model = get_model("unetpp", encoder="resnet34")
    flat = {}
    for key, w in weights.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[0] == "encoder":
            path, value = pretrained.convert_timm_resnet(".".join(parts[1:]), w)
        elif parts[0] == "decoder":  # decoder.blocks.x_0_0.conv1.{0: conv, 1: bn}.weight
            module = (parts[2], f"{'conv' if parts[4] == '0' else 'bn'}{parts[3][-1]}")
            path, value = pretrained._torch_leaf(module, parts[-1], w)
        else:  # segmentation_head.0
            path, value = pretrained._torch_leaf(("head",), parts[-1], w)
        flat[path] = value
    import flax
    variables = flax.traverse_util.unflatten_dict(flat)
    assert jax.tree.structure(variables) == jax.tree.structure(shapes_of(model, 64))
    logits = apply_jit(model, variables, golden["input"]).logits
    np.testing.assert_allclose(logits, golden["logits"], rtol=1e-4, atol=1e-4)


def test_mit_b0_matches_huggingface(tmp_path):
    golden = np.load(FIXTURES / "golden_mit_b0.npz")
    path = tmp_path / "mit-b0.safetensors"
    pretrained.write_safetensors(path, reference_weights(read_key_list("keys_hf_mit_b0.txt"), layout="torch"))
    model = get_model("segformer", variant="b0")
    variables = pretrained.load_pretrained(shapes_of(model, 64), path, model=model)
    feats = _features(MixTransformer("b0"), variables, golden["input"])
    for i in range(4):
        np.testing.assert_allclose(feats[i], golden[f"stage{i}"], rtol=1e-4, atol=1e-4)


def _tiny_vit_npz(model, size):
    """An .npz with the checkpoint's names for a tiny TransUNet: its encoder, a class token, ViT posembed layout
    ``[1, 1 + N, C]`` and the ImageNet-21k head (pre_logits, head), as google-research/vision_transformer saves."""
    import flax
    target = shapes_of(model, size)
    rng = np.random.default_rng(0)
    arrays = {"/".join(k): rng.standard_normal(v.shape).astype(np.float32) * 0.1
              for k, v in flax.traverse_util.flatten_dict(target["params"]["encoder"]).items()}
    pos = arrays.pop("Transformer/posembed_input/pos_embedding")
    arrays["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [np.ones((1, 1, pos.shape[-1]), np.float32), pos.reshape(1, -1, pos.shape[-1])], axis=1)
    c = pos.shape[-1]
    arrays.update({"cls": np.zeros((1, 1, c), np.float32), "pre_logits/kernel": np.zeros((c, c), np.float32),
                   "pre_logits/bias": np.zeros(c, np.float32), "head/kernel": np.zeros((c, 7), np.float32),
                   "head/bias": np.zeros(7, np.float32)})
    return arrays, pos


def test_vit_npz_and_converter_round_trip(tmp_path):
    model = get_model("transunet", **TINY_TRANSUNET)
    arrays, pos = _tiny_vit_npz(model, 64)
    np.savez(tmp_path / "R50+ViT-tiny.npz", **arrays)
    variables = concrete(shapes_of(model, 64))
    loaded = pretrained.load_pretrained(variables, tmp_path / "R50+ViT-tiny.npz", model=model)
    enc = loaded["params"]["encoder"]
    np.testing.assert_array_equal(enc["Transformer"]["posembed_input"]["pos_embedding"], pos)  # cls token dropped
    np.testing.assert_array_equal(enc["block2"]["unit1"]["conv2"]["kernel"], arrays["block2/unit1/conv2/kernel"])
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
    assert np.isfinite(apply_jit(model, loaded, np.zeros((1, 64, 64, 3), np.float32)).logits).all()

    # Converted once at 128 px: the 4x4 grid is resized (corners aligned) to 8x8; the converted file loads as is.
    out = tmp_path / "converted"
    # The model comes from the training config, as for `python -m anemia_jax.main` (tiny widths: `test`).
    config = [f"--config={REPO}/configs/transunet.py:test", "--config.image_size=(128, 128)",
              "--config.model.num_layers=2"]
    assert convert_weights.main(["convert_weights", *config, f"--in={tmp_path / 'R50+ViT-tiny.npz'}",
                                 f"--out={out}"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_size"] == [128, 128] and meta["model"]["resnet_layers"] == [1, 1, 1]
    big = concrete(shapes_of(model, 128))
    again = pretrained.apply_to_variables({"pretrained": str(out)}, big, model=model)
    grid = again["params"]["encoder"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert grid.shape == (1, 8, 8, TINY_TRANSUNET["hidden_size"])
    np.testing.assert_allclose(grid[0, ::7, ::7], pos[0, ::3, ::3], rtol=1e-6)  # corners kept
    assert pretrained.apply_to_variables({"pretrained": ""}, big, model=model) is big
    vit = ["--config.model.name=transunet_vit", "--config.model.resnet_layers=()"]
    assert convert_weights.main(["convert_weights", *config, *vit, f"--in={out}/encoder.npz",
                                 f"--out={tmp_path / 'x'}"]) == 2  # hybrid weights into the ViT-only model
