"""The one evaluation loop: scores a model on a device-resident split, for the trainer and the evaluate command alike.

`Evaluator(dataset, probability, targets, ...)` is built once (big_vision's pattern) and ``run(variables)`` scores
every example of ``dataset`` exactly once with ONE forward pass per batch: the jitted, data-parallel batch function
returns the probabilities and the per-image confusion counts together, so metrics, boundary distances and the panel
of example predictions all come from the same pass. ``probability`` is a per-device function of
`anemia_jax.inference.probabilities` (plain, test-time augmented, pruned UNet++, or a fold ensemble); a prediction is
``probability > threshold``.

What `EvalResult` holds:

* ``per_image``: [N] ``index`` (position in the TFDS split; rows ordered by it), ``patient_id`` and ``country`` when
  metadata is given, and [N, C] ``weights`` (0: reference mask missing), ``tp``/``fp``/``fn``/``tn`` (pixel counts),
  ``dice``, ``iou``, ``precision``, ``recall`` (conventions of `anemia_jax.metrics`: Dice of two empty masks is 1)
  and, with ``distances``, ``hd95`` / ``assd`` in pixels (inf where exactly one of prediction and reference is
  empty). Multi-process runs compute distances on process 0 only.
* ``summary``: `summarize` of the per-image values: per target (and per country) the mean ± std over images (ddof 0)
  of each score, the pooled Dice over all pixels, image counts, and distance statistics over finite values.
* ``scalars``: the flat ``<metric>/<target>`` numbers the trainer logs (``dice/mean`` ranks checkpoints).
* ``panel``: uint8 images, reference masks, probabilities and mask weights of the first ``num_panel`` examples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from anemia_jax import metrics
from anemia_jax.data import input_pipeline
from anemia_jax.training import experiment
from anemia_jax.utils import parallel
from anemia_jax.inference.probabilities import ProbabilityFn, mesh_batch_size

SCORES = ("dice", "iou", "precision", "recall")
DISTANCES = ("hd95", "assd")

__all__ = ["DISTANCES", "SCORES", "EvalResult", "Evaluator", "evaluate_runs", "scalars", "summarize",
           "training_overlap"]


@dataclasses.dataclass
class EvalResult:
    """One evaluation: per-image values, their summary, the trainer's scalars and an optional panel."""

    per_image: dict[str, np.ndarray]
    summary: dict[str, Any]
    scalars: dict[str, float]
    panel: dict[str, np.ndarray] | None = None


class Evaluator:
    """Scores predictions on every example of a device-resident split.

    Args:
        dataset: the split, resident on the devices.
        probability: per-device ``probs(variables, images_u8) -> [b, H, W, C]`` (`anemia_jax.inference.probabilities`).
        targets: the C target names, in channel order.
        batch_size: global evaluation batch (default: the dataset's batch size), rounded up to the mesh size.
        threshold: probability above which a pixel is predicted in the mask.
        distances: also compute HD95 and ASSD (host-side; the slow part on large sets).
        num_panel: how many examples to keep for a panel of predictions (0: none).
        metadata: optional [N_split] arrays (``patient_id``, ``country``) of the whole TFDS split, indexed by
            ``index``; they label the per-image rows.
    """

    def __init__(self, dataset: input_pipeline.DeviceDataset, probability: ProbabilityFn, targets: Sequence[str], *,
                 batch_size: int | None = None, threshold: float = 0.5, distances: bool = False, num_panel: int = 0,
                 metadata: Mapping[str, np.ndarray] | None = None):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1); got {threshold}.")
        self.dataset = dataset
        self.targets = tuple(targets)
        self.batch_size = mesh_batch_size(batch_size or dataset.batch_size, dataset.mesh)
        self.threshold = threshold
        self.distances = distances
        self.num_panel = num_panel
        self.metadata = metadata

        def per_device(variables, batch):
            probs = probability(variables, batch["image"])
            weights = batch["mask_weights"] * batch["valid"][:, None]
            counts = metrics.confusion_counts(probs > threshold, batch["masks"], weights=weights[:, None, None, :])
            return {"probs": probs, **counts, "weights": weights, "valid": batch["valid"], "index": batch["index"]}

        spec = P(parallel.DATA_AXIS)
        self._score = jax.jit(jax.shard_map(per_device, mesh=dataset.mesh, in_specs=(P(), spec), out_specs=spec))

    def run(self, variables) -> EvalResult:
        """Scores the model ``variables`` (replicated; a tuple of them for an ensemble) on every example."""
        acc = metrics.MetricsAccumulator()
        hd95, assd, dist_index = [], [], []
        panel: dict[str, list[np.ndarray]] = {"image": [], "truth": [], "probs": [], "weights": []}
        have = 0
        for batch in self.dataset.eval_batches(self.batch_size):
            out = self._score(variables, batch)
            acc.add({k: out[k] for k in ("tp", "fp", "fn", "tn", "weights", "index")}, valid=out["valid"])
            want_panel = have < self.num_panel
            if not (self.distances or want_panel):
                continue
            # Collective in multi-process runs: every process fetches the same arrays.
            host = parallel.fetch({"probs": out["probs"], "truth": batch["masks"], "valid": out["valid"],
                                   "index": out["index"], "weights": out["weights"],
                                   **({"image": batch["image"]} if want_panel else {})})
            keep = host.pop("valid")
            host = {k: v[keep] for k, v in host.items()}
            if want_panel:
                take = min(len(host["index"]), self.num_panel - have)
                for k in panel:
                    panel[k].append(host[k][:take])
                have += take
            if self.distances and jax.process_index() == 0 and len(host["index"]):
                d = metrics.batch_surface_distances(host["probs"] > self.threshold, host["truth"], percentile=95)
                hd95.append(d["hausdorff"])
                assd.append(d["assd"])
                dist_index.append(host["index"])
        per_image = acc.result()
        per_image.update(metrics.scores_from_counts({k: per_image[k] for k in ("tp", "fp", "fn", "tn")}))
        per_image = {k: per_image[k] for k in ("index", "weights", "tp", "fp", "fn", "tn") + SCORES}
        if hd95:
            order = np.argsort(np.concatenate(dist_index), kind="stable")
            per_image["hd95"] = np.concatenate(hd95)[order]
            per_image["assd"] = np.concatenate(assd)[order]
        if self.metadata is not None:
            for key in ("patient_id", "country"):
                if key in self.metadata:
                    per_image[key] = np.asarray(self.metadata[key])[per_image["index"]]
        summary = summarize(per_image, self.targets)
        return EvalResult(per_image, summary, scalars(summary, self.targets),
                          {k: np.concatenate(v) for k, v in panel.items()} if have else None)


