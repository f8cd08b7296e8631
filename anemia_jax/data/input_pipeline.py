"""Input pipeline: a TFDS split read once, resized once, held whole in device memory, batched on device.

The sets this project trains on are small (Eyes-defy-anemia: 218 photos; Kvasir-SEG: 1000), so instead of streaming,
a split is decoded and resized once on the host (`read_examples`) and then kept resident on the accelerators
(`DeviceDataset`); every training step only sends a few int32 indices to the devices.

Layout. Over a 1-D mesh with axis ``'data'`` of D devices, example ``j`` of the dataset (its row in the
`HostExamples`) lives on device ``j % D`` (round robin, so shard sizes differ by at most one). Every device holds
``S = ceil(N / D)`` rows; a device with fewer real examples is padded with all-zero rows that training never draws
and evaluation marks ``valid=False``. In a multi-process run each process holds only the examples of its own devices
(`process_share`), and global arrays are assembled with `jax.make_array_from_process_local_data`.

Memory bound. Each device holds ``S * (H*W*(3 + C) + 4*C + 5)`` bytes (uint8 image and C uint8 masks, float32 mask
weights, int32 index, bool valid), i.e. about ``N*H*W*(3 + C)`` bytes over the whole mesh; e.g. 218 examples at
512x512 with 3 masks take 343 MB in all, 43 MB per device on 8 devices. Above ``memory_limit_bytes`` per device
(default: half of what ``device.memory_stats()`` reports, else `DEFAULT_MEMORY_LIMIT_BYTES`) `DeviceDataset.from_host`
refuses with a message giving the size; lower ``image_size`` or use more devices (streaming is not implemented).

Batches. ``train_batch(step)`` draws, on every device, ``b = B / D`` examples from that device's own shard (no
cross-device traffic), walking epoch-wise permutations seeded by ``(seed, device, epoch)``: it is a pure function of
``step``, so a run resumed at step s sees exactly the batches of an uninterrupted run. The composition of a global
batch therefore depends on the number of devices D (not on the number of processes). ``eval_batches()`` visits every
real example exactly once; padded slots have ``valid=False``, ``index=-1`` and all-zero content and weights.

A batch is a dict of global `jax.Array`s sharded ``P('data')`` on the leading axis: ``image`` uint8 [B,H,W,3],
``masks`` uint8 [B,H,W,C], ``mask_weights`` float32 [B,C], ``valid`` bool [B], ``index`` int32 [B] (the example's
position in its TFDS split).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anemia_jax.utils import image_io
from anemia_jax.utils.conversions import as_text
from anemia_jax.utils.parallel import DATA_AXIS

# Used when the device does not report its memory (e.g. CPU devices).
DEFAULT_MEMORY_LIMIT_BYTES = 4 * 2**30
DEFAULT_MEMORY_FRACTION = 0.5

# Metadata features of the dataset contract, with the value used when a builder lacks one.
_TEXT_METADATA = ("patient_id", "country", "gender")
_METADATA_DEFAULTS = {"hgb": (np.float32, np.nan), "age": (np.float32, np.nan), "anemic": (np.int32, -1)}

Batch = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------- host side
def mask_names(builder) -> tuple[str, ...]:
    """Names of the builder's mask features: single-channel `tfds.features.Image`s other than ``image``."""
    features = builder.info.features
    return tuple(k for k, f in features.items()
                 if isinstance(f, tfds.features.Image) and k != "image" and f.shape[-1] == 1)


def _data_source(builder, split: str):
    images = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    # Images stay encoded: metadata reads then cost no decoding, and example reads decode with PIL themselves.
    return builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding() for k in images})


def _metadata(records: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for key in _TEXT_METADATA:
        out[key] = np.array([as_text(r.get(key, b"")) for r in records], dtype=object)
    for key, (dtype, default) in _METADATA_DEFAULTS.items():
        out[key] = np.array([r.get(key, default) for r in records], dtype=dtype)
    for name in names:
        out[f"has_{name}"] = np.array([bool(r.get(f"has_{name}", True)) for r in records], dtype=bool)
    return out


_CHUNK = 64  # Records read at once: bounds the encoded image bytes held in memory.


def _read_chunks(source, indices: np.ndarray) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(indices), _CHUNK):
        part = [int(i) for i in indices[start:start + _CHUNK]]
        yield list(source.__getitems__(part)) if hasattr(source, "__getitems__") else [source[i] for i in part]


