"""Weight files as they come from the field, and as a careless or hostile hand leaves them.

* From the field: the published ``R50+ViT-B_16.npz`` stores its GroupNorm scales and biases as ``[1, 1, 1, C]``
  (the pre-Linen Flax layout that google-research/vision_transformer's ``checkpoint._fix_groupnorm`` and TransUNet's
  loader flatten), and a HuggingFace ``SegformerForSemanticSegmentation`` checkpoint holds a ``decode_head.*``
  beside ``segformer.encoder.*``. The fixtures are the real key lists (tests/fixtures/keys_*.txt) in those layouts.
* Careless or hostile: a safetensors header that lies (overlapping, negative or out-of-range offsets, trailing
  bytes, wrong types), a pickled ``.npz``, a missing file, a FIFO; ``convert_weights`` writing over its input or into
  a place it cannot write. Each is one message with its exit status, never a traceback, and nothing is read wrongly.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import struct

import numpy as np
import pytest
from _filesystems import read_only_folder
from _hostile_files import watched_fifo
from _reference_weights import read_key_list
from test_pretrained import REPO, TINY_TRANSUNET, _tiny_vit_npz, concrete, lazy_tensors, shapes_of

from anemia_jax import cli, convert_weights, main
from anemia_jax.models import get_model
from anemia_jax.training import pretrained

GROUPNORM = re.compile(r"gn(\d+|_root|_proj)$")  # vision_transformer's checkpoint._fix_groupnorm


def _linen_to_published(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The tensors with every GroupNorm scale/bias in the published file's [1, 1, 1, C] layout; and how many."""
    out, n = {}, 0
    for key, w in tensors.items():
        parts = key.split("/")
        if len(parts) > 1 and GROUPNORM.match(parts[-2]) and parts[-1] in ("scale", "bias"):
            w, n = w.reshape(1, 1, 1, -1), n + 1
        out[key] = w
    return out, n


# --------------------------------------------------------------------------------------- layouts of the field


def test_published_r50_vit_groupnorm_layout_is_accepted():
    model = get_model("transunet")
    tensors, reshaped = _linen_to_published(lazy_tensors("keys_vit_R50_ViT-B_16.txt"))
    assert reshaped == 104  # the "104 mis-shaped tensors" the loader refused
    converted = pretrained.convert(tensors, model=model, target=shapes_of(model, 256))
    assert converted["params", "encoder", "block1", "unit1", "gn1", "scale"].shape == (64,)
    assert converted["params", "encoder", "gn_root", "bias"].shape == (64,)