def training_overlap(runs: Sequence, builder, tfds_split: str, indices: np.ndarray) -> list[int]:
    """How many of the examples ``indices`` of ``tfds_split`` each run TRAINED on (its own training part).

    The data scored is that of the first run's config (command-line overrides included, e.g. another builder config
    or data set); each run's training data is that of the config it recorded (``config.json``, as trained). Two
    data sets are the same when their builder, builder config and TFDS split are (not their folder: data may move).
    """
    from anemia_jax.runs import restore as runs_lib  # noqa: PLC0415 -- runs builds on this module's siblings only

    ds = runs[0].config.dataset
    scored = (ds.builder, ds.builder_config, tfds_split)
    metadata = None
    out = []
    for run in runs:
        recorded = runs_lib.load_config(run.workdir)
        if (recorded.dataset.builder, recorded.dataset.builder_config, recorded.dataset.split) != scored:
            out.append(0)
            continue
        metadata = metadata if metadata is not None else input_pipeline.read_metadata(builder, tfds_split)
        train_idx = experiment.split_indices(recorded, metadata)[0]
        out.append(int(np.isin(np.asarray(indices), train_idx).sum()))
    return out


def evaluate_runs(runs: Sequence, *, split: str = "val", transforms=None, prune_level: int | None = None,
                  distances: bool = True, threshold: float = 0.5, builder=None, members: bool = False) -> EvalResult:
    """Scores restored runs (`anemia_jax.runs.restore.load_runs`; several form an ensemble) on their ``split``.

    Args:
        runs: one or more `restore.Run` on one mesh, with the same targets and resolution (the first run's config
            defines the split: for an ensemble of K-fold runs, score a split none of them trained on, e.g. 'test').
        split: 'val', 'test' or 'train' (`experiment.eval_split`).
        transforms: TTA views (`probabilities.parse_tta`), or None.
        prune_level: UNet++ pruned network L^k, or None for the full network.
        distances: also compute HD95 and ASSD.
        threshold: probability threshold of the predicted masks.
        builder: the prepared TFDS builder, if the caller has it (default: prepared from the config).
        members: for an ensemble, also score each run alone on the same images (``summary['members']``: workdir,
            step and per-target statistics of each, in order).

    Returns:
        The `EvalResult`, its summary extended with the run details (workdir, checkpoint, split, model, TTA, ...)
        and ``training_overlap`` (`training_overlap`: how many of the scored images each run trained on).
    """
    from anemia_jax.runs import restore as runs_lib  # noqa: PLC0415 -- runs builds on this module's siblings only

    first = runs[0]
    config, targets = first.config, first.targets
    builder, tfds_split, indices = experiment.eval_split(config, split, builder)
    if len(indices) == 0:
        raise ValueError(f"Split {split!r} of this run is empty; nothing to evaluate.")
    metadata = input_pipeline.read_metadata(builder, tfds_split)
    batch_size = mesh_batch_size(config.get("eval_batch_size", 0) or config.batch_size, first.mesh)
    # Each process decodes only its own share of the images, as training does.
    dataset = input_pipeline.DeviceDataset.from_builder(builder, tfds_split, indices, first.mesh,
                                                        batch_size=batch_size, image_size=first.image_size,
                                                        targets=targets)
    probability, variables = runs_lib.probability_of(runs, prune_level=prune_level, transforms=transforms)
    evaluator = Evaluator(dataset, probability, targets, batch_size=batch_size, threshold=threshold,
                          distances=distances, metadata=metadata)
    result = evaluator.run(variables)
    scored_members = []
    if members and len(runs) > 1:
        for run in runs:  # the same device-resident images, one run at a time
            fn, v = runs_lib.probability_of(run, prune_level=prune_level, transforms=transforms)
            alone = Evaluator(dataset, fn, targets, batch_size=batch_size, threshold=threshold, distances=distances,
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
    }
    return result


