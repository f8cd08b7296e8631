"""Scoring finished runs: a restored run (or an ensemble of runs) on one of its splits, with the trainer's evaluator.

`evaluate_runs` cuts the split exactly as training cut it (`anemia_jax.data.loading.eval_split`), scores it with
`anemia_jax.evaluation.evaluator.Evaluator` (one forward pass per batch, the trainer's own metrics) and records which
run, checkpoint, split and options produced the scores; `training_overlap` counts the scored images each run trained
on, so that an ensemble of K-fold runs is never scored on its own training photos unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import evaluator
from anemia_jax.inference import probabilities
from anemia_jax.runs import restore

__all__ = ["evaluate_runs", "training_overlap"]


def training_overlap(runs: Sequence, builder, tfds_split: str, indices: np.ndarray) -> list[int]:
    """How many of the examples ``indices`` of ``tfds_split`` each run TRAINED on (its own training part).

    The data scored is that of the first run's config (command-line overrides included, e.g. another builder config
    or data set); each run's training data is that of the config it recorded (``config.json``, as trained). Two
    data sets are the same when their builder, builder config and TFDS split are (not their folder: data may move).
    """
    ds = runs[0].config.dataset
    scored = (ds.builder, ds.builder_config, tfds_split)
    metadata = None
    out = []
    for run in runs:
        recorded = restore.load_config(run.workdir)
        if (recorded.dataset.builder, recorded.dataset.builder_config, recorded.dataset.split) != scored:
            out.append(0)
            continue
        metadata = metadata if metadata is not None else input_pipeline.read_metadata(builder, tfds_split)
        train_idx = loading.split_indices(recorded, metadata)[0]
        out.append(int(np.isin(np.asarray(indices), train_idx).sum()))
    return out


def evaluate_runs(runs: Sequence, *, split: str = "val", transforms=None, prune_level: int | None = None,
                  distances: bool = True, threshold: float = 0.5, builder=None, members: bool = False,
                  temperature: Sequence[float] | None = None, temperature_source: str = "") -> evaluator.EvalResult:
    """Scores restored runs (`anemia_jax.runs.restore.load_runs`; several form an ensemble) on their ``split``.

    Args:
        runs: one or more `restore.Run` on one mesh, with the same targets and resolution (the first run's config
            defines the split: for an ensemble of K-fold runs, score a split none of them trained on, e.g. 'test').
        split: 'val', 'test' or 'train' (`loading.eval_split`).
        transforms: TTA views (`probabilities.parse_tta`), or None.
        prune_level: UNet++ pruned network L^k, or None for the full network.
        distances: also compute HD95 and ASSD.
        threshold: probability threshold of the predicted masks.
        builder: the prepared TFDS builder, if the caller has it (default: prepared from the config).
        members: for an ensemble, also score each run alone on the same images (``summary['members']``: workdir,
            step and per-target statistics of each, in order).
        temperature: per-target temperatures (`anemia_jax.inference.temperature`): the scores are those of the
            calibrated probabilities, and ``summary['calibration']`` holds the pixels' reliability before (the
            models' own probabilities, one more pass without distances) and after; without, only 'before'.
        temperature_source: where the temperatures came from, for the record.

    Returns:
        The `EvalResult`, its summary extended with the run details (workdir, checkpoint, split, model, TTA, ...)
        and ``training_overlap`` (`training_overlap`: how many of the scored images each run trained on).
    """

    first = runs[0]
    config, targets = first.config, first.targets
    builder, tfds_split, indices = loading.eval_split(config, split, builder)
    if len(indices) == 0:
        raise ValueError(f"Split {split!r} of this run is empty; nothing to evaluate.")
    metadata = input_pipeline.read_metadata(builder, tfds_split)
    batch_size = probabilities.mesh_batch_size(config.get("eval_batch_size", 0) or config.batch_size, first.mesh)
    # Each process decodes only its own share of the images, as training does.
    dataset = input_pipeline.DeviceDataset.from_builder(builder, tfds_split, indices, first.mesh,
                                                        batch_size=batch_size, image_size=first.image_size,
                                                        targets=targets)
    probability, variables = probabilities.probability_of(runs, prune_level=prune_level, transforms=transforms,
                                                          temperature=temperature)
    scorer = evaluator.Evaluator(dataset, probability, targets, batch_size=batch_size, threshold=threshold,
                          distances=distances, metadata=metadata)
    result = scorer.run(variables)
    calibration = {"temperature": None, "source": temperature_source or "none",
                   "before": result.summary["reliability"], "after": None}
    if temperature is not None:
        raw, _ = probabilities.probability_of(runs, prune_level=prune_level, transforms=transforms)
        before = evaluator.Evaluator(dataset, raw, targets, batch_size=batch_size, threshold=threshold,
                                     distances=False).run(variables)
        calibration.update(temperature=dict(zip(targets, map(float, temperature))),
                           before=before.summary["reliability"], after=result.summary["reliability"])
    scored_members = []
    if members and len(runs) > 1:
        for run in runs:  # the same device-resident images, one run at a time
            fn, v = probabilities.probability_of(run, prune_level=prune_level, transforms=transforms)
            alone = evaluator.Evaluator(dataset, fn, targets, batch_size=batch_size, threshold=threshold, distances=distances,
                              metadata=metadata).run(v)
            scored_members.append({"workdir": str(run.workdir), "step": run.step,
                                   "targets": alone.summary["targets"]})
    result.summary = {
        "workdir": str(first.workdir), "config_name": config.get("name", ""), "config_arg": config.get("arg", ""),
        "model": config.model.name, "ensemble": [str(r.workdir) for r in runs] if len(runs) > 1 else None,
        "checkpoint": {"step": first.step, "chosen_as": first.checkpoint, "reason": first.checkpoint_reason,
                       "steps": [r.step for r in runs]},
        "split": split, "tfds_split": tfds_split, "num_images": int(len(result.per_image["index"])),
        "image_size": list(first.image_size), "threshold": threshold, "prune_level": prune_level,
        "tta": [t.name for t in transforms] if transforms else None, "num_devices": first.mesh.size,
        "training_overlap": training_overlap(runs, builder, tfds_split, indices),
        **({"members": scored_members} if scored_members else {}),
        **result.summary,
        "calibration": calibration,
    }
    return result
