"""Orbax checkpoints of the full training state: save every N steps, keep the last K plus the best, resume.

One checkpoint is a step directory under ``<workdir>/checkpoints`` holding two items:

* ``state``: the whole `steps.TrainState` (step, params, batch_stats, opt_state, rng) through
  ``ocp.args.StandardSave``; every process writes its shards, as Orbax requires.
* ``meta``: a small JSON record (``ocp.args.JsonSave``) the trainer uses to carry run bookkeeping across a resume
  (e.g. the best validation metrics seen so far, cumulative training time).

The position in the data order is not stored separately: the input pipeline's ``train_batch(step)`` is a pure
function of ``(seed, step)``, so the restored ``state.step`` is the position.

Retention (``preservation_policy``): the latest ``max_to_keep`` checkpoints, plus the one whose validation metrics
are best under ``best_metric`` (checkpoints saved without metrics never count as best). Restoring always targets
the shardings of a caller-supplied template state (built on the current mesh), so a checkpoint written on 8
devices restores on 1 or 2.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import logging as pylogging

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as ppl

from anemia_jax import reporting

PyTree = Any

_STATE = "state"
_META = "meta"


class _ExpectedWarningsFilter(pylogging.Filter):
    """Silences Orbax's warnings about what is here by design: a save without metrics (only evaluated states rank)
    and a read-only manager (every evaluation of a run opens one)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        return "did not provide metrics" not in message and "Given directory is read only" not in message


_EXPECTED_WARNINGS_FILTER = _ExpectedWarningsFilter()


def abstract_like(tree: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct`s (with shardings) of a pytree of arrays: the restore target of that tree."""

    def to_struct(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(to_struct, tree)


class CheckpointManager:
    """Saves and restores training states under one directory (a thin, opinionated `ocp.CheckpointManager`).

    Every process must create it and call `save`/`restore`/`close` in the same order (Orbax synchronises them).

    Args:
        directory: where step directories live (created if missing), e.g. ``<workdir>/checkpoints``; local or on
            shared/cloud storage (``gs://bucket/runs/x/checkpoints``, kept as given: see `reporting.as_path`).
        max_to_keep: how many of the latest checkpoints to keep (>= 1).
        best_metric: key of the metrics dict passed to `save` that ranks checkpoints (higher is better); the best
            one is kept in addition to the latest ``max_to_keep``.
        async_save: write in a background thread, so training continues while the arrays are written.
        cleanup_tmp: delete temporary directories left by an interrupted save. Only the run's one writer (the
            trainer, when it starts) may ask for this: a reader (evaluation while training runs) would delete the
            save in progress.
        read_only: open the checkpoints of a run that may still be training, for restoring only (`runs.load_run`):
            nothing under ``directory`` is created, cleaned up, saved or deleted (`save` raises). A missing
            directory then simply has no checkpoints.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int,
        best_metric: str = "dice/mean",
        async_save: bool = True,
        cleanup_tmp: bool = False,
        read_only: bool = False,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 (the latest checkpoint is what a resume needs); "
                             f"got {max_to_keep}.")
        if read_only and cleanup_tmp:
            raise ValueError("cleanup_tmp=True deletes files, which a read_only manager must not do; only the trainer "
                             "that writes the checkpoints may clean up.")
        self.directory: epath.Path = reporting.as_path(directory)
        self.best_metric = best_metric
        self.read_only = read_only

        def metric(metrics: Mapping[str, float]) -> float:
            return float(metrics[best_metric])

        options = ocp.CheckpointManagerOptions(
            # `best_fn` makes `best_step()` rank by the metric; retention itself is the policy below.
            best_fn=metric,
            best_mode="max",
            preservation_policy=ppl.AnyPreservationPolicy([
                ppl.LatestN(n=max_to_keep),
                ppl.BestN(get_metric_fn=metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=async_save,
            # A run killed mid-write leaves a temporary directory; it is never a restore candidate.
            cleanup_tmp_directories=cleanup_tmp,
            read_only=read_only,
            # Set as read_only would set them, so that Orbax does not warn that it changed them.
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        # Before the manager exists: creating a read-only one is what warns. Idempotent (a logger holds a filter once).
        logging.get_absl_logger().addFilter(_EXPECTED_WARNINGS_FILTER)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the kept checkpoint with the highest ``best_metric`` (None if none was saved with metrics)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Steps of all kept checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with checkpoint ``step`` (None if it was saved without)."""
        self._manager.wait_until_finished()  # an asynchronous save writes its metrics last
        found = self._manager.metrics(step)
        return None if found is None else {k: float(v) for k, v in dict(found).items()}

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        meta: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (asynchronously unless disabled).

        Args:
            step: the checkpoint's step (the number of updates applied to ``state``).
            state: the pytree to save (a `steps.TrainState`); its arrays may keep changing afterwards, since Orbax
                copies them to host memory before `save` returns.
            meta: JSON-serialisable bookkeeping stored beside the state.
            metrics: validation metrics of this state (must contain ``best_metric``), or None when the state was
                not evaluated; only checkpoints with metrics compete for "best".

        Returns:
            False if checkpoint ``step`` already exists (nothing written), else True.
        """
        if self.read_only:
            raise RuntimeError(f"This CheckpointManager of {self.directory} was opened read_only (for restoring); "
                               "open one without read_only to save.")
        if step in self._manager.all_steps():
            return False
        if metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"metrics must contain {self.best_metric!r} (the ranking metric); got {sorted(metrics)}.")
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(dict(meta or {})),
        })
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return bool(self._manager.save(step, args=args, metrics=clean, force=True))

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Restores checkpoint ``step`` onto the shapes, dtypes and shardings of ``template``.

        Args:
            step: an existing checkpoint step (see `latest_step`, `best_step`, `all_steps`).
            template: a state of the same structure, placed as the restored state should be (e.g. the freshly
                initialised, replicated state on the current mesh) -- or its `abstract_like`.

        Returns:
            ``(state, meta)``: the restored pytree (structure of ``template``) and the JSON bookkeeping.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps() or 'none'}.")
        target = abstract_like(template)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _META: ocp.args.JsonRestore(),
        }))
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored[_STATE]))
        return state, dict(restored[_META] or {})

    def restore_variables(self, step: int, template: PyTree) -> PyTree:
        """Restores only the model variables of checkpoint ``step``: what inference needs, no optimizer involved.

        Args:
            step: an existing checkpoint step.
            template: ``{'params': ..., 'batch_stats': ...}`` of arrays or `jax.ShapeDtypeStruct`s with shardings
                (`experiment.abstract_variables`); the optimizer state and the rest of the saved `steps.TrainState`
                are not read.

        Returns:
            The variables, structured like ``template``.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps() or 'none'}.")
        target = abstract_like(template)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True),
        }))
        return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored[_STATE]))

    def reached_preemption(self, step: int) -> bool:
        """True when JAX's preemption service (multi-host runs) says every process should save at ``step`` and stop."""
        return bool(self._manager.reached_preemption(step))

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SigtermFlag:
    """Turns SIGTERM into a flag a training loop polls between steps, so it can save a checkpoint and stop.

    A context manager; the handler is installed only from the main thread and when ``enabled`` (multi-process
    runs should leave SIGTERM to JAX's preemption service, see `CheckpointManager.reached_preemption`), and the
    previous handler is restored on exit.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._enabled = enabled
        self._previous = None

    def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.requested = True

    def __enter__(self) -> SigtermFlag:
        if self._enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
