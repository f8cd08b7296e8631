"""Device mesh and host <-> device transfer helpers for data parallelism.

Training runs in the pmap programming model (per-device code with an explicit
axis name) expressed with `jax.shard_map` under `jax.jit`, over a 1-D mesh whose
single axis, `DATA_AXIS`, spans every device of every process. This module owns
that mesh and the few transfer helpers that are safe in multi-process
(multi-controller) runs, where no process can see the whole of a global array:

* `make_mesh` -- the 1-D `Mesh`, devices grouped by process so that each
    process's local devices hold one contiguous block of the global batch.
* `replicated` / `data_sharded` -- the two `NamedSharding`s the steps use.
* `replicate` -- host values (identical in every process) to a replicated
    global array.
* `host_local_to_global` -- this process's part of a batch to a global array
    sharded on the leading axis.
* `fetch` -- global arrays back to host NumPy, gathering across processes when
    a process only holds part of an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

PyTree = Any


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis `DATA_AXIS` over `devices` (default: all).

    Devices are ordered by (process index, device id): every process's local
    devices then form one contiguous run of the mesh, so the rows a process
    feeds through `host_local_to_global` are one contiguous block of the global
    batch (process 0 first).

    Args:
        devices: devices to span; default `jax.devices()`, i.e. every device of
            every process. In a multi-process run every process must pass the same
            list.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device; got an empty list.")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value that every device holds in full (parameters, state)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading axis split over `DATA_AXIS`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(
                "replicate() got a typed PRNG key array; store keys as "
                "jax.random.key_data(key) (uint32) so they can be transferred and "
                "checkpointed.")
        return fetch(x)
    return np.asarray(x)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places a pytree on every device of `mesh`, replicated.

    Multi-host safe: each leaf is built with `jax.make_array_from_callback` from
    this process's host copy, so every process must pass identical values (as
    they do when they all compute them from the same seed). Every leaf gets a
    fresh device buffer, which makes the result safe to donate.

    Args:
        tree: pytree of NumPy arrays, Python scalars or (fully addressable or
            replicated) `jax.Array`s.
        mesh: the target mesh.

    Returns:
        The same pytree of global `jax.Array`s with sharding `replicated(mesh)`.
    """
    sharding = replicated(mesh)

    def put(leaf):
        host = _to_host(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def host_local_to_global(batch_np: PyTree, mesh: Mesh) -> PyTree:
    """Turns this process's rows of a batch into global arrays sharded on 'data'.

    Every process passes its own rows (the same number in each process); the
    global batch is their concatenation in process order, see `make_mesh`.

    Args:
        batch_np: pytree of host arrays with a leading batch axis of size
            `global_batch // jax.process_count()`, divisible by the number of this
            process's devices in `mesh`.
        mesh: the mesh from `make_mesh`.

    Returns:
        The pytree of global `jax.Array`s, leading axis sharded `P('data')`.
    """
    sharding = data_sharded(mesh)
    num_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def put(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] == 0 or leaf.shape[0] % num_local:
            raise ValueError(
                f"A per-process batch leaf has shape {leaf.shape}, but its leading "
                f"(batch) axis must be a positive multiple of this process's "
                f"{num_local} device(s) in the mesh; choose a global batch size "
                f"divisible by the total device count ({mesh.size}).")
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree.map(put, batch_np)


def fetch(tree: PyTree) -> PyTree:
    """Copies a pytree of (possibly global) arrays to host NumPy arrays.

    The results own their memory (never views of device buffers), so fetching a
    state does not stop the next step from donating it. Replicated arrays are
    read from a local copy; arrays sharded across processes are gathered with
    `multihost_utils.process_allgather` -- a collective, so in a multi-process
    run every process must call `fetch` on the same arrays in the same order.
    """

    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            host = jax.device_get(x)
        elif x.is_fully_replicated:
            host = x.addressable_data(0)
        else:
            host = multihost_utils.process_allgather(x, tiled=True)
        host = np.asarray(host)
        # On CPU backends device_get can return a zero-copy view of the device
        # buffer; while such a view lives, the buffer cannot be donated and a
        # donating step (train_step) would silently copy its state instead.
        return host if host.flags.owndata else host.copy()

    return jax.tree.map(get, tree)