def test_groupnorm_values_survive_either_layout(tmp_path):
    model = get_model("transunet", **TINY_TRANSUNET)
    arrays, _ = _tiny_vit_npz(model, 64)
    published, reshaped = _linen_to_published(arrays)
    assert reshaped > 0
    np.savez(tmp_path / "linen.npz", **arrays)
    np.savez(tmp_path / "published.npz", **published)
    variables = concrete(shapes_of(model, 64))
    a = pretrained.load_pretrained(variables, tmp_path / "linen.npz", model=model)["params"]["encoder"]
    b = pretrained.load_pretrained(variables, tmp_path / "published.npz", model=model)["params"]["encoder"]
    np.testing.assert_array_equal(b["gn_root"]["scale"], arrays["gn_root/scale"])
    np.testing.assert_array_equal(b["block1"]["unit1"]["gn_proj"]["bias"], a["block1"]["unit1"]["gn_proj"]["bias"])
    # Another shape is still refused.
    published["gn_root/scale"] = np.zeros((1, 2, 1, arrays["gn_root/scale"].size // 2), np.float32)
    with pytest.raises(pretrained.PretrainedError, match="gn_root/scale"):
        pretrained.convert(published, model=model, target=shapes_of(model, 64))


def _decode_head(hidden_sizes: tuple[int, ...], decoder: int = 256, labels: int = 150) -> dict[str, np.ndarray]:
    """The ``decode_head.*`` tensors of transformers' ``SegformerDecodeHead`` (modeling_segformer.py): one MLP
    ``linear_c.i.proj`` per stage, ``linear_fuse`` (1x1 conv, no bias), ``batch_norm``, ``classifier``."""
    head = {}
    for i, c in enumerate(hidden_sizes):
        head[f"decode_head.linear_c.{i}.proj.weight"] = np.zeros((decoder, c), np.float32)
        head[f"decode_head.linear_c.{i}.proj.bias"] = np.zeros((decoder,), np.float32)
    head["decode_head.linear_fuse.weight"] = np.zeros((decoder, decoder * len(hidden_sizes), 1, 1), np.float32)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        head[f"decode_head.batch_norm.{leaf}"] = np.zeros((decoder,), np.float32)
    head["decode_head.batch_norm.num_batches_tracked"] = np.zeros((), np.int64)
    head["decode_head.classifier.weight"] = np.zeros((labels, decoder, 1, 1), np.float32)
    head["decode_head.classifier.bias"] = np.zeros((labels,), np.float32)
    return head


def test_segformer_for_semantic_segmentation_checkpoint_gives_its_encoder():
    model = get_model("segformer", variant="b0")
    tensors = {k: v for k, v in lazy_tensors("keys_hf_mit_b0.txt").items() if not k.startswith("classifier.")}
    tensors.update(_decode_head((32, 64, 160, 256)))
    converted = pretrained.convert(tensors, model=model, target=shapes_of(model, 64))
    encoder_keys = [k for k, _, _ in read_key_list("keys_hf_mit_b0.txt") if k.startswith("segformer.encoder.")]
    assert len(converted) == len(encoder_keys)


# ------------------------------------------------------------------------------------- strict safetensors


def _raw_safetensors(path: pathlib.Path, header: dict, buffer: bytes, *, header_length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + buffer)


TWO = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes


@pytest.mark.parametrize("header, buffer, fragment", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, TWO[:12], "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, TWO[:8], "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, TWO, "bytes follow the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, TWO, "unused"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, TWO[:8], "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, TWO, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, TWO, "needs 12"),
    ({"a": {"dtype": "F32", "shape": "four", "data_offsets": [0, 16]}}, TWO, "shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, TWO, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1}}, TWO, "exactly dtype"),
    ({"a": [0, 16]}, TWO, "exactly dtype"),
    ([1, 2], TWO, "not a map"),
    ({"__metadata__": {"format": 5}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, TWO,
     "__metadata__"),
], ids=["overlap", "shared", "trailing", "gap", "negative", "past_end", "size", "shape_type", "offset_type",
        "extra_field", "not_an_entry", "not_a_map", "metadata"])
def test_a_lying_safetensors_header_is_refused(tmp_path, header, buffer, fragment):
    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, header, buffer)
    with pytest.raises(pretrained.PretrainedError, match=fragment):
        pretrained.read_safetensors(path)


def test_header_length_and_duplicate_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, TWO, header_length=10**9)
    with pytest.raises(pretrained.PretrainedError, match="header length"):
        pretrained.read_safetensors(path)
    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + TWO)
    with pytest.raises(pretrained.PretrainedError, match="more than once"):
        pretrained.read_safetensors(path)
    pretrained.write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.zeros((0, 2), np.float32)})
    assert {k: v.shape for k, v in pretrained.read_safetensors(path).items()} == {"a": (3,), "b": (0, 2)}


# ---------------------------------------------------------------------------------- files that cannot be read


def _pickled_npz(path: pathlib.Path) -> pathlib.Path:
    np.savez(path, weights=np.array([{"runs": "code"}], dtype=object))
    return path


