"""Orbax checkpoints of the full training state: save every N steps, keep the last K plus the best, resume.

One checkpoint is a step directory under ``<workdir>/checkpoints`` holding two items:

* ``state``: the whole `steps.TrainState` (step, params, batch_stats, opt_state, rng) through Orbax's
  ``PyTreeCheckpointHandler`` (the layout ``ocp.args.StandardSave`` writes; checkpoints of either restore); every
  process writes its shards, as Orbax requires. Its array handler spreads the writing of a replicated array over the
  replicas (Orbax's replica-parallel saving) only where each replica's slice is at least 1 MiB
  (`anemia_jax.runs.checkpoint_handlers`).
* ``meta``: a small JSON record (``ocp.args.JsonSave``) the trainer uses to carry run bookkeeping across a resume
  (e.g. the best validation metrics seen so far, cumulative training time, the model config).

Integrity (`anemia_jax.runs.checkpoint_integrity`): each checkpoint also holds ``checksums.json`` (size and SHA-256 of
every file of its items), written once Orbax has finalised it and before Orbax commits the directory. Every restore
first verifies it: a damaged checkpoint raises `DamagedCheckpointError` naming it and the difference, never restoring
altered numbers; one without a manifest is restored with a warning only when it may have been written before
manifests existed (no older checkpoint beside it has one): a checkpoint whose older siblings have manifests was
written by code that writes them, so its missing manifest is damage (deleted or lost), never a reason to trust it.
Any failure to read it is a `DamagedCheckpointError` too. A checkpoint whose arrays do not fit the template raises
`CheckpointMismatchError` ("written by a different model configuration"), listing the differences in one paragraph.
`restore_latest_intact` is the trainer's resume: the newest usable checkpoint, damaged ones set aside
(`quarantine`) with a warning.

The position in the data order is not stored separately: the input pipeline's ``train_batch(step)`` is a pure
function of ``(seed, step)``, so the restored ``state.step`` is the position.

Retention (``preservation_policy``): the latest ``max_to_keep`` checkpoints, plus the one whose validation metrics
are best under ``best_metric`` (checkpoints saved without metrics never count as best). Restoring always targets
the shardings of a caller-supplied template state (built on the current mesh), so a checkpoint written on 8
devices restores on 1 or 2.
"""

from __future__ import annotations

import logging as pylogging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as ppl

from anemia_jax.runs import checkpoint_handlers, checkpoint_integrity
from anemia_jax.utils import conversions, errors, paths

PyTree = Any

_STATE = "state"
_META = "meta"
_ITEMS = (_STATE, _META)


class MissingCheckpointError(errors.CheckpointError, FileNotFoundError):
    """No checkpoint at the requested step (or none at all)."""


