"""Pretrained encoder weights from local files: no network, no pickle.

Formats, chosen by the model the weights go into:

============================================  =====================================  ===============================
model                                         file                                   source
============================================  =====================================  ===============================
``unet`` / ``unetpp`` with ``encoder=resnetN``  ``model.safetensors`` of timm ``resnetN.*`` (or torchvision weights saved as safetensors: same keys)  timm on the HuggingFace hub, e.g. ``timm/resnet34.a1_in1k``
``segformer`` (``variant='bN'``)               ``model.safetensors`` of ``nvidia/mit-bN``  HuggingFace hub
``transunet`` / ``transunet_vit``             ``R50+ViT-B_16.npz`` / ``ViT-B_16.npz`` (ImageNet-21k)  google-research/vision_transformer (gs://vit_models/imagenet21k/)
any of them                                   ``encoder.npz`` written by ``python -m anemia_jax.convert_weights``  this module
============================================  =====================================  ===============================

Conversion: PyTorch convolutions OIHW -> HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C]), linear layers transposed,
BatchNorm ``running_mean``/``running_var`` into ``batch_stats`` (``num_batches_tracked`` dropped), ViT position
embeddings stripped of the class token and resized bilinearly (corners aligned, as TransUNet's ``ndimage.zoom``) to
the model's token grid. Every tensor of the file is used or is in the format's explicit ignore list (classifier
heads); a tensor the model lacks, an encoder parameter the file lacks, or a shape that differs is an error naming
it. Only the ``encoder`` subtree (`anemia_jax.models.resnet.ENCODER_SCOPE`) is replaced; decoders keep their
initialisation.

Use: ``variables = pretrained.apply_to_variables(config.model, variables, model=model)`` when the train state is
created (does nothing unless ``config.model.pretrained`` is set), or ``load_pretrained(variables, path, model=model)``.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax
import ml_dtypes
import numpy as np

from anemia_jax import models
from anemia_jax.models.resnet import ENCODER_SCOPE
from anemia_jax.models.transunet import align_corners_matrix
from anemia_jax.utils import errors, input_files

PyTree = Any
Path = tuple[str, ...]  # (collection, 'encoder', module..., leaf)

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
CONVERTED_MARKER = "__anemia_jax_encoder__"


class PretrainedError(errors.ConfigError):
    """A weight file that is missing, unreadable, or does not fit the model (the message names every offending
    tensor). A `errors.ConfigError`: the config's ``model.pretrained`` (or ``--in``) names an unusable file, exit
    status 2."""


# ----------------------------------------------------------------------------------------------- reading files

MAX_WEIGHT_BYTES = 8 << 30  # the largest weight file read (ViT-L/16 .npz files are about 1.2 GB)
_MAX_HEADER_BYTES = 100 << 20  # as the safetensors library: a header larger than this is no header


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"the key(s) {', '.join(map(repr, repeated))} appear more than once")
    return dict(pairs)


def _checked_entry(path, key: str, info: Any, buffer_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, or `PretrainedError` saying what does not fit."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PretrainedError(f"{where} is described by {info!r}; a safetensors header entry holds exactly dtype, "
                              "shape and data_offsets.")
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise PretrainedError(f"{where} has dtype {info['dtype']!r}, which this reader does not support "
                              f"({', '.join(SAFETENSORS_DTYPES)}).")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise PretrainedError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= buffer_size):
        raise PretrainedError(f"{where} has data_offsets {offsets!r}; they must be two integers 0 <= start <= end <= "
                              f"{buffer_size}, the size of the file's data.")
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise PretrainedError(f"{where} spans {offsets[1] - offsets[0]} bytes, but {info['dtype']} {shape} needs "
                              f"{need}.")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as numpy (8-byte little-endian header length, JSON header, raw
    little-endian buffer; F32/F16/BF16/F64 and integer dtypes), parsed strictly as the format requires: every entry
    well-typed, its byte range the size of its dtype and shape, the ranges contiguous from 0 without overlaps or
    holes, and no bytes after the last tensor -- a header that lies (two tensors sharing bytes, hidden trailing data)
    is refused, never read.

    Raises:
        PretrainedError: not a safetensors file, or a header that does not describe its data exactly.
    """
    data = input_files.read_file(path, max_bytes=MAX_WEIGHT_BYTES, what="Weight file")
    if len(data) < 8:
        raise PretrainedError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise PretrainedError(f"{path} is not a safetensors file: its header length {n} is beyond the file's "
                              f"{len(data)} bytes.")
    try:
        header = json.loads(data[8:8 + n], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise PretrainedError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from None
    if not isinstance(header, dict):
        raise PretrainedError(f"{path} is not a safetensors file: its header is {type(header).__name__}, not a map.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PretrainedError(f"{path}: its __metadata__ must map names to strings.")
    buffer = memoryview(data)[8 + n:]
    entries = sorted(((*_checked_entry(path, key, info, len(buffer)), key) for key, info in header.items()),
                     key=lambda e: (e[2], e[3]))
    position = 0
    for _, _, start, end, key in entries:
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves bytes {position}-{start} unused"
            raise PretrainedError(f"{path}: tensor {key!r} (bytes {start}-{end}) {what}; a safetensors file's "
                                  "tensors are contiguous and never share bytes. The file is damaged or crafted.")
        position = end
    if position != len(buffer):
        raise PretrainedError(f"{path}: {len(buffer) - position} bytes follow the last tensor; a safetensors file "
                              "ends with its data. The file is damaged or crafted.")
    return {key: np.frombuffer(buffer[start:end], dtype=dtype).reshape(shape)
            for dtype, shape, start, end, key in entries}


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes numpy arrays as a ``.safetensors`` file (the inverse of `read_safetensors`)."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for key, value in tensors.items():
        value = np.ascontiguousarray(value)
        blob = value.astype(value.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def checkpoint_file(path: str | pathlib.Path) -> pathlib.Path:
    """The weight file ``path`` names: itself, or ``DIR/encoder.npz`` for a folder."""
    p = pathlib.Path(path).expanduser()
    return p / "encoder.npz" if p.is_dir() else p


def read_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` or ``.npz`` file (``allow_pickle=False``), or of ``DIR/encoder.npz``.

    Raises:
        PretrainedError: the file is missing, not a regular file, larger than `MAX_WEIGHT_BYTES`, of another
            format, holds pickled objects, or is damaged; the message says which and what to do.
    """
    p = checkpoint_file(path)
    try:
        input_files.check_regular_file(p, what="Pretrained weight file")
        if p.stat().st_size > MAX_WEIGHT_BYTES:
            raise input_files.FileTooLargeError(f"Pretrained weight file {p} holds {p.stat().st_size / 1e9:.1f} GB, "
                                                f"over the {MAX_WEIGHT_BYTES / 1e9:.1f} GB this reader accepts.")
    except FileNotFoundError:
        raise PretrainedError(f"Pretrained weights {p} do not exist. Download them first (see the README's "
                              "'Pretrained weights' section for where), or pass the right path.") from None
    except (input_files.NotARegularFileError, input_files.FileTooLargeError, OSError) as e:
        raise PretrainedError(str(e)) from None
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except ValueError as e:
            if "pickle" in str(e):
                raise PretrainedError(f"{p} holds pickled Python objects, which are never loaded (unpickling runs "
                                      "code from the file). Use the published .npz of plain arrays, or convert the "
                                      "weights to .safetensors.") from None
            raise PretrainedError(f"{p} is not a readable .npz of arrays ({e}).") from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise PretrainedError(f"{p} is not a readable .npz of arrays ({type(e).__name__}: {e}); download it "
                                  "again.") from None
    raise PretrainedError(f"{p}: expected a .safetensors or .npz file (or a directory holding encoder.npz).")


# ------------------------------------------------------------------------------------------ key conversions
# Each converter maps one source key to (flax path, tensor) or None for an ignored key.

Converted = tuple[Path, np.ndarray] | None


def _torch_conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO; depthwise [C, 1, k, k] -> [k, k, 1, C]


def _torch_leaf(module: Path, leaf: str, w: np.ndarray, *, linear: bool = False) -> tuple[Path, np.ndarray]:
    """A PyTorch module's tensor as a Flax variable: conv/linear weights, norm affine, BatchNorm statistics."""
    if leaf == "running_mean":
        return ("batch_stats", *module, "mean"), w
    if leaf == "running_var":
        return ("batch_stats", *module, "var"), w
    if leaf == "bias":
        return ("params", *module, "bias"), w
    if leaf == "weight" and w.ndim == 4:
        return ("params", *module, "kernel"), _torch_conv(w)
    if leaf == "weight" and w.ndim == 2 and linear:
        return ("params", *module, "kernel"), w.T
    if leaf == "weight" and w.ndim == 1:
        return ("params", *module, "scale"), w
    raise KeyError(leaf)


def convert_timm_resnet(key: str, w: np.ndarray) -> Converted:
    """timm / torchvision ResNet keys (``layer2.0.downsample.1.running_var``) -> `anemia_jax.models.resnet.ResNet`."""
    parts = key.split(".")
    if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
        return None  # the ImageNet classifier; a BatchNorm step counter
    module = parts[:-1]
    if module[0].startswith("layer"):
        module = [f"{module[0]}_{module[1]}", "_".join(module[2:])]
    return _torch_leaf((ENCODER_SCOPE, *module), parts[-1], w)


_MIT_RENAMES = [
    (r"^patch_embeddings\.(\d+)\.proj$", r"patch_embed_\1_proj"),
    (r"^patch_embeddings\.(\d+)\.layer_norm$", r"patch_embed_\1_norm"),
    (r"^block\.(\d+)\.(\d+)\.layer_norm_(\d)$", r"block_\1_\2/norm\3"),
    (r"^block\.(\d+)\.(\d+)\.attention\.self\.(query|key|value|sr)$", r"block_\1_\2/attn/\3"),
    (r"^block\.(\d+)\.(\d+)\.attention\.self\.layer_norm$", r"block_\1_\2/attn/norm"),
    (r"^block\.(\d+)\.(\d+)\.attention\.output\.dense$", r"block_\1_\2/attn/proj"),
    (r"^block\.(\d+)\.(\d+)\.mlp\.dense(\d)$", r"block_\1_\2/fc\3"),
    (r"^block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv$", r"block_\1_\2/dwconv"),
    (r"^layer_norm\.(\d+)$", r"norm_\1"),
]


def convert_hf_mit(key: str, w: np.ndarray) -> Converted:
    """HuggingFace ``nvidia/mit-bN`` keys (``segformer.encoder.block.0.1.mlp.dense1.weight``) -> `MixTransformer`.
    Checkpoints of ``SegformerForImageClassification`` carry a ``classifier.*`` head, those of
    ``SegformerForSemanticSegmentation`` (the hub's fine-tuned ``segformer-bN-finetuned-*``) a ``decode_head.*``
    (``linear_c``, ``linear_fuse``, ``batch_norm``, ``classifier``): only the encoder is taken."""
    if key.startswith(("classifier.", "decode_head.")):
        return None  # the ImageNet classifier; the segmentation head of another task
    name = key.removeprefix("segformer.").removeprefix("encoder.")
    module, _, leaf = name.rpartition(".")
    for pattern, replacement in _MIT_RENAMES:
        if re.match(pattern, module):
            flax_module = re.sub(pattern, replacement, module).split("/")
            return _torch_leaf((ENCODER_SCOPE, *flax_module), leaf, w, linear=True)
    raise KeyError(key)


# GroupNorm modules of the R50 stem and blocks (gn_root, gn1..gn3, gn_proj), as vision_transformer's
# `checkpoint._fix_groupnorm` names them.
_GROUPNORM = re.compile(r"gn(\d+|_root|_proj)$")


def convert_vit_npz(key: str, w: np.ndarray) -> Converted:
    """google-research/vision_transformer ``.npz`` names -> `anemia_jax.models.transunet.TransUNetEncoder` (the
    same names; the class token and the classifier are not used by TransUNet). The published R50+ViT-B_16 file stores
    its GroupNorm scales and biases as ``[1, 1, 1, C]`` (the pre-Linen Flax layout, which vision_transformer's
    ``checkpoint._fix_groupnorm`` and TransUNet's loader both flatten); they are taken as ``[C]``, like those stored
    that way already."""
    if key == "cls" or key.split("/")[0] in ("head", "pre_logits"):
        return None
    parts = key.split("/")
    if (len(parts) > 1 and _GROUPNORM.match(parts[-2]) and parts[-1] in ("scale", "bias") and w.ndim == 4
            and w.shape[:3] == (1, 1, 1)):
        w = w.reshape(-1)
    return ("params", ENCODER_SCOPE, *parts), w


def convert_converted(key: str, w: np.ndarray) -> Converted:
    """Keys of an ``encoder.npz`` from `convert_weights` (``params/encoder/...``)."""
    if key == CONVERTED_MARKER:
        return None
    return tuple(key.split("/")), w


def _resize_pos_embedding(w: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[1, N (+1), C]`` or ``[1, g, g, C]`` ViT position embeddings -> ``[1, *grid, C]``."""
    if w.ndim == 3:
        n = w.shape[1]
        if math.isqrt(n) ** 2 != n:  # a class token leads
            w = w[:, 1:]
            n -= 1
        g = math.isqrt(n)
        if g * g != n:
            raise PretrainedError(f"position embeddings of {w.shape[1]} tokens are not a square grid.")
        w = w.reshape(1, g, g, -1)
    if w.shape[1:3] != tuple(grid):
        mh = align_corners_matrix(w.shape[1], grid[0])
        mw = align_corners_matrix(w.shape[2], grid[1])
        w = np.einsum("pw,bhwc->bhpc", mw, np.einsum("oh,bhwc->bowc", mh, w.astype(np.float32)))
    return w


# The checkpoint formats the models' encoders load, keyed by `models.ModelCapabilities.pretrained`.
CONVERTERS: dict[str, tuple[str, Callable[[str, np.ndarray], Converted]]] = {
    "timm_resnet": ("timm ResNet safetensors", convert_timm_resnet),
    "hf_mit": ("HuggingFace nvidia/mit-b* safetensors", convert_hf_mit),
    "vit_npz": ("google-research/vision_transformer .npz", convert_vit_npz),
}


def _converter(model) -> tuple[str, Callable[[str, np.ndarray], Converted]]:
    kind = models.capabilities_of(model).pretrained
    if kind is None:
        encoder = getattr(model, "encoder", None)
        if encoder is not None:
            raise PretrainedError(f"no pretrained weights exist for encoder {encoder!r}.")
        with_weights = [name for name, cls in models.MODELS.items() if isinstance(getattr(cls, "capabilities", None),
                                                                                   models.ModelCapabilities)]
        raise PretrainedError(f"{type(model).__name__} has no pretrained encoder (encoder weights load into unet/unetpp "
                              f"with encoder=resnet18/34/50, and into {', '.join(with_weights) or 'no other model'}).")
    return CONVERTERS[kind]


# ------------------------------------------------------------------------------------------------ conversion


def convert(tensors: Mapping[str, np.ndarray], *, model, target: PyTree, source: str = "the file") -> dict[Path, np.ndarray]:
    """Converts a checkpoint's tensors into the model's encoder variables, checking the match both ways.

    Args:
        tensors: ``{key: array}`` as read by `read_checkpoint`.
        model: the Flax model (chooses the format).
        target: the model's variables or their shapes (``jax.eval_shape`` of ``model.init``).
        source: how to name the file in error messages.

    Returns:
        ``{(collection, 'encoder', ..., leaf): array}`` for every variable of the encoder, in the target's dtype.

    Raises:
        PretrainedError: naming the unexpected, missing and mis-shaped tensors (all of them at once).
    """
    fmt, fn = _converter(model)
    if CONVERTED_MARKER in tensors:
        fmt, fn = "anemia_jax encoder.npz", convert_converted
    flat_target = {k: v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(target)).items()
                   if len(k) > 1 and k[1] == ENCODER_SCOPE}
    out, unexpected, misshaped, origin = {}, [], [], {}
    for key, w in tensors.items():
        try:
            converted = fn(key, np.asarray(w))
        except KeyError:
            unexpected.append(key)
            continue
        if converted is None:
            continue
        path, value = converted
        if path[-1] == "pos_embedding" and path in flat_target:
            value = _resize_pos_embedding(value, flat_target[path].shape[1:3])
        if path not in flat_target:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(flat_target[path].shape):
            misshaped.append(f"{key}: file {tuple(w.shape)} -> {tuple(value.shape)}, model "
                             f"{'/'.join(path)} {tuple(flat_target[path].shape)}")
        else:
            out[path] = np.asarray(value, dtype=flat_target[path].dtype)
            origin[path] = key
    missing = sorted("/".join(p) for p in flat_target if p not in out)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not in the model): {', '.join(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} encoder variable(s) missing from the file: {', '.join(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {'; '.join(misshaped)}")
    if problems:
        raise PretrainedError(
            f"{source} does not fit {type(model).__name__} as a {fmt} checkpoint: " + ". ".join(problems)
            + ". Check that the file is the one for this model and size (see the README's 'Pretrained encoders').")
    return out


def load_pretrained(variables: PyTree, path: str | pathlib.Path, *, model) -> PyTree:
    """``variables`` with the encoder replaced by the weights in ``path`` (everything else untouched).

    Args:
        variables: the model's variables (``{'params': ..., 'batch_stats': ...}``), e.g. from ``model.init``.
        path: a weight file of the model's format (see the module docstring) or a `convert_weights` output.
        model: the Flax model the variables belong to.

    Returns:
        A new variables dict (numpy arrays in the encoder, the other leaves as they were).
    """
    converted = convert(read_checkpoint(path), model=model, target=variables, source=str(path))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    flat.update(converted)
    return flax.traverse_util.unflatten_dict(flat)


def apply_to_variables(model_config: Mapping[str, Any], variables: PyTree, *, model) -> PyTree:
    """`load_pretrained` from ``model_config['pretrained']`` (a path; unset, None or '' leaves ``variables`` as they are).

    The trainer calls it once, when it creates a new train state (not on resume: the checkpoint has the weights).
    """
    path = model_config.get("pretrained") if hasattr(model_config, "get") else None
    if not path:
        return variables
    return load_pretrained(variables, path, model=model)
