"""Evaluation outputs people read: ``per_image.csv``, ``summary.json`` and ``summary.md``.

Written by ``python -m anemia_jax.evaluate`` from an `anemia_jax.evaluation.evaluator.EvalResult`:

* ``per_image.csv``: one row per image: ``index`` (position in its TFDS split), ``patient_id``, ``country``, and per
  target ``has_mask/<t>``, ``dice/<t>``, ``iou/<t>``, ``precision/<t>``, ``recall/<t>``, ``hd95/<t>``, ``assd/<t>``
  (empty where the reference mask is missing; ``inf`` where a distance is undefined: exactly one of prediction and
  reference is empty).
* ``summary.json`` / ``summary.md`` (and ``reliability.png``): the probability calibration (`format_calibration`:
  the pixels' expected calibration error and reliability table before and after the temperature); per target, mean ± std over images (std with ddof=0) of each score, the pooled
  Dice, the number of images scored and of images excluded for a missing mask; for distances the mean, std and
  median over the images where they are finite and the count where they are infinite; the same per country; plus
  the run details (checkpoint, split, model, TTA, ensemble members). For an ensemble, also each run scored alone on
  the same images and the ensemble's gain over their mean (`format_members`), and how many of the images each run
  trained on (``training_overlap``; non-zero makes the scores optimistic).

Each file is written atomically (`anemia_jax.utils.atomic`: complete under its name or absent); an output folder that
cannot be written raises `errors.OutputError` naming it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from anemia_jax.evaluation.evaluator import DISTANCES, SCORES
from anemia_jax.utils import atomic, paths

__all__ = ["default_out_dir", "format_calibration", "format_markdown", "format_members", "write_outputs",
           "write_per_image_csv"]


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
    """Renders an evaluation summary (`evaluator.summarize`'s, with optional run details) as markdown."""
    lines = []
    if "workdir" in summary:
        how = summary["checkpoint"]
        tta = ", ".join(summary["tta"]) if summary.get("tta") else "off"
        members = summary.get("ensemble") or []
        lines += [f"# Evaluation of {summary['workdir']}", "",
                  *([f"- ensemble of {len(members)} runs (mean probability): {', '.join(members)}"] if members else []),
                  f"- checkpoint: step {how['step']} ({how['chosen_as']}"
                  + (f": {how['reason']}" if how.get("reason") else "") + f"); split: {summary['split']} "
                  f"({summary['num_images']} images of TFDS split '{summary['tfds_split']}')",
                  f"- model: {summary['model']}" + (f", pruned to L{summary['prune_level']}"
                                                    if summary.get("prune_level") else "") + f"; TTA: {tta}",
                  f"- resolution: {summary['image_size'][0]}x{summary['image_size'][1]} (distances in its pixels); "
                  f"threshold {summary.get('threshold', 0.5):g}; mean ± std over images (ddof=0); distances over images where finite, "
                  "'undefined' counts images where exactly one of prediction and reference is empty", ""]
    lines += _table(summary["targets"])
    if summary.get("members"):
        lines += ["", format_members(summary).rstrip("\n")]
    if summary.get("calibration"):
        lines += ["", format_calibration(summary["calibration"]).rstrip("\n")]
    overlap = summary.get("training_overlap") or []
    if any(overlap):
        lines += ["", f"**Optimistic**: the runs trained on {', '.join(map(str, overlap))} of these "
                      f"{summary.get('num_images', '?')} images (per run, in order)."]
    by_country = summary.get("by_country", {})
    if len(by_country) > 1:  # one group (e.g. a dataset without countries) would repeat the table above
        for country, per_target in by_country.items():
            lines += ["", f"## {country}", ""] + _table(per_target)
    return "\n".join(lines) + "\n"


def format_members(summary: Mapping[str, Any]) -> str:
    """The ensemble against each of its runs alone on the same images: mean Dice (and HD95) per target, the mean of
    the single runs, and the ensemble minus that mean."""
    members = summary["members"]
    targets = list(summary["targets"])
    distance = all("hd95" in summary["targets"][t] for t in targets)
    head = [f"Dice {t}" for t in targets] + ([f"HD95 {t} (px)" for t in targets] if distance else [])

    def cells(per_target):
        dice = [per_target[t]["dice"]["mean"] for t in targets]
        return dice + ([per_target[t]["hd95"]["mean"] for t in targets] if distance else [])

    def fmt(values, sign=""):
        return " | ".join("n/a" if not math.isfinite(v) else
                          f"{v:{sign}.{4 if i < len(targets) else 2}f}" for i, v in enumerate(values))

    ens = cells(summary["targets"])
    single = np.array([cells(m["targets"]) for m in members], np.float64)
    mean = np.nanmean(single, axis=0) if len(single) else np.full(len(ens), math.nan)
    lines = ["## Ensemble vs single runs (the same images)", "",
             "| model | step | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head),
             f"| ensemble of {len(members)} | - | {fmt(ens)} |"]
    lines += [f"| {epath.Path(m['workdir']).name} | {m['step']} | {fmt(row)} |" for m, row in zip(members, single)]
    lines += [f"| mean of the single runs | - | {fmt(mean)} |",
              f"| ensemble - mean of single runs | - | {fmt(np.asarray(ens) - mean, '+')} |"]
    return "\n".join(lines) + "\n"


def format_calibration(calibration: Mapping[str, Any]) -> str:
    """The pixels' reliability before (and, with a temperature, after) calibration: the expected calibration error
    per target and the reliability table (observed frequency against mean probability per bin)."""
    temps = calibration.get("temperature")
    after = calibration.get("after")
    lines = ["## Probability calibration (pixels of the images with a reference mask)", "",
             f"- temperature: {', '.join(f'{t} {v:.3f}' for t, v in temps.items())} (from {calibration['source']})"
             if temps else "- no temperature applied (calibrate_quality fits one; the scores above are the models' "
                           "own probabilities)", "",
             "| target | ECE before | ECE after |", "|---|---:|---:|"]
    for t, rel in calibration["before"].items():
        lines.append(f"| {t} | {rel['ece']:.4f} | " + (f"{after[t]['ece']:.4f}" if after else "-") + " |")
    lines += ["", "| target | bin | pixels | mean probability / observed (before) | after |", "|---|---|---:|---:|---:|"]
    for t, rel in calibration["before"].items():
        for k, b in enumerate(rel["bins"]):
            if not b["count"] and not (after and after[t]["bins"][k]["count"]):
                continue
            a = after[t]["bins"][k] if after else None

            def pair(x):
                return "-" if not x or x["mean_probability"] is None else \
                    f"{x['mean_probability']:.3f} / {x['observed']:.3f}"

            lines.append(f"| {t} | {b['range'][0]:.1f}-{b['range'][1]:.1f} | {b['count']} | {pair(b)} | "
                         f"{pair(a) if a else '-'} |")
    return "\n".join(lines) + "\n"


def write_per_image_csv(path: str | os.PathLike, per_image: Mapping[str, np.ndarray], targets: Sequence[str]) -> None:
    """Writes the per-image CSV described in the module docstring (``path`` local or a URL)."""
    columns = ["index", "patient_id", "country"]
    for t in targets:
        columns += [f"has_mask/{t}"] + [f"{name}/{t}" for name in SCORES + DISTANCES if name in per_image]
    # Built in memory and written as bytes: the csv module's line endings stay exact on any storage.
    n = len(per_image["index"])
    patients, countries = (per_image.get(key, [""] * n) for key in ("patient_id", "country"))
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i in range(n):
            row: list[Any] = [int(per_image["index"][i]), patients[i], countries[i]]
            for c, _ in enumerate(targets):
                has = bool(per_image["weights"][i, c] > 0)
                row.append(int(has))
                for name in SCORES + DISTANCES:
                    if name in per_image:
                        value = float(per_image[name][i, c])
                        row.append(("inf" if math.isinf(value) else f"{value:.6g}") if has else "")
            writer.writerow(row)
        atomic.write_bytes(path, f.getvalue().encode("utf-8"))


def default_out_dir(run, split: str, *, tta: bool, prune_level: int | None, ensemble: int = 1) -> epath.Path:
    """``<workdir>/eval/<split>_step<step>[_tta][_L<k>][_ensemble<M>]`` of the (first) run."""
    name = (f"{split}_step{run.step}" + ("_tta" if tta else "") + (f"_L{prune_level}" if prune_level else "")
            + (f"_ensemble{ensemble}" if ensemble > 1 else ""))
    return paths.as_path(run.workdir) / "eval" / name


def write_outputs(out: str | os.PathLike, per_image: Mapping[str, np.ndarray], summary: Mapping[str, Any],
                  targets: Sequence[str]) -> epath.Path:
    """Writes ``per_image.csv``, ``summary.json`` and ``summary.md`` into ``out`` (created; local or a URL);
    returns it."""
    out = atomic.ensure_dir(out)
    write_per_image_csv(out / "per_image.csv", per_image, targets)
    atomic.write_json(out / "summary.json", summary)
    atomic.write_text(out / "summary.md", format_markdown(summary))
    if summary.get("calibration") and "://" not in str(out):  # figures are written locally
        try:
            from anemia_jax.evaluation import plots  # noqa: PLC0415

            plots.reliability_diagram(summary["calibration"], out / "reliability.png")
        except ImportError as e:  # matplotlib is optional: the table in summary.md says the same
            from absl import logging  # noqa: PLC0415

            logging.info("No reliability.png: %s", e)
    return out