def read_metadata(builder, split: str) -> dict[str, np.ndarray]:
    """Metadata of every example of ``split``, in data-source order, without decoding any image.

    Returns:
      dict of [N] arrays: ``patient_id``, ``country``, ``gender`` (str objects), ``hgb``, ``age`` (float32, NaN if
      unknown), ``anemic`` (int32, -1 unknown) and ``has_<mask>`` (bool) per mask. A builder lacking one of these
      features gets '' / NaN / -1 / True for it.
    """
    source = _data_source(builder, split)
    names = mask_names(builder)
    records = [{k: v for k, v in r.items() if k not in names and k != "image"}
               for part in _read_chunks(source, np.arange(len(source))) for r in part]
    return _metadata(records, names)


def _check_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}.")
    return size


def _decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Encoded stored photo -> uint8 [H, W, 3] at ``size`` (`image_io.resize_image`: Lanczos, as prediction)."""
    with image_io.open_image(data) as encoded:
        return image_io.resize_image(image_io.to_rgb8(encoded), size)


@dataclasses.dataclass(frozen=True)
class HostExamples:
    """Decoded, resized examples in host memory (row n is example ``indices[n]`` of the split).

    Attributes:
      images: uint8 [N, H, W, 3].
      masks: uint8 [N, H, W, C] in {0, 1}; channel c is mask ``targets[c]``.
      mask_weights: float32 [N, C]; 1 where the mask exists, 0 where it is missing (then the mask is all zero).
      indices: int32 [N]; position of each example in its TFDS split.
      metadata: dict of [N] arrays, the keys of `read_metadata`.
      targets: the C mask names, in channel order.
    """

    images: np.ndarray
    masks: np.ndarray
    mask_weights: np.ndarray
    indices: np.ndarray
    metadata: dict[str, np.ndarray]
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        n, h, w = self.images.shape[:3]
        expected = {"images": (n, h, w, 3), "masks": (n, h, w, self.masks.shape[-1]),
                    "mask_weights": (n, self.masks.shape[-1]), "indices": (n,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"HostExamples.{name} has shape {getattr(self, name).shape}, expected {shape}.")
        if self.targets and len(self.targets) != self.masks.shape[-1]:
            raise ValueError(f"{len(self.targets)} targets {self.targets} for {self.masks.shape[-1]} mask channels.")
        for key, value in self.metadata.items():
            if len(value) != n:
                raise ValueError(f"metadata[{key!r}] has {len(value)} entries for {n} examples.")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.images.shape[1:3]

    def subset(self, rows) -> HostExamples:
        """The examples at ``rows`` (positions into these arrays, not split indices), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return HostExamples(self.images[rows], self.masks[rows], self.mask_weights[rows], self.indices[rows],
                            {k: v[rows] for k, v in self.metadata.items()}, self.targets)


def read_examples(builder, split: str, indices, *, image_size, targets: Sequence[str],
                  num_threads: int | None = None) -> HostExamples:
    """Reads and decodes the examples ``indices`` of ``split``, resizing each once to ``image_size``.

    Args:
      builder: a prepared TFDS builder (array_record) following the dataset contract.
      split: split name, e.g. ``'train'``.
      indices: int [N] positions in the split (any order; repeated entries are read twice).
      image_size: ``(H, W)`` or an int for square images. Photos are resized to exactly this size (the aspect ratio
        is not kept) with Lanczos; masks by area coverage >= 0.5, so they stay binary.
      targets: mask names to stack as channels, e.g. ``('palpebral',)``.
      num_threads: decoding threads (PIL releases the GIL); default min(8, cpu count).

    Returns:
      `HostExamples` with rows in the order of ``indices``.
    """
    size = _check_size(image_size)
    available = mask_names(builder)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in available]
    if unknown or not targets:
        raise ValueError(f"targets {targets!r} must be a non-empty subset of this dataset's masks {available}.")
    source = _data_source(builder, split)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
        raise IndexError(f"indices must lie in [0, {len(source)}) for split {split!r}; got range "
                         f"[{indices.min()}, {indices.max()}].")
    n, c = len(indices), len(targets)
    images = np.zeros((n, *size, 3), np.uint8)
    masks = np.zeros((n, *size, c), np.uint8)
    weights = np.ones((n, c), np.float32)
    records: list[dict[str, Any]] = []

    def decode(row: int, record: dict[str, Any]) -> None:
        images[row] = _decode_image(record["image"], size)
        for ch, name in enumerate(targets):
            if record.get(f"has_{name}", True):
                masks[row, ..., ch] = image_io.decode_mask(record[name], size)
            else:
                weights[row, ch] = 0.0

    workers = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for part in _read_chunks(source, indices):
            start = len(records)
            records.extend({k: v for k, v in r.items() if k not in available and k != "image"} for r in part)
            list(pool.map(decode, range(start, start + len(part)), part))
    return HostExamples(images, masks, weights, indices.astype(np.int32), _metadata(records, available), targets)