def test_unreadable_weight_files_are_messages(tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="do not exist"):
        pretrained.read_checkpoint(tmp_path / "absent.npz")
    with pytest.raises(pretrained.PretrainedError, match="pickled"):
        pretrained.read_checkpoint(_pickled_npz(tmp_path / "pickled.npz"))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(pretrained.PretrainedError, match="not a readable .npz"):
        pretrained.read_checkpoint(tmp_path / "junk.npz")
    with watched_fifo(tmp_path / "pipe.safetensors") as fifo:
        with pytest.raises(pretrained.PretrainedError, match="named pipe"):
            pretrained.read_checkpoint(fifo.path)
    assert not fifo.opened_by_reader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("kind", ["missing", "pickled", "lying"])
def test_the_trainer_reports_an_unusable_weight_file(capfd, tmp_path, data_dir, kind):
    path = {"missing": tmp_path / "absent.safetensors", "pickled": _pickled_npz(tmp_path / "pickled.npz"),
            "lying": tmp_path / "lying.safetensors"}[kind]
    if kind == "lying":
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, TWO)
    status = main.main(["main", f"--config={REPO}/configs/unet_resnet34.py:data=phantom,test",
                        f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={data_dir}",
                        "--config.compilation_cache_dir=", f"--config.model.pretrained={path}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CONFIG, err[-3000:]
    assert "Traceback" not in err and str(path) in err, err[-3000:]


# ---------------------------------------------------------------------------------------- convert_weights


@pytest.fixture
def tiny_npz(tmp_path):
    model = get_model("transunet", **TINY_TRANSUNET)
    arrays, _ = _tiny_vit_npz(model, 64)
    np.savez(tmp_path / "R50+ViT-tiny.npz", **arrays)
    return tmp_path / "R50+ViT-tiny.npz"


CONVERT = ["convert_weights", f"--config={REPO}/configs/transunet.py:test", "--config.model.num_layers=2"]


def test_convert_weights_reports_unusable_inputs(capfd, tmp_path):
    for path, fragment in ((tmp_path / "absent.npz", "do not exist"),
                           (_pickled_npz(tmp_path / "pickled.npz"), "pickled")):
        status = convert_weights.main([*CONVERT, f"--in={path}", f"--out={tmp_path / 'out'}"])
        err = capfd.readouterr().err
        assert status == cli.EXIT_CONFIG and "Traceback" not in err and fragment in err, err[-3000:]
    assert not (tmp_path / "out").exists()


def test_convert_weights_output_failures_exit_5(capfd, tmp_path, tiny_npz):
    taken = tmp_path / "taken"
    taken.write_text("a file where the folder belongs")
    status = convert_weights.main([*CONVERT, f"--in={tiny_npz}", f"--out={taken}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_IO and "Traceback" not in err and str(taken) in err, err[-3000:]
    with read_only_folder(tmp_path / "locked") as locked:
        status = convert_weights.main([*CONVERT, f"--in={tiny_npz}", f"--out={locked}"])
        err = capfd.readouterr().err
        assert status == cli.EXIT_IO and "Traceback" not in err and str(locked) in err, err[-3000:]
        assert list(locked.iterdir()) == []


def test_convert_weights_never_replaces_its_input_and_records_the_sources_hash(capfd, tmp_path, tiny_npz):
    out = tmp_path / "converted"
    assert convert_weights.main([*CONVERT, f"--in={tiny_npz}", f"--out={out}"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(tiny_npz.read_bytes()).hexdigest()
    before = (out / "encoder.npz").read_bytes()
    for given in (out, out / "encoder.npz"):  # the folder, or its encoder.npz, converted into itself
        status = convert_weights.main([*CONVERT, f"--in={given}", f"--out={out}"])
        err = capfd.readouterr().err
        assert status == cli.EXIT_CONFIG and "would replace the input" in err, err[-3000:]
    assert (out / "encoder.npz").read_bytes() == before
    # Converted into another folder, its meta.json names the converted file's own hash.
    again = tmp_path / "again"
    assert convert_weights.main([*CONVERT, f"--in={out}", f"--out={again}"]) == 0
    assert json.loads((again / "meta.json").read_text())["sha256"] == hashlib.sha256(before).hexdigest()
