"""Loading a finished (or running) training run for evaluation and prediction.

A run directory, as `anemia_jax.train.train_and_evaluate` leaves it, holds ``config.json`` (the resolved config)
and ``checkpoints/`` (Orbax step directories of the full `steps.TrainState`). `load_run` turns it back into
everything inference needs, reusing the trainer's own builders so that nothing can drift from training:

* the config (`load_config`), the flax model (`train.build_model`) and the 1-D ``data`` mesh (`parallel.make_mesh`,
  every device here; a checkpoint written on 8 devices restores on 1);
* the state of a chosen checkpoint (``'best'`` by validation mean Dice, ``'latest'``, a step number, or ``'auto'``:
  see `auto_checkpoint`), restored with `checkpointing.CheckpointManager.restore` into
  `train.abstract_train_state` (shapes only, no compute).

The run directory may be local or on shared/cloud storage (``gs://bucket/runs/x``): paths are `etils.epath.Path`s
(`reporting.as_path`).

`make_probability_fn` is the one inference function of evaluation and prediction: uint8 images in, per-pixel
sigmoid probabilities out, optionally a pruned UNet++ (`steps.make_predict_fn(prune_level=k)`) and optionally
test-time augmentation (`anemia_jax.tta.predict_with_tta`, averaging probabilities).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from anemia_jax import augment, checkpointing, input_pipeline, optim, parallel, reporting, steps, train, tta

__all__ = ["SELECTION_SPLIT", "Run", "add_run_arguments", "auto_checkpoint", "eval_split", "load_config", "load_run",
           "load_run_from_args", "make_probability_fn", "mesh_batch_size", "model_multiple", "parse_tta",
           "predict_images", "resolve_checkpoint"]

# The split the trainer ranks checkpoints on ('best' = highest mean Dice there), whatever the protocol.
SELECTION_SPLIT = "val"


@dataclasses.dataclass
class Run:
    """A restored run.

    Attributes:
        workdir: the run directory.
        config: its resolved config (from ``config.json``).
        model: the flax model, built exactly as the trainer builds it.
        mesh: the 1-D ``data`` mesh the state is replicated over.
        state: the restored `steps.TrainState` (replicated).
        step: the checkpoint's step.
        checkpoint: how it was chosen: 'best', 'latest' or 'step'.
        checkpoint_reason: why (for ``checkpoint='auto'``, `auto_checkpoint`'s reason), for reports.
    """

    workdir: epath.Path
    config: ml_collections.ConfigDict
    model: Any
    mesh: Mesh
    state: steps.TrainState
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
    path = reporting.as_path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training run directory. Train one with "
                                "`python -m anemia_jax.main --config=... --workdir=DIR` and pass that DIR.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_multiple(config: ml_collections.ConfigDict) -> int:
    """The size divisor the model needs: ``2**model.depth`` (every encoder level halves the resolution)."""
    return 2 ** int(config.model.get("depth", 4))


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
        raise FileNotFoundError(f"No checkpoint in {manager.directory}; has the run saved one yet?")
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
        raise FileNotFoundError(f"No checkpoint for step {step} in {manager.directory}; available: {available}.")
    return step, "step"


def load_run(workdir: str | os.PathLike, *, checkpoint: str | int = "best", mesh: Mesh | None = None,
             split: str | None = None) -> Run:
    """Restores checkpoint ``checkpoint`` of the run in ``workdir`` on ``mesh`` (default: every device).

    Args:
        workdir: a run directory (``config.json`` plus ``checkpoints/``), local or a URL (``gs://...``).
        checkpoint: 'best' (highest validation mean Dice among those kept), 'latest', a step number, or 'auto'
            (`auto_checkpoint`: 'latest' when ``split`` is the validation split, 'best' otherwise).
        mesh: the mesh to replicate the state over; default `parallel.make_mesh()`.
        split: the split the restored state will be scored on ('val', 'test', 'train'; None for new images);
            only 'auto' reads it.
    """
    workdir = reporting.as_path(workdir)
    config = load_config(workdir)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    model = train.build_model(config)
    # Only the optimizer state's structure matters for the restore target, and it does not depend on the schedule's
    # lengths. Both phases get one step: a zero-step warm-up would make optax log a "non-positive transition_steps"
    # message on every load.
    tx, _ = optim.make_optimizer(config.optimizer, total_steps=2, warmup_steps=1)
    template = train.abstract_train_state(model, tx, tuple(config.image_size), mesh)
    # Read-only: the run may still be training; its trainer alone creates, cleans and prunes checkpoints/.
    manager = checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=max(1, config.keep_checkpoints),
                                              read_only=True)
    try:
        step, how = resolve_checkpoint(manager, checkpoint, split=split)
        state, _ = manager.restore(step, template)
    finally:
        manager.close()
    logging.info("Restored %s checkpoint step %d of %s.", how, step, workdir)
    if str(checkpoint).strip().lower() == "auto":
        reason = f"--checkpoint=auto: {auto_checkpoint(split)[1]}"
    else:
        reason = f"requested as {checkpoint!r}"
    return Run(workdir, config, model, mesh, state, int(step), how, reason)


def add_run_arguments(parser: argparse.ArgumentParser, *, verb: str, checkpoint_default: str = "best",
                      checkpoint_help: str = "'best' (validation mean Dice), 'latest' or a step.") -> None:
    """Adds the flags of a command that restores a run (read back by `load_run_from_args`): ``--workdir``,
    ``--checkpoint`` (default ``checkpoint_default``, described by ``checkpoint_help``), ``--tta``, ``--tta_flips``,
    ``--tta_scales`` and ``--prune_level``; ``verb`` (e.g. 'evaluate') completes the help of ``--prune_level``."""
    parser.add_argument("--workdir", required=True,
                        help="Training run directory (config.json + checkpoints/), local or gs://...")
    parser.add_argument("--checkpoint", default=checkpoint_default, help=checkpoint_help)
    parser.add_argument("--tta", action="store_true", help="Average over test-time augmentation views.")
    parser.add_argument("--tta_flips", default=",".join(tta.DEFAULT_FLIPS),
                        help="Comma-separated flips of the TTA views (none, h, v, hv).")
    parser.add_argument("--tta_scales", default="1",
                        help="Comma-separated scales of the TTA views, e.g. 0.75,1,1.25.")
    parser.add_argument("--prune_level", type=int, default=None, help=f"UNet++: {verb} with the pruned network L^k.")


def load_run_from_args(args: argparse.Namespace, *, mesh: Mesh | None = None, split: str | None = None
                       ) -> tuple[Run, tuple[tta.Transform, ...] | None]:
    """The command-line start of evaluation and prediction: INFO logging (without Orbax's INFO chatter), then
    ``(run, transforms)`` from the flags of `add_run_arguments` (transforms None without ``--tta``); ``split`` is
    what the run will be scored on (for ``--checkpoint=auto``; None for new images).

    Raises:
        FileNotFoundError / ValueError: a bad run directory, checkpoint or TTA flag (the message says which).
    """
    from anemia_jax.main import QuietLibraries  # noqa: PLC0415 -- only the command line wants its filter

    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(QuietLibraries())
    transforms = parse_tta(args.tta_flips, args.tta_scales) if args.tta else None
    return load_run(args.workdir, checkpoint=args.checkpoint, mesh=mesh, split=split), transforms


def mesh_batch_size(batch_size: int | None, mesh: Mesh) -> int:
    """``batch_size`` (default: the mesh size) rounded up to a positive multiple of the mesh size, as the steps
    need."""
    size = mesh.size
    return max(size, math.ceil((batch_size or size) / size) * size)


def parse_tta(flips: str | Sequence[str] = tta.DEFAULT_FLIPS,
              scales: str | Sequence[float] = (1.0,)) -> tuple[tta.Transform, ...]:
    """TTA transforms from comma-separated text or sequences, e.g. ``parse_tta('none,h', '0.75,1,1.25')``."""
    if isinstance(flips, str):
        flips = [f.strip() for f in flips.split(",") if f.strip()]
    if isinstance(scales, str):
        try:
            scales = [float(s) for s in scales.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"TTA scales must be numbers separated by commas, e.g. '0.75,1,1.25'; got {scales!r}.")
    return tta.tta_transforms(tuple(flips), tuple(scales))


def make_probability_fn(run: Run, *, prune_level: int | None = None,
                        transforms: Sequence[tta.Transform] | None = None
                        ) -> Callable[[steps.TrainState, jax.Array], jax.Array]:
    """The jitted ``probs(state, images_u8) -> float32 [B, H, W, C]`` of the run's model.

    Args:
        run: from `load_run`.
        prune_level: UNet++ only: evaluate the pruned network L^k (the head on X^{0,k}); None: the full network.
        transforms: test-time augmentation views (`parse_tta` / `tta.tta_transforms`); None or a single identity
            view means plain prediction.

    Returns:
        A function of the state and uint8 images [B, H, W, 3] at the run's `image_size` (B a multiple of the mesh
        size, sharded on 'data'), returning sigmoid probabilities averaged over the views.
    """
    if prune_level is not None:
        if run.config.model.name != "unetpp":
            raise ValueError(f"prune_level applies to UNet++ only; this run's model is {run.config.model.name!r}.")
        depth = int(run.config.model.get("depth", 4))
        if not 1 <= prune_level <= depth:
            raise ValueError(f"prune_level must lie in 1..{depth} (the model's depth); got {prune_level}.")
        if prune_level < depth and not run.config.model.get("deep_supervision", False):
            raise ValueError(f"prune_level={prune_level} needs a deep-supervised UNet++ (only then is the head on "
                             f"X^(0,{prune_level}) trained); this run has deep_supervision=False.")
    predict = steps.make_predict_fn(run.model, run.mesh, prune_level=prune_level)
    views = tuple(transforms or ())
    plain = not views or views == (tta.Transform(),)
    multiple = model_multiple(run.config)

    def probs(state, images_u8):
        images = augment.to_float(images_u8)
        if plain:
            return predict(state, images)
        return tta.predict_with_tta(functools.partial(predict, state), images, transforms=views, multiple=multiple)

    return jax.jit(probs)


def predict_images(run: Run, images_u8: np.ndarray, *, probability=None, batch_size: int | None = None
                   ) -> np.ndarray:
    """Probabilities float32 [N, H, W, C] of host images uint8 [N, H, W, 3] at the run's `image_size`.

    Runs in fixed batches (``batch_size`` rounded up to a multiple of the mesh size, default the mesh size; the
    last batch is padded), so there is one compilation whatever N is. ``probability`` defaults to
    `make_probability_fn` (run) (pass one built with ``prune_level``/``transforms`` for those). Single-process
    meshes only: each batch is this process's data.
    """
    images_u8 = np.asarray(images_u8, np.uint8)
    if images_u8.ndim != 4 or tuple(images_u8.shape[1:3]) != run.image_size:
        raise ValueError(f"images must be uint8 [N, {run.image_size[0]}, {run.image_size[1]}, 3] (the run's training "
                         f"resolution); got shape {images_u8.shape}.")
    probability = probability or make_probability_fn(run)
    batch = mesh_batch_size(batch_size, run.mesh)
    out = []
    for start in range(0, len(images_u8), batch):
        part = images_u8[start:start + batch]
        padded = np.zeros((batch, *part.shape[1:]), np.uint8)
        padded[:len(part)] = part
        probs = parallel.fetch(probability(run.state, parallel.host_local_to_global(padded, run.mesh)))
        out.append(probs[:len(part)])
    if not out:
        return np.zeros((0, *run.image_size, len(run.targets)), np.float32)
    return np.concatenate(out).astype(np.float32)


def eval_split(config: ml_collections.ConfigDict, split: str, builder=None) -> tuple[Any, str, np.ndarray]:
    """``(builder, tfds_split, indices)`` of the run's ``split`` ('train', 'val' or 'test'), cut as training cut it.

    'val' and 'train' are the trainer's split of ``config.dataset.split`` (K-fold fold, leave-one-country-out
    validation holdout, or patient holdout); 'test' is the left-out country (loco) or the dataset's own test split
    (e.g. Kvasir-SEG's 120 images).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    builder = builder if builder is not None else train.get_builder(config)
    source_split = config.dataset.split
    metadata = input_pipeline.read_metadata(builder, source_split)
    train_idx, val_idx, test_idx = train.split_indices(config, metadata)
    if split == "train":
        return builder, source_split, train_idx
    if split == "val":
        return builder, source_split, val_idx
    if test_idx is not None:
        return builder, source_split, test_idx
    if config.dataset.get("test_split", ""):
        n = builder.info.splits[config.dataset.test_split].num_examples
        return builder, config.dataset.test_split, np.arange(n)
    raise ValueError(f"This run ({config.dataset.name}, protocol {config.split.protocol!r}) has no test split: "
                     "K-fold runs are scored on their validation fold (--split=val); leave-one-country-out runs "
                     "and datasets with a test split (Kvasir-SEG) have one.")