# ------------------------------------------------------------------------------------------------------ layout
def shard_sizes(num_examples: int, num_devices: int) -> np.ndarray:
    """Real examples per device under the round-robin layout (example j on device j % D): int64 [D]."""
    return np.array([len(range(k, num_examples, num_devices)) for k in range(num_devices)], np.int64)


def process_share(num_examples: int, device_processes: Sequence[int], process_index: int) -> np.ndarray:
    """Rows (of the whole dataset) that process ``process_index`` holds, grouped by its devices in mesh order.

    Args:
      num_examples: N, the size of the whole dataset.
      device_processes: the process index of each mesh device along ``'data'`` (length D).
      process_index: which process.

    Returns:
      int64 [sum of its shard sizes]: device k's rows ``k, k + D, ...`` for each of the process's devices k in
      increasing order. The shares of all processes are disjoint and cover ``range(N)``.
    """
    d = len(device_processes)
    local = [k for k, p in enumerate(device_processes) if p == process_index]
    rows = [np.arange(k, num_examples, d, dtype=np.int64) for k in local]
    return np.concatenate(rows) if rows else np.zeros((0,), np.int64)


def train_device_rows(step: int, *, seed: int, sizes: Sequence[int], devices: Sequence[int],
                      per_device_batch: int) -> np.ndarray:
    """Shard-local rows that devices ``devices`` draw at training step ``step``: int32 [len(devices) * b].

    Device k walks the concatenation of permutations of ``range(sizes[k])`` seeded by ``(seed, k, epoch)`` and takes
    items ``[step*b, (step+1)*b)``; padding rows (>= sizes[k]) are never drawn.
    """
    b = per_device_batch
    out = np.empty((len(devices), b), np.int32)
    for row, k in enumerate(devices):
        n = int(sizes[k])
        if n == 0:
            raise ValueError(f"Device {k} holds no example ({len(sizes)} devices, {int(np.sum(sizes))} examples): "
                             "training needs at least one example per device. Use fewer devices or more data.")
        positions = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        epochs = positions // n
        for epoch in np.unique(epochs):
            perm = np.random.default_rng((seed, k, int(epoch))).permutation(n)
            sel = epochs == epoch
            out[row, sel] = perm[positions[sel] % n]
    return out.reshape(-1)


def eval_device_rows(step: int, *, sizes: Sequence[int], devices: Sequence[int], per_device_batch: int) -> np.ndarray:
    """Shard-local rows for evaluation step ``step``: int32 [len(devices) * b], -1 marking padded slots."""
    offsets = step * per_device_batch + np.arange(per_device_batch)
    rows = [np.where(offsets < sizes[k], offsets, -1) for k in devices]
    return np.concatenate(rows).astype(np.int32)


