"""Evaluation of a trained run: per-image metrics (CSV) and their summary (JSON + markdown).

    python -m anemia_jax.evaluate --workdir=runs/unetpp [--split=val|test|train]
        [--checkpoint=auto|best|latest|<step>] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--prune_level=k]
        [--out=DIR]

Which checkpoint: ``--checkpoint=auto`` (the default) takes the latest checkpoint on ``--split=val`` and the best
one on any other split. The trainer picks 'best' by mean Dice on the validation split -- for K-fold runs, the very
fold being scored -- so the best checkpoint's validation score is optimistic; the latest was not selected on it.
On the test split (and train) selection saw none of the images and 'best' is the honest choice. The choice and its
reason are logged and recorded in the summary (``checkpoint.chosen_as`` and ``.reason``). ``--workdir`` may be local or on
shared/cloud storage (``gs://bucket/runs/x``).

Restores the chosen checkpoint (`run_lib.load_run`), rebuilds the run's split exactly as training cut it, predicts
every image at the training resolution (optionally with test-time augmentation or a pruned UNet++), thresholds the
probabilities at 0.5 and scores each image and target with `anemia_jax.metrics`: Dice, IoU, precision, recall (from
`confusion_counts` / `scores_from_counts`, with their empty-mask conventions) and the boundary distances HD95 and
ASSD (`batch_surface_distances`), in pixels of the training resolution.

Outputs, in ``--out`` (default ``<workdir>/eval/<split>_step<step>[_tta][_L<k>]``):

* ``per_image.csv``: one row per image: ``index`` (position in its TFDS split), ``patient_id``, ``country``, and per
  target ``has_mask/<t>``, ``dice/<t>``, ``iou/<t>``, ``precision/<t>``, ``recall/<t>``, ``hd95/<t>``, ``assd/<t>``
  (empty where the reference mask is missing; ``inf`` where a distance is undefined: exactly one of prediction and
  reference is empty).
* ``summary.json`` / ``summary.md``: per target, mean ± std over images (std with ddof=0) of each score, the pooled
  Dice, the number of images scored and of images excluded for a missing mask; for distances the mean, std and
  median over the images where they are finite and the count where they are infinite; the same per country.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from anemia_jax import input_pipeline, metrics, parallel, reporting, run_lib

SCORES = ("dice", "iou", "precision", "recall")
DISTANCES = ("hd95", "assd")

__all__ = ["DISTANCES", "SCORES", "evaluate_run", "format_markdown", "main", "summarize", "write_per_image_csv"]


# ---------------------------------------------------------------------------------------------- statistics


def _target_summary(per_image: Mapping[str, np.ndarray], rows: np.ndarray, c: int) -> dict[str, Any]:
    """Statistics of target channel ``c`` over the images ``rows`` (bool [N])."""
    has = (per_image["weights"][:, c] > 0) & rows
    out: dict[str, Any] = {"num_images": int(has.sum()), "num_missing_mask": int((rows & ~has).sum())}
    for name in SCORES:
        v = per_image[name][has, c].astype(np.float64)
        out[name] = {"mean": float(v.mean()) if v.size else math.nan, "std": float(v.std()) if v.size else math.nan}
    counts = {k: per_image[k][has, c].sum() for k in ("tp", "fp", "fn")}
    denominator = 2 * counts["tp"] + counts["fp"] + counts["fn"]
    out["pooled_dice"] = (float(2 * counts["tp"] / denominator) if denominator > 0
                          else (1.0 if has.any() else math.nan))
    for name in DISTANCES:
        if name in per_image:
            out[name] = metrics.summarize_distances(per_image[name][:, c], include=has)
    return out


def summarize(per_image: Mapping[str, np.ndarray], targets: Sequence[str]) -> dict[str, Any]:
    """Mean ± std over images, overall and per country, of per-image scores.

    Args:
        per_image: [N] ``country`` (str) and [N, C] arrays ``weights`` (> 0: the reference mask exists),
            ``tp``/``fp``/``fn`` (pixel counts), ``dice``, ``iou``, ``precision``, ``recall`` and optionally
            ``hd95``, ``assd`` (finite or inf; ignored where the weight is 0).
        targets: the C target names.

    Returns:
        ``{'targets': {t: stats}, 'by_country': {country: {t: stats}}}`` where stats holds ``num_images``,
        ``num_missing_mask``, ``<score>: {'mean', 'std'}`` (NaN without images), ``pooled_dice`` and, per
        distance, `metrics.summarize_distances`'s ``mean``/``std``/``median``/``count_finite``/``count_infinite``.
    """
    n = len(per_image["weights"])
    everything = np.ones(n, bool)
    countries = np.asarray([str(c) for c in per_image.get("country", [""] * n)], dtype=object)
    result: dict[str, Any] = {"targets": {t: _target_summary(per_image, everything, c) for c, t in enumerate(targets)}}
    result["by_country"] = {
        country or "(unknown)": {t: _target_summary(per_image, countries == country, c) for c, t in enumerate(targets)}
        for country in sorted(set(countries.tolist()))}
    return result


def _pm(stats: Mapping[str, float], digits: int) -> str:
    mean, std = stats["mean"], stats["std"]
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _table(per_target: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| target | images | missing mask | Dice | IoU | precision | recall | pooled Dice | HD95 (px) "
             "| HD95 undefined | ASSD (px) | ASSD undefined |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, s in per_target.items():
        dist = []
        for name in DISTANCES:
            if name in s:
                dist += [_pm(s[name], 2), str(s[name]["count_infinite"])]
            else:
                dist += ["-", "-"]
        pooled = f"{s['pooled_dice']:.4f}" if math.isfinite(s["pooled_dice"]) else "n/a"
        lines.append(f"| {t} | {s['num_images']} | {s['num_missing_mask']} | "
                     + " | ".join(_pm(s[name], 4) for name in SCORES) + f" | {pooled} | " + " | ".join(dist) + " |")
    return lines


def format_markdown(summary: Mapping[str, Any]) -> str:
    """Renders `evaluate_run`'s summary (or `summarize`'s, with optional run details) as markdown."""
    lines = []
    if "workdir" in summary:
        how = summary["checkpoint"]
        tta = ", ".join(summary["tta"]) if summary.get("tta") else "off"
        lines += [f"# Evaluation of {summary['workdir']}", "",
                  f"- checkpoint: step {how['step']} ({how['chosen_as']}"
                  + (f": {how['reason']}" if how.get("reason") else "") + f"); split: {summary['split']} "
                  f"({summary['num_images']} images of TFDS split '{summary['tfds_split']}')",
                  f"- model: {summary['model']}" + (f", pruned to L{summary['prune_level']}"
                                                    if summary.get("prune_level") else "") + f"; TTA: {tta}",
                  f"- resolution: {summary['image_size'][0]}x{summary['image_size'][1]} (distances in its pixels); "
                  "threshold 0.5; mean ± std over images (ddof=0); distances over images where finite, "
                  "'undefined' counts images where exactly one of prediction and reference is empty", ""]
    lines += _table(summary["targets"])
    for country, per_target in summary.get("by_country", {}).items():
        lines += ["", f"## {country}", ""] + _table(per_target)
    return "\n".join(lines) + "\n"


def write_per_image_csv(path: str | os.PathLike, per_image: Mapping[str, np.ndarray], targets: Sequence[str]) -> None:
    """Writes the per-image CSV described in the module docstring (``path`` local or a URL)."""
    columns = ["index", "patient_id", "country"]
    for t in targets:
        columns += [f"has_mask/{t}"] + [f"{name}/{t}" for name in SCORES + DISTANCES if name in per_image]
    # Built in memory and written as bytes: the csv module's line endings stay exact on any storage.
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i in range(len(per_image["index"])):
            row: list[Any] = [int(per_image["index"][i]), per_image["patient_id"][i], per_image["country"][i]]
            for c, _ in enumerate(targets):
                has = bool(per_image["weights"][i, c] > 0)
                row.append(int(has))
                for name in SCORES + DISTANCES:
                    if name in per_image:
                        value = float(per_image[name][i, c])
                        row.append(("inf" if math.isinf(value) else f"{value:.6g}") if has else "")
            writer.writerow(row)
        reporting.as_path(path).write_bytes(f.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_run(run, *, split: str = "val", transforms=None, prune_level: int | None = None,
                 distances: bool = True, builder=None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Scores every image of ``split`` of a restored run.

    Args:
        run: a `run_lib.Run`.
        split: 'val', 'test' or 'train' (see `run_lib.eval_split`).
        transforms: TTA views (`run_lib.parse_tta`), or None.
        prune_level: UNet++ pruned network L^k, or None for the full network.
        distances: also compute HD95 and ASSD (host-side; the slow part on large sets).
        builder: the prepared TFDS builder, if the caller has it (default: built from the config).

    Returns:
        ``(per_image, summary)``: per_image holds [N] ``index``, ``patient_id``, ``country`` and [N, C] ``weights``,
        ``tp``, ``fp``, ``fn``, ``tn``, the `SCORES` and (with ``distances``) the `DISTANCES`, ordered by index;
        summary is `summarize`'s dict plus the run details. Multi-process runs compute distances on process 0.
    """
    start = time.time()
    config, targets = run.config, run.targets
    builder, tfds_split, indices = run_lib.eval_split(config, split, builder)
    if len(indices) == 0:
        raise ValueError(f"Split {split!r} of this run is empty; nothing to evaluate.")
    metadata = input_pipeline.read_metadata(builder, tfds_split)
    batch_size = run_lib.mesh_batch_size(config.get("eval_batch_size", 0) or config.batch_size, run.mesh)
    # Each process decodes only its own share of the images, as the trainer's `load_data` does.
    dataset = input_pipeline.DeviceDataset.from_builder(builder, tfds_split, indices, run.mesh, batch_size=batch_size,
                                                        image_size=run.image_size, targets=targets)
    probability = run_lib.make_probability_fn(run, prune_level=prune_level, transforms=transforms)

    @jax.jit
    def score(state, batch):
        probs = probability(state, batch["image"])
        weights = batch["mask_weights"] * batch["valid"][:, None]
        counts = metrics.confusion_counts(probs > 0.5, batch["masks"], weights=weights[:, None, None, :])
        return probs, {**counts, "weights": weights, "index": batch["index"]}

    acc = metrics.MetricsAccumulator()
    hd95, assd, dist_index = [], [], []
    for batch in dataset.eval_batches(batch_size):
        probs, values = score(run.state, batch)
        acc.add(values, valid=batch["valid"])
        if distances:
            host_batch = parallel.fetch({"pred": probs > 0.5, "truth": batch["masks"], "valid": batch["valid"],
                                         "index": batch["index"]})
            if jax.process_index() == 0:
                keep = host_batch["valid"]
                d = metrics.batch_surface_distances(host_batch["pred"][keep], host_batch["truth"][keep],
                                                    percentile=95)
                hd95.append(d["hausdorff"])
                assd.append(d["assd"])
                dist_index.append(host_batch["index"][keep])
    per_image = acc.result()
    per_image.update(metrics.scores_from_counts({k: per_image[k] for k in ("tp", "fp", "fn", "tn")}))
    per_image = {k: per_image[k] for k in ("index", "weights", "tp", "fp", "fn", "tn") + SCORES}
    if distances and jax.process_index() == 0:
        order = np.argsort(np.concatenate(dist_index), kind="stable")
        per_image["hd95"] = np.concatenate(hd95)[order]
        per_image["assd"] = np.concatenate(assd)[order]
    per_image["patient_id"] = metadata["patient_id"][per_image["index"]]
    per_image["country"] = metadata["country"][per_image["index"]]

    summary: dict[str, Any] = {
        "workdir": str(run.workdir), "config_name": config.get("name", ""), "config_arg": config.get("arg", ""),
        "model": config.model.name, "checkpoint": {"step": run.step, "chosen_as": run.checkpoint, "reason": run.checkpoint_reason},
        "split": split, "tfds_split": tfds_split, "num_images": int(len(per_image["index"])),
        "image_size": list(run.image_size), "threshold": 0.5, "prune_level": prune_level,
        "tta": [t.name for t in transforms] if transforms else None, "num_devices": run.mesh.size,
    }
    summary.update(summarize(per_image, targets))
    summary["wall_time_s"] = time.time() - start
    return per_image, summary


