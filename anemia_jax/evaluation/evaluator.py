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
* ``summary['reliability']``: per target, the pixels' reliability (`anemia_jax.inference.temperature.from_counts`:
  equal-width probability bins, observed frequency, expected calibration error) over the images with a reference
  mask, accumulated from per-image bin counts of the same pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from anemia_jax import metrics
from anemia_jax.data import input_pipeline
from anemia_jax.inference import temperature
from anemia_jax.inference.probabilities import ProbabilityFn, compiler_options, mesh_batch_size
from anemia_jax.utils import parallel

SCORES = ("dice", "iou", "precision", "recall")
RELIABILITY_BINS = 10
_RELIABILITY = ("rel_count", "rel_p", "rel_y")
DISTANCES = ("hd95", "assd")

__all__ = ["DISTANCES", "SCORES", "EvalResult", "Evaluator", "scalars", "summarize"]


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
            return {"probs": probs, **counts, **_reliability_counts(probs, batch["masks"], weights), "weights": weights,
                    "valid": batch["valid"], "index": batch["index"]}

        spec = P(parallel.DATA_AXIS)
        self._score = jax.jit(jax.shard_map(per_device, mesh=dataset.mesh, in_specs=(P(), spec), out_specs=spec),
                              compiler_options=compiler_options())

    def run(self, variables) -> EvalResult:
        """Scores the model ``variables`` (replicated; a tuple of them for an ensemble) on every example."""
        acc = metrics.MetricsAccumulator()
        hd95, assd, dist_index = [], [], []
        panel: dict[str, list[np.ndarray]] = {"image": [], "truth": [], "probs": [], "weights": []}
        have = 0
        for batch in self.dataset.eval_batches(self.batch_size):
            out = self._score(variables, batch)
            acc.add({k: out[k] for k in ("tp", "fp", "fn", "tn", "weights", "index", *_RELIABILITY)},
                    valid=out["valid"])
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
        rel = [per_image[k].sum(axis=0) for k in _RELIABILITY]  # [C, bins] each
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
        summary["reliability"] = {t: temperature.from_counts(*(r[c] for r in rel)) for c, t in enumerate(self.targets)}
        return EvalResult(per_image, summary, scalars(summary, self.targets),
                          {k: np.concatenate(v) for k, v in panel.items()} if have else None)


def _reliability_counts(probs: jax.Array, masks: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Per image [b, C, bins]: the pixel count, the sum of probabilities and of reference labels in each
    equal-width probability bin (pixels of images without a reference mask weigh 0)."""
    bins = jnp.clip((probs * RELIABILITY_BINS).astype(jnp.int32), 0, RELIABILITY_BINS - 1)
    truth = (masks > 0.5).astype(jnp.float32)
    w = weights[:, None, None, :].astype(jnp.float32)
    out = {"rel_count": [], "rel_p": [], "rel_y": []}
    for k in range(RELIABILITY_BINS):  # a loop, not a one-hot [b, H, W, C, bins]: bounded memory
        inside = (bins == k).astype(jnp.float32) * w
        out["rel_count"].append(inside.sum(axis=(1, 2)))
        out["rel_p"].append((inside * probs).sum(axis=(1, 2)))
        out["rel_y"].append((inside * truth).sum(axis=(1, 2)))
    return {k: jnp.stack(v, axis=-1) for k, v in out.items()}


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