def device_memory_limit(device, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """``fraction`` of the device's memory if it reports it, else `DEFAULT_MEMORY_LIMIT_BYTES` (bytes)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(fraction * stats["bytes_limit"])
    return DEFAULT_MEMORY_LIMIT_BYTES


def _format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh: Mesh):
    """Jitted per-device gather of batch rows; cached so datasets on one mesh share compilations."""
    def gather(arrays: dict[str, jax.Array], rows: jax.Array) -> Batch:
        # Per device: arrays are this device's [S, ...] shard, rows its [b] local rows (-1: padded slot).
        real = rows >= 0
        safe = jnp.maximum(rows, 0)
        valid = arrays["valid"][safe] & real

        def take(x):
            picked = jnp.take(x, safe, axis=0)
            return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), picked, jnp.zeros((), x.dtype))

        batch = {k: take(v) for k, v in arrays.items() if k not in ("valid", "index")}
        batch["valid"] = valid
        batch["index"] = jnp.where(valid, arrays["index"][safe], -1)
        return batch

    spec = P(DATA_AXIS)
    return jax.jit(jax.shard_map(gather, mesh=mesh, in_specs=(spec, spec), out_specs=spec))


# ------------------------------------------------------------------------------------------------ device side
class DeviceDataset:
    """A dataset resident in device memory, sharded over mesh axis ``'data'`` (see the module docstring)."""

    def __init__(self, *, arrays: dict[str, jax.Array], mesh: Mesh, sizes: np.ndarray, batch_size: int, seed: int,
                 targets: tuple[str, ...], image_size: tuple[int, int]):
        self._arrays = arrays
        self.mesh = mesh
        self.sizes = sizes
        self.batch_size = batch_size
        self.seed = seed
        self.targets = targets
        self.image_size = image_size
        self._sharding = NamedSharding(mesh, P(DATA_AXIS))
        self._local_devices = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
        self._gather = _gather_fn(mesh)

    @classmethod
    def from_host(cls, host: HostExamples, mesh: Mesh, *, batch_size: int, seed: int = 0,
                  num_global_examples: int | None = None, memory_limit_bytes: int | None = None) -> DeviceDataset:
        """Puts this process's share of ``host`` on its devices.

        Args:
          host: every example of the dataset (the same on every process; each keeps its `process_share`), or, when
            ``num_global_examples`` is given, exactly this process's share in `process_share` order.
          mesh: a 1-D `jax.sharding.Mesh` with axis ``'data'``, e.g. ``Mesh(np.array(jax.devices()), ('data',))``.
          batch_size: global training batch B, a multiple of the number of devices D.
          seed: seeds the epoch permutations of `train_batch`.
          num_global_examples: N when ``host`` holds only this process's share.
          memory_limit_bytes: per-device limit; default `device_memory_limit` of the first local device.
        """
        if tuple(mesh.axis_names) != (DATA_AXIS,):
            raise ValueError(f"DeviceDataset needs a 1-D mesh with axis {DATA_AXIS!r}, got axes {mesh.axis_names}.")
        d = mesh.devices.size
        if batch_size < d or batch_size % d:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {d} devices.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        n = len(host) if num_global_examples is None else int(num_global_examples)
        if n == 0:
            raise ValueError("The dataset is empty: there is nothing to put on the devices.")
        sizes = shard_sizes(n, d)
        capacity = int(sizes.max())
        pid = jax.process_index()
        share = process_share(n, [dev.process_index for dev in mesh.devices.flat], pid)
        if num_global_examples is None:
            host = host.subset(share)
        elif len(host) != len(share):
            raise ValueError(f"host holds {len(host)} examples but process {pid}'s share of {n} is {len(share)}; "
                             "read exactly `process_share(...)` of the dataset's indices.")
        (h, w), c = host.image_size, host.masks.shape[-1]
        per_example = h * w * (3 + c) + 4 * c + 4 + 1
        per_device = capacity * per_example
        local_devices = [dev for dev in mesh.devices.flat if dev.process_index == pid]
        if not local_devices:
            raise ValueError(f"Process {pid} has no device in the mesh; every process must hold part of 'data'.")
        limit = memory_limit_bytes if memory_limit_bytes is not None else device_memory_limit(local_devices[0])
        if per_device > limit:
            raise MemoryError(
                f"The dataset needs {_format_bytes(per_device)} per device ({n} examples at {h}x{w} with {c} masks: "
                f"{_format_bytes(n * per_example)} over {d} devices), above the limit of {_format_bytes(limit)} per "
                "device. Lower image_size, use more devices, or raise memory_limit_bytes if the memory is there.")
        # Pad every local device's shard to the common capacity S, then hand JAX the process-local block.
        # host rows are grouped by local device (process_share order); device i's group goes to rows i*S onwards.
        local_sizes = [int(sizes[k]) for k, dev in enumerate(mesh.devices.flat) if dev.process_index == pid]
        dest = np.concatenate([i * capacity + np.arange(m) for i, m in enumerate(local_sizes)]).astype(np.int64)

        def padded(x: np.ndarray, fill=0) -> np.ndarray:
            out = np.full((len(local_sizes) * capacity,) + x.shape[1:], fill, x.dtype)
            out[dest] = x
            return out

        local = {"image": padded(host.images), "masks": padded(host.masks), "mask_weights": padded(host.mask_weights),
                 "index": padded(host.indices.astype(np.int32), -1), "valid": padded(np.ones(len(host), bool), False)}
        sharding = NamedSharding(mesh, P(DATA_AXIS))
        arrays = {k: jax.make_array_from_process_local_data(sharding, v, (d * capacity,) + v.shape[1:])
                  for k, v in local.items()}
        return cls(arrays=arrays, mesh=mesh, sizes=sizes, batch_size=batch_size, seed=seed,
                   targets=host.targets, image_size=(h, w))

    @classmethod
    def from_builder(cls, builder, split: str, indices, mesh: Mesh, *, image_size, targets: Sequence[str],
                     batch_size: int, seed: int = 0, memory_limit_bytes: int | None = None) -> DeviceDataset:
        """Reads only this process's share of examples ``indices`` of ``split`` and builds the dataset from it."""
        indices = np.asarray(indices, np.int64)
        share = process_share(len(indices), [dev.process_index for dev in mesh.devices.flat], jax.process_index())
        host = read_examples(builder, split, indices[share], image_size=image_size, targets=targets)
        return cls.from_host(host, mesh, batch_size=batch_size, seed=seed, num_global_examples=len(indices),
                             memory_limit_bytes=memory_limit_bytes)

    @property
    def num_examples(self) -> int:
        """N, the number of real examples over all processes."""
        return int(self.sizes.sum())

    @property
    def num_devices(self) -> int:
        return len(self.sizes)

    @property
    def capacity(self) -> int:
        """Rows held per device, S = ceil(N / D)."""
        return int(self.sizes.max())

    def steps_per_epoch(self, global_batch: int | None = None) -> int:
        """ceil(N / global_batch): steps that draw about N examples (default: the training batch size)."""
        return math.ceil(self.num_examples / (global_batch or self.batch_size))

    def _batch(self, local_rows: np.ndarray) -> Batch:
        global_rows = jax.make_array_from_process_local_data(
            self._sharding, local_rows, (self.num_devices * (local_rows.size // len(self._local_devices)),))
        return self._gather(self._arrays, global_rows)

    def train_batch(self, step: int) -> Batch:
        """The training batch of ``step`` (>= 0): ``batch_size`` examples, every ``valid`` True."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        rows = train_device_rows(step, seed=self.seed, sizes=self.sizes, devices=self._local_devices,
                                 per_device_batch=self.batch_size // self.num_devices)
        return self._batch(rows)

    def num_eval_batches(self, batch_size: int | None = None) -> int:
        per_device = self._eval_per_device(batch_size)
        return math.ceil(self.capacity / per_device)

    def _eval_per_device(self, batch_size: int | None) -> int:
        batch_size = batch_size or self.batch_size
        if batch_size % self.num_devices:
            raise ValueError(f"eval batch_size={batch_size} must be a multiple of the {self.num_devices} devices.")
        return batch_size // self.num_devices

    def eval_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """Batches of ``batch_size`` (default: the training batch size) covering every example exactly once.

        All processes yield the same number of batches (`num_eval_batches`). Count only ``valid`` entries.
        """
        b = self._eval_per_device(batch_size)
        for step in range(self.num_eval_batches(batch_size)):
            yield self._batch(eval_device_rows(step, sizes=self.sizes, devices=self._local_devices,
                                               per_device_batch=b))

    def __repr__(self) -> str:
        h, w = self.image_size
        return (f"DeviceDataset(num_examples={self.num_examples}, devices={self.num_devices}, capacity={self.capacity},"
                f" image_size=({h}, {w}), targets={self.targets}, batch_size={self.batch_size}, seed={self.seed})")
