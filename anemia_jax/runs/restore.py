"""A finished (or running) training run on disk, restored for inference: config, model, chosen checkpoint, variables.

A run directory, as `anemia_jax.training.train.train_and_evaluate` leaves it, holds ``config.json`` (the resolved
config) and ``checkpoints/`` (Orbax step directories of the full `steps.TrainState`). `load_run` turns it back into what
inference needs, with the experiment's own builders (`anemia_jax.training.experiment`), so nothing can drift from
training:

* the config (`load_config`), the flax model (`model_factory.build_model`) and a 1-D ``data`` mesh (every device here
  by default; a checkpoint written on 8 devices restores on 1);
* the model variables (``params`` and BatchNorm ``batch_stats``) of a chosen checkpoint -- ``'best'`` by
  validation mean Dice, ``'latest'``, a step number, or ``'auto'`` (see `auto_checkpoint`) -- restored alone: no
  optimizer is built and its state is never read (`checkpointing.CheckpointManager.restore_variables`). Every restore
  verifies the checkpoint's checksums first: when the chosen 'best'/'latest'/'auto' checkpoint is damaged, the newest
  intact one is used instead, with a warning naming the damaged one; a damaged ``STEP`` asked for by number is an
  error (`checkpointing.DamagedCheckpointError`), as is a checkpoint of another model configuration
  (`checkpointing.CheckpointMismatchError`).

`load_runs` restores several runs at once (e.g. the K folds of a cross-validation) and checks that they can form an
ensemble; `probability_of` gives the inference function and variables of one run or of such an ensemble.

Run directories may be local or on shared/cloud storage (``gs://bucket/runs/x``): paths are `etils.epath.Path`s
(`paths.as_path`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from anemia_jax.runs import checkpointing, model_factory
from anemia_jax.utils import input_files, parallel, paths

__all__ = ["SELECTION_SPLIT", "Run", "auto_checkpoint", "load_config", "load_run", "load_runs",
           "resolve_checkpoint", "restore_chosen"]

# The split the trainer ranks checkpoints on ('best' = highest mean Dice there), whatever the protocol.
SELECTION_SPLIT = "val"


@dataclasses.dataclass
class Run:
    """A restored run.

    Attributes:
        workdir: the run directory.
        config: its resolved config (from ``config.json``, with any command-line overrides applied).
        model: the flax model, built exactly as the trainer builds it.
        mesh: the 1-D ``data`` mesh the variables are replicated over.
        variables: ``{'params', 'batch_stats'}`` of the checkpoint (replicated).
        step: the checkpoint's step.
        checkpoint: how it was chosen: 'best', 'latest' or 'step'.
        checkpoint_reason: why (for ``checkpoint='auto'``, `auto_checkpoint`'s reason), for reports.
    """

    workdir: epath.Path
    config: ml_collections.ConfigDict
    model: Any
    mesh: Mesh
    variables: dict[str, Any]
    step: int
    checkpoint: str
    checkpoint_reason: str = ""

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the model was trained at: every input is resized to it."""
        h, w = self.config.image_size
        return int(h), int(w)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (``<workdir>/config.json``; local or a URL).

    Raises:
        FileNotFoundError: ``workdir`` is not a run directory.
    """
    path = paths.as_path(workdir) / "config.json"
    if not input_files.is_regular_file(path):  # a FIFO in its place is refused, never waited on
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training run directory. Train one with "
                                "`python -m anemia_jax.main --config=... --workdir=DIR` and pass that DIR.")
    text = input_files.read_file(path, max_bytes=64 << 20, what="Run config").decode("utf-8")
    try:
        return ml_collections.ConfigDict(json.loads(text))
    except ValueError as e:
        raise ValueError(f"{path} is not the JSON a trainer writes ({e}); {workdir} is not a usable run "
                         "directory.") from None


def auto_checkpoint(split: str | None) -> tuple[str, str]:
    """What ``--checkpoint=auto`` means for scoring ``split``: ``('latest' or 'best', why)``.

    'best' is the checkpoint with the highest mean Dice on the validation split (`SELECTION_SPLIT`), so its score
    on that same split is optimistic: there 'auto' is 'latest', which nothing selected. On any other split (test,
    train) or on new photos (``split`` None) selection saw none of the data, and 'auto' is 'best'.
    """
    if split == SELECTION_SPLIT:
        return "latest", (f"'best' was selected by mean Dice on this same {split!r} split, so its score here would "
                          "be optimistic; the latest checkpoint was not selected on it")
    where = f"the {split!r} split" if split else "new images"
    return "best", f"model selection used the {SELECTION_SPLIT!r} split, not {where}"


def resolve_checkpoint(manager: checkpointing.CheckpointManager, which: str | int, *, split: str | None = None
                       ) -> tuple[int, str]:
    """The step of checkpoint ``which`` ('best', 'latest', a step number or 'auto') and what it turned out to be.

    'auto' becomes `auto_checkpoint` (``split``)'s choice, logged with the reason. 'best' falls back to 'latest'
    (with a warning) when no checkpoint was saved with validation metrics.
    """
    available = manager.all_steps()
    if not available:
        raise checkpointing.MissingCheckpointError(f"No checkpoint in {manager.directory}; has the run saved one "
                                                   "yet?")
    text = str(which).strip().lower()
    if text == "auto":
        text, why = auto_checkpoint(split)
        logging.info("--checkpoint=auto: using the %s checkpoint (%s).", text, why)
    if text == "best":
        best = manager.best_step()
        if best is not None:
            return best, "best"
        logging.warning("No checkpoint in %s was saved with validation metrics; using the latest.", manager.directory)
        text = "latest"
    if text == "latest":
        return manager.latest_step(), "latest"
    try:
        step = int(text)
    except ValueError:
        raise ValueError(f"checkpoint must be 'auto', 'best', 'latest' or a step number; got {which!r}.") from None
    if step not in available:
        raise checkpointing.MissingCheckpointError(f"No checkpoint for step {step} in {manager.directory}; "
                                                   f"available: {available}.")
    return step, "step"


def restore_chosen(manager: checkpointing.CheckpointManager, step: int, how: str, template: Any, *,
                   model_config: Any = None) -> tuple[int, Any]:
    """``(step, variables)`` of checkpoint ``step`` as `resolve_checkpoint` chose it (``how``); if it is damaged and
    was chosen as 'best' or 'latest', of the newest intact checkpoint instead (with a warning naming the damaged
    one). A damaged checkpoint asked for by number (``how == 'step'``) raises."""
    candidates = [step] if how == "step" else [step] + [s for s in reversed(manager.all_steps()) if s != step]
    damaged = []
    for candidate in candidates:
        try:
            return candidate, manager.restore_variables(candidate, template, model_config=model_config)
        except checkpointing.DamagedCheckpointError as e:
            if how == "step":
                raise checkpointing.DamagedCheckpointError(
                    f"{e} It was asked for by number (--checkpoint={step}); choose another "
                    f"(available: {manager.all_steps()}) or --checkpoint=latest, which skips damaged ones.",
                    step) from None
            damaged.append(str(e))
            logging.warning("%s Falling back to the newest intact checkpoint.", e)
    raise checkpointing.DamagedCheckpointError(f"No intact checkpoint in {manager.directory}: {' '.join(damaged)}",
                                               step)


def load_run(workdir: str | os.PathLike, *, checkpoint: str | int = "best", mesh: Mesh | None = None,
             split: str | None = None, config: ml_collections.ConfigDict | None = None) -> Run:
    """Restores the model variables of checkpoint ``checkpoint`` of the run in ``workdir`` on ``mesh``.

    Args:
        workdir: a run directory (``config.json`` plus ``checkpoints/``), local or a URL (``gs://...``).
        checkpoint: 'best' (highest validation mean Dice among those kept), 'latest', a step number, or 'auto'
            (`auto_checkpoint`: 'latest' when ``split`` is the validation split, 'best' otherwise).
        mesh: the mesh to replicate the variables over; default `parallel.make_mesh()` (every device).
        split: the split the restored model will be scored on ('val', 'test', 'train'; None for new images);
            only 'auto' reads it.
        config: the run's config if the caller already has it (e.g. with command-line overrides applied);
            default: read from ``config.json``.
    """
    workdir = paths.as_path(workdir)
    config = config if config is not None else load_config(workdir)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    model = model_factory.build_model(config)
    template = model_factory.abstract_variables(model, tuple(config.image_size), mesh)
    # Read-only: the run may still be training; its trainer alone creates, cleans and prunes checkpoints/.
    manager = checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=max(1, config.keep_checkpoints),
                                              read_only=True)
    try:
        step, how = resolve_checkpoint(manager, checkpoint, split=split)
        chosen = step
        step, variables = restore_chosen(manager, step, how, template, model_config=config.model.to_dict())
    finally:
        manager.close()
    logging.info("Restored %s checkpoint step %d of %s.", how, step, workdir)
    if str(checkpoint).strip().lower() == "auto":
        reason = f"--checkpoint=auto: {auto_checkpoint(split)[1]}"
    else:
        reason = f"requested as {checkpoint!r}"
    if step != chosen:
        # The newest intact checkpoint stands in for the damaged choice.
        how, reason = "latest", f"{reason}; {how} checkpoint step {chosen} is damaged, so the newest intact one"
    return Run(workdir, config, model, mesh, variables, int(step), how, reason)


def load_runs(workdirs: Sequence[str | os.PathLike], *, checkpoint: str | int = "best", mesh: Mesh | None = None,
              split: str | None = None, configs: Sequence[ml_collections.ConfigDict] | None = None) -> list[Run]:
    """`load_run` for each of ``workdirs`` on one mesh, checked to predict the same targets at the same resolution
    (so that they can be averaged as an ensemble).

    Raises:
        ValueError: no run, or runs whose targets or training resolutions differ (the message names them).
    """
    if not workdirs:
        raise ValueError("No run directory given; pass at least one --workdir.")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    configs = list(configs) if configs is not None else [None] * len(workdirs)
    runs = [load_run(w, checkpoint=checkpoint, mesh=mesh, split=split, config=c) for w, c in zip(workdirs, configs)]
    first = runs[0]
    for run in runs[1:]:
        if run.targets != first.targets or run.image_size != first.image_size:
            raise ValueError(f"Runs to combine must predict the same targets at the same resolution: {first.workdir} "
                             f"has {first.targets} at {first.image_size}, {run.workdir} has {run.targets} at "
                             f"{run.image_size}.")
    return runs