class DamagedCheckpointError(errors.CheckpointError):
    """A checkpoint's files differ from its manifest, or cannot be read; ``step`` names it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointMismatchError(errors.CheckpointError):
    """A checkpoint's arrays do not fit the model it is restored into (another model configuration)."""


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
            shared/cloud storage (``gs://bucket/runs/x/checkpoints``, kept as given: see `paths.as_path`).
        max_to_keep: how many of the latest checkpoints to keep (>= 1).
        best_metric: key of the metrics dict passed to `save` that ranks checkpoints (higher is better); the best
            one is kept in addition to the latest ``max_to_keep``.
        async_save: write in a background thread, so training continues while the arrays are written.
        cleanup_tmp: delete temporary directories left by an interrupted save. Only the run's one writer (the
            trainer, when it starts) may ask for this: a reader (evaluation while training runs) would delete the
            save in progress.
        read_only: open the checkpoints of a run that may still be training, for restoring only (`restore.load_run`):
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
        self.directory: epath.Path = paths.as_path(directory)
        self.best_metric = best_metric
        self.read_only = read_only

        def metric(metrics: Mapping[str, float]) -> float:
            return float(metrics[best_metric])

        self._saving: int | None = None  # the step whose asynchronous save is in flight
        self._async = async_save
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
            # Runs once every process has written its part, before Orbax commits the directory (primary only).
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest_of_save)
            if async_save and not read_only else None,
        )
        # Before the manager exists: creating a read-only one is what warns. Idempotent (a logger holds a filter once).
        logging.get_absl_logger().addFilter(_EXPECTED_WARNINGS_FILTER)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=checkpoint_handlers.handler_registry(_STATE, _META))

    # ----------------------------------------------------------------------------------------------- integrity

    def step_dir(self, step: int) -> epath.Path:
        """The directory of checkpoint ``step``."""
        return self.directory / str(step)

    def _write_manifest_of_save(self) -> None:
        step = self._saving
        if step is None:
            return
        # Before the commit the checkpoint lives in Orbax's temporary directory (local disks); object stores have none.
        pending = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        checkpoint_integrity.write_manifest(pending[-1] if pending else self.step_dir(step), _ITEMS)

    def verify(self, step: int) -> checkpoint_integrity.Verdict:
        """Checks checkpoint ``step`` against its manifest (`checkpoint_integrity.verify`). A checkpoint without a
        manifest is 'damaged' when an older checkpoint beside it has one (then it was written with one), else
        'unverified' (it may predate manifests)."""
        verdict = checkpoint_integrity.verify(self.step_dir(step))
        if verdict.status != "unverified":
            return verdict
        older = [s for s in self._manager.all_steps() if s < step
                 and (self.step_dir(s) / checkpoint_integrity.MANIFEST).exists()]
        if older:
            return checkpoint_integrity.Verdict(
                "damaged", f"its checksum manifest is missing, although the older checkpoint step {max(older)} beside "
                "it has one: it was written with a manifest, which has been deleted or lost, so its files cannot be "
                "trusted")
        return verdict

    def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"Checkpoint step {step} in {self.directory} is damaged: {reason}.", step)

    def _check_usable(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise MissingCheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                                         f"available: {self.all_steps() or 'none'}.")
        verdict = self.verify(step)
        if verdict.status == "damaged":
            raise self._damaged(step, verdict.reason)
        if verdict.status == "unverified":
            logging.warning("Checkpoint step %d in %s has no checksum manifest, and no older checkpoint beside it has "
                            "one (it may predate manifests): restoring it without an integrity check.", step,
                            self.directory)

    def _check_tree(self, step: int, template: PyTree, *, partial: bool,
                    model_config: Mapping[str, Any] | None) -> None:
        handler = ocp.PyTreeCheckpointHandler()  # reads the stored tree alone, whatever the manager has registered
        try:
            saved = handler.metadata(self.step_dir(step) / _STATE)
        except Exception as e:  # noqa: BLE001 -- Orbax signals unreadable metadata in many ways
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise self._damaged(step, f"its tree metadata cannot be read ({type(e).__name__}: {first_line})") from None
        finally:
            handler.close()
        saved = getattr(saved, "tree", saved)
        if partial and isinstance(saved, Mapping):
            saved = {k: v for k, v in saved.items() if k in template}
        difference = checkpoint_integrity.tree_mismatch(saved, template)
        if difference is None:
            return
        hint = ""
        if model_config is not None:
            recorded = self._read_meta(step).get("model")
            given = conversions.jsonable(dict(model_config))  # as JSON has it: tuples are lists
            changes = conversions.nested_diff(recorded, given) if isinstance(recorded, Mapping) else []
            if changes:
                hint = f" Its model config differs from the one given: {'; '.join(f'model.{c}' for c in changes)}."
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {self.directory} was written by a different model configuration than the "
            f"one it is being restored into: {difference}.{hint} Use the config the run was trained with (its "
            "config.json as the trainer wrote it, without --config.model.* overrides), or train a new run in another "
            "workdir.")

    def _read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
            return dict(restored[_META] or {})
        except Exception:  # noqa: BLE001 -- only a hint for a message
            return {}

    def quarantine(self, step: int) -> epath.Path:
        """Moves damaged checkpoint ``step`` out of the way (``<directory>_damaged/<step>``, kept for inspection), so
        that it is neither restored nor in the way of saving that step again. Writers only; every process calls it
        (process 0 moves, the others wait for it)."""
        if self.read_only:
            raise RuntimeError("A read_only CheckpointManager never moves checkpoints.")
        aside = self.directory.parent / f"{self.directory.name}_damaged"
        target = aside / str(step)
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = aside / f"{step}.{len(list(aside.iterdir()))}"
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"anemia_jax:quarantine:{step}")
        self._manager.reload()
        return target

    def restore_latest_intact(self, template: PyTree, *, model_config: Mapping[str, Any] | None = None
                              ) -> tuple[int, PyTree, dict[str, Any]] | None:
        """The newest checkpoint that restores: ``(step, state, meta)``, or None when there is no checkpoint.

        Every damaged checkpoint (newer or older) is moved aside with a warning naming it (`quarantine`), so that
        'best' never points at it and its step can be saved again.

        Raises:
            CheckpointMismatchError: the newest readable checkpoint belongs to another model configuration.
            DamagedCheckpointError: every checkpoint is damaged.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, template, model_config=model_config)
            except DamagedCheckpointError as e:
                damaged.append(str(e))
                logging.warning("%s Moved it to %s; using an older checkpoint.", e, self.quarantine(step))
                continue
            for other in self.all_steps():
                verdict = self.verify(other) if other != step else checkpoint_integrity.Verdict("intact")
                if verdict.status == "damaged":
                    logging.warning("%s Moved it to %s.", self._damaged(other, verdict.reason),
                                    self.quarantine(other))
            return step, state, meta
        if damaged:
            raise DamagedCheckpointError(
                f"No usable checkpoint in {self.directory}: {' '.join(damaged)} They were moved to "
                f"{self.directory}_damaged/. Rerun to train from scratch, or restore the files from a backup.",
                -1)
        return None

    # ----------------------------------------------------------------------------------------------- steps

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
        self._manager.wait_until_finished()  # the manifest hook below belongs to one save at a time
        if metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"metrics must contain {self.best_metric!r} (the ranking metric); got {sorted(metrics)}.")
        args = ocp.args.Composite(**{
            _STATE: ocp.args.PyTreeSave(state),
            _META: ocp.args.JsonSave(dict(meta or {})),
        })
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._saving = step
        saved = bool(self._manager.save(step, args=args, metrics=clean, force=True))
        if saved and not self._async and jax.process_index() == 0:
            checkpoint_integrity.write_manifest(self.step_dir(step), _ITEMS)  # a synchronous save is committed
        return saved

    def _orbax_restore(self, step: int, args) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore report unreadable files in many ways
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise self._damaged(step, f"its files cannot be read ({type(e).__name__}: {first_line})") from e

    def restore(self, step: int, template: PyTree, *, model_config: Mapping[str, Any] | None = None
                ) -> tuple[PyTree, dict[str, Any]]:
        """Restores checkpoint ``step`` onto the shapes, dtypes and shardings of ``template``, after checking its
        manifest and its tree.

        Args:
            step: an existing checkpoint step (see `latest_step`, `best_step`, `all_steps`).
            template: a state of the same structure, placed as the restored state should be (e.g. the freshly
                initialised, replicated state on the current mesh) -- or its `abstract_like`. A leaf without a
                sharding (a numpy array) is restored as a numpy array.
            model_config: the model config of ``template`` (``config.model``), named in a mismatch message.

        Returns:
            ``(state, meta)``: the restored pytree (structure of ``template``) and the JSON bookkeeping.

        Raises:
            MissingCheckpointError, DamagedCheckpointError, CheckpointMismatchError: see the module docstring.
        """
        self._check_usable(step)
        target = abstract_like(template)
        self._check_tree(step, target, partial=False, model_config=model_config)
        restored = self._orbax_restore(step, ocp.args.Composite(**{
            _STATE: ocp.args.PyTreeRestore(item=target,
                                           restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            _META: ocp.args.JsonRestore(),
        }))
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored[_STATE]))
        return state, dict(restored[_META] or {})

    def restore_variables(self, step: int, template: PyTree, *, model_config: Mapping[str, Any] | None = None
                          ) -> PyTree:
        """Restores only the model variables of checkpoint ``step``: what inference needs, no optimizer involved.

        Args:
            step: an existing checkpoint step.
            template: ``{'params': ..., 'batch_stats': ...}`` of arrays or `jax.ShapeDtypeStruct`s with shardings
                (`model_factory.abstract_variables`); the optimizer state and the rest of the saved `steps.TrainState`
                are not read.

            model_config: as for `restore`.

        Returns:
            The variables, structured like ``template``.

        Raises:
            MissingCheckpointError, DamagedCheckpointError, CheckpointMismatchError: see the module docstring.
        """
        self._check_usable(step)
        target = abstract_like(template)
        self._check_tree(step, target, partial=True, model_config=model_config)
        restored = self._orbax_restore(step, ocp.args.Composite(**{
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
