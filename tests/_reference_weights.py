"""Deterministic numpy weights for a checkpoint's key list, shared by the tests and the golden-file script.

Both tests/fixtures/make_reference_fixtures.py (which feeds them to the PyTorch reference models) and the tests (which
load them into the Flax models through anemia_jax.training.pretrained) draw every tensor from a generator seeded by the
tensor's name, so the same weights come out whatever the order or the subset of keys.
"""

from __future__ import annotations

import pathlib
import zlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def read_key_list(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(key, shape, dtype)]`` of the fixture ``tests/fixtures/<name>`` (one ``key shape dtype`` per line;
    shape as comma-separated ints, empty for a scalar written as ``-``)."""
    entries = []
    for line in (FIXTURES / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split()
        dims = () if shape == "-" else tuple(int(d) for d in shape.split(","))
        entries.append((key, dims, dtype))
    return entries


def write_key_list(path: pathlib.Path, entries: list[tuple[str, tuple[int, ...], str]], header: str) -> None:
    """Writes a key-list fixture (the inverse of `read_key_list`)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} {','.join(map(str, s)) if s else '-'} {d}" for k, s, d in entries]
    path.write_text("\n".join(lines) + "\n")


def reference_tensor(key: str, shape: tuple[int, ...], dtype: str, *, layout: str, seed: int = 0) -> np.ndarray:
    """One tensor, drawn from a generator seeded by ``(seed, crc32(key))``.

    Normalisation scales ~1, shifts and biases ~0.1, running variances in [0.5, 1.5], matrices and kernels with
    variance ``1 / fan_in`` (fan-in from the ``layout``: ``'torch'`` = [out, in, ...], ``'jax'`` = [..., in, out],
    attention kernels [in, heads, dim] / [heads, dim, out] included) so deep stacks stay O(1).
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    leaf = key.replace("/", ".").rsplit(".", 1)[-1]
    if dtype.startswith("int"):
        return np.zeros(shape, dtype)
    if leaf == "running_var":
        value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) <= 1 and leaf in ("weight", "scale"):
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) <= 1 or leaf in ("bias", "running_mean") or (layout == "jax" and leaf == "bias"):
        value = 0.1 * rng.standard_normal(shape)
    elif leaf in ("pos_embedding", "cls"):
        value = 0.02 * rng.standard_normal(shape)
    else:
        if layout == "torch":
            fan_in = int(np.prod(shape[1:]))
        elif len(shape) == 3 and "MultiHeadDotProductAttention" in key and key.endswith("out/kernel"):
            fan_in = shape[0] * shape[1]
        elif len(shape) == 3:
            fan_in = shape[0]
        else:
            fan_in = int(np.prod(shape[:-1]))
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    return value.astype(dtype)


def reference_weights(entries, *, layout: str, seed: int = 0) -> dict[str, np.ndarray]:
    """``{key: tensor}`` for every entry of a key list (see `reference_tensor`)."""
    return {k: reference_tensor(k, s, d, layout=layout, seed=seed) for k, s, d in entries}


def reference_input(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """A float32 NHWC test image batch of standard-normal pixels."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
