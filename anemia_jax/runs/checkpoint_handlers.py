"""The Orbax handlers of a checkpoint's items: the training state with replica-parallel saving for large arrays only.

Orbax's replica-parallel saving (on unless ``JAX_PLATFORMS`` names a GPU) writes a replicated array from every
replica, each its slice of it, so that several hosts share the writing. The slices are cut with eager ops, one per
replica, and each new shape compiles once: for a model's many small arrays that costs far more than the writes it
spreads. The tiny test UNet++ on 8 CPU devices took 2.81 s for its first save and 4.91 s for six; with slices of at
least `MIN_REPLICA_SLICE_BYTES` only, 0.08 s and 1.33 s. A slice is the array divided by the number of replicas
(devices), so the largest kernels of the full-width models are still spread: UNet++'s 3x3x512x512 (9.4 MB) over up
to 8 replicas, U-Net's 3x3x1024x1024 (37.7 MB) over up to 32; beyond that, and for everything smaller, an array is
written by the process holding replica 0, as Orbax does on GPUs.

The ``state`` item is saved through Orbax's ``PyTreeCheckpointHandler`` with a type-handler registry of its own:
Orbax's defaults with that one setting changed, so a checkpoint's files and layout are those of
``ocp.args.StandardSave`` (checkpoints written either way restore either way).
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging

MIN_REPLICA_SLICE_BYTES = 1 << 20

__all__ = ["MIN_REPLICA_SLICE_BYTES", "handler_registry", "state_handler"]


def _array_handler() -> ocp.type_handlers.TypeHandler:
    default = ocp.type_handlers.get_type_handler(jax.Array)
    # Orbax exports no constructor for the array-metadata store (the per-host metadata files, which restore typed
    # PRNG keys as keys), so it is taken from Orbax's own handler. Any other handler than the one this was written
    # against (a later Orbax, a registration with other options) is used unchanged: slower small saves, never other
    # files.
    store = getattr(default, "_array_metadata_store", None)
    if type(default) is not ocp.type_handlers.ArrayHandler or store is None:
        logging.warning("Orbax's jax.Array handler is not the one anemia_jax configures (%s); saving with it as it "
                        "is (replica-parallel saving of small arrays costs seconds on some saves).",
                        type(default).__name__)
        return default
    return ocp.type_handlers.ArrayHandler(array_metadata_store=store,
                                          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """The ``state`` item's handler: Orbax's default type handlers, arrays with `MIN_REPLICA_SLICE_BYTES`."""
    arrays = _array_handler()
    registry = ocp.type_handlers.create_type_handler_registry(*[
        (ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()])
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def handler_registry(state_item: str, meta_item: str) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The manager's registry: ``state_item`` saved and restored as a pytree through `state_handler`, ``meta_item``
    as JSON. (Registered per item and argument type, so one manager can restore the whole state and, partially, the
    model variables alone; Orbax's ``item_names`` bound an item to the first handler it used.)"""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = state_handler()
    registry.add(state_item, ocp.args.PyTreeSave, state)
    registry.add(state_item, ocp.args.PyTreeRestore, state)
    registry.add(meta_item, ocp.args.JsonSave)
    registry.add(meta_item, ocp.args.JsonRestore)
    return registry