def default_out_dir(run, split: str, *, tta: bool, prune_level: int | None) -> epath.Path:
    """``<workdir>/eval/<split>_step<step>[_tta][_L<k>]``."""
    name = f"{split}_step{run.step}" + ("_tta" if tta else "") + (f"_L{prune_level}" if prune_level else "")
    return reporting.as_path(run.workdir) / "eval" / name


def write_outputs(out: str | os.PathLike, per_image: Mapping[str, np.ndarray], summary: Mapping[str, Any],
                  targets: Sequence[str]) -> epath.Path:
    """Writes ``per_image.csv``, ``summary.json`` and ``summary.md`` into ``out`` (created; local or a URL);
    returns it."""
    out = reporting.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_per_image_csv(out / "per_image.csv", per_image, targets)
    (out / "summary.json").write_text(json.dumps(reporting.jsonable(summary), indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(format_markdown(summary))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anemia_jax.evaluate", description=__doc__.split("\n\n")[0])
    run_lib.add_run_arguments(
        p, verb="evaluate", checkpoint_default="auto",
        checkpoint_help="'auto' (default): 'latest' on --split=val, where 'best' was selected and would score "
                        "optimistically (K-fold: the same fold), 'best' on test/train; or 'best' (validation mean "
                        "Dice), 'latest' or a step number.")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--no_distances", action="store_true", help="Skip HD95/ASSD (faster on large sets).")
    p.add_argument("--out", default=None, help="Output directory (default <workdir>/eval/<split>_step<N>...).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 bad arguments or run)."""
    args = _parser().parse_args(argv)
    try:
        run, transforms = run_lib.load_run_from_args(args, split=args.split)
        per_image, summary = evaluate_run(run, split=args.split, transforms=transforms, prune_level=args.prune_level,
                                          distances=not args.no_distances)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        out = args.out or default_out_dir(run, args.split, tta=args.tta, prune_level=args.prune_level)
        out = write_outputs(out, per_image, summary, run.targets)
        print(format_markdown(summary))
        print(f"Wrote {out}/per_image.csv, summary.json and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