# ---------------------------------------------------------------------------------------------- statistics


def _target_summary(per_image: Mapping[str, np.ndarray], rows: np.ndarray, c: int) -> dict[str, Any]:
    """Statistics of target channel ``c`` over the images ``rows`` (bool [N])."""
    has = (per_image["weights"][:, c] > 0) & rows
    out: dict[str, Any] = {"num_images": int(has.sum()), "num_missing_mask": int((rows & ~has).sum())}
    for name in SCORES:
        v = per_image[name][has, c].astype(np.float64)
        out[name] = {"mean": float(v.mean()) if v.size else math.nan, "std": float(v.std()) if v.size else math.nan}
    # Pooled Dice needs tp, fp and fn only; tn (absent from hand-made inputs) does not enter it.
    counts = {k: (per_image[k] if k in per_image else np.zeros_like(per_image["tp"]))[has, c][:, None]
              for k in ("tp", "fp", "fn", "tn")}
    out["pooled_dice"] = float(metrics.pooled_scores(counts)["dice"][0]) if has.any() else math.nan
    for name in DISTANCES:
        if name in per_image:
            out[name] = metrics.summarize_distances(per_image[name][:, c], include=has)
    return out


def summarize(per_image: Mapping[str, np.ndarray], targets: Sequence[str]) -> dict[str, Any]:
    """Mean ± std over images, overall and per country, of per-image scores.

    Args:
        per_image: [N] ``country`` (str, optional) and [N, C] arrays ``weights`` (> 0: the reference mask exists),
            ``tp``/``fp``/``fn`` (pixel counts; ``tn`` optional), ``dice``, ``iou``, ``precision``, ``recall`` and optionally
            ``hd95``, ``assd`` (finite or inf; ignored where the weight is 0).
        targets: the C target names.

    Returns:
        ``{'targets': {t: stats}, 'by_country': {country: {t: stats}}}`` where stats holds ``num_images``,
        ``num_missing_mask``, ``<score>: {'mean', 'std'}`` (NaN without images), ``pooled_dice`` (`metrics.pooled_scores`
        over the images with a mask) and, per distance, `metrics.summarize_distances`'s ``mean``/``std``/``median``/
        ``count_finite``/``count_infinite``.
    """
    n = len(per_image["weights"])
    everything = np.ones(n, bool)
    countries = np.asarray([str(c) for c in per_image.get("country", [""] * n)], dtype=object)
    result: dict[str, Any] = {"targets": {t: _target_summary(per_image, everything, c) for c, t in enumerate(targets)}}
    result["by_country"] = {
        country or "(unknown)": {t: _target_summary(per_image, countries == country, c) for c, t in enumerate(targets)}
        for country in sorted(set(countries.tolist()))}
    return result


def scalars(summary: Mapping[str, Any], targets: Sequence[str]) -> dict[str, float]:
    """The flat numbers of a `summarize` result that training logs: ``<score>/<target>`` and ``<score>/mean`` (over
    targets with images), ``pooled_dice/<t>``, ``num_images/<t>`` and, with distances, ``hd95/<t>``,
    ``hd95_median/<t>``, ``hd95_infinite/<t>``, ``assd/<t>``."""
    per_target = summary["targets"]
    out: dict[str, float] = {}
    for name in SCORES:
        values = [per_target[t][name]["mean"] for t in targets]
        out.update({f"{name}/{t}": v for t, v in zip(targets, values)})
        finite = [v for v in values if not math.isnan(v)]
        out[f"{name}/mean"] = float(np.mean(finite)) if finite else math.nan
    for t in targets:
        s = per_target[t]
        out[f"pooled_dice/{t}"] = s["pooled_dice"]
        out[f"num_images/{t}"] = s["num_images"]
        if "hd95" in s:
            out[f"hd95/{t}"] = s["hd95"]["mean"]
            out[f"hd95_median/{t}"] = s["hd95"]["median"]
            out[f"hd95_infinite/{t}"] = s["hd95"]["count_infinite"]
            out[f"assd/{t}"] = s["assd"]["mean"]
    return out
