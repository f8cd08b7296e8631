"""The Kvasir-SEG model and recipe table: per-image test Dice with bootstrap intervals, paired tests against U-Net.

    python -m experiments.kvasir_table --results=experiments/results/kvasir_seg_cpu_models \
        [--workdir_root=runs/kvasir_cpu_models] [--reference=unet] [--resamples=10000] [--no_flops]

Reads every row folder of ``--results`` that has test scores (``<row>/test/per_image.csv`` and ``summary.json`` from
``python -m anemia_jax.evaluate --split=test --checkpoint=best --out=<row>/test``), with, where present, the run's
``config.json``, ``training_summary.json`` (the trainer's ``summary.json``), ``metrics.jsonl`` and ``runs.jsonl``
(`experiments.run_record`: wall and CPU time of every training and scoring command). Writes into ``--results``:

* ``table.md`` / ``table.json`` (`experiments.provenance.write_results`): per row the per-image Dice mean with its 95%
  percentile bootstrap interval over the test images, median, IoU, pooled Dice, median HD95 (and how many images have
  none: an empty prediction), parameters, forward GFLOPs per image at the run's resolution, CPU-hours; and every row
  against the reference (U-Net): the mean per-image Dice difference with a paired bootstrap interval, the Wilcoxon
  signed-rank p-value, Holm-adjusted within its group (the model families; the recipe variants), and a verdict
  that says only what the interval allows (`experiments.paired_stats`);
* ``dice_ci.png``: each row's Dice with its interval, and each difference with its paired interval;
* ``panel.png`` (with ``--workdir_root``, where the runs' checkpoints and prepared data are): the same 6 test images
  (the 2 best, 2 median and 2 worst by Dice averaged over the model rows) with the ground truth and every model row's
  prediction (`experiments.kvasir_panel`).

Rows: the folder names of ``ROWS`` below get their labels and groups; other folders join the ``models`` group
under their own names. Exit statuses: 0 written; 2 bad flags, no scored row, no reference row, or rows scored on
different images; 5 an output cannot be written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from anemia_jax import cli
from experiments import paired_stats, provenance

PROGRAM = "python -m experiments.kvasir_table"
# name: (label, group); the reference row (U-Net, the configs' recipe) belongs to both groups.
ROWS: dict[str, tuple[str, str]] = {
    "unet": ("U-Net", "models"),
    "unetpp": ("UNet++ (deep supervision)", "models"),
    "attention_unet": ("Attention U-Net", "models"),
    "unet_resnet34": ("U-Net, ResNet-34 encoder (random init)", "models"),
    "segformer": ("SegFormer-B0 (random init)", "models"),
    "transunet": ("TransUNet, reduced (random init)", "models"),
    "unet_noaug": ("U-Net, no augmentation", "recipe"),
    "unet_dice": ("U-Net, Dice loss", "recipe"),
    "unet_focal_tversky": ("U-Net, focal Tversky loss", "recipe"),
    "unet_bce": ("U-Net, BCE loss (sigmoid cross-entropy)", "recipe"),
}
GROUPS = {"models": "Model families (the configs' recipe: combo loss, augmentation)",
          "recipe": "Recipe on U-Net (augmentation; class-imbalance losses)"}


@dataclasses.dataclass
class Row:
    """One scored run: its per-image test scores (aligned by ``index``) and what it cost."""

    name: str
    label: str
    group: str
    index: np.ndarray  # [N] test-split indices
    scores: dict[str, np.ndarray]  # 'dice', 'iou', 'hd95': [N]
    summary: dict[str, Any]  # test/summary.json
    config: dict[str, Any] | None = None
    training: dict[str, Any] | None = None  # the trainer's summary.json
    val_dice: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> validation Dice
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # runs.jsonl
    gflops: float | None = None  # forward, per image
    folder: pathlib.Path | None = None


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    return provenance.read_jsonl(path) if path.exists() else []


def read_per_image(path: pathlib.Path, target: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(index [N], {'dice', 'iou', 'hd95': [N]})`` of an evaluate ``per_image.csv`` for ``target`` (rows without
    that mask are dropped)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = [f"dice/{target}", f"iou/{target}", f"hd95/{target}"]
    if not rows or any(k not in rows[0] for k in ["index", *need]):
        raise cli.CommandLineError(f"{path} is not a per-image CSV of target {target!r} (columns index, "
                                   f"{', '.join(need)}); make it with python -m anemia_jax.evaluate --split=test "
                                   "--checkpoint=best --out=<row>/test.")
    rows = [r for r in rows if r.get(f"has_mask/{target}", "1") not in ("0", "")]
    index = np.array([int(r["index"]) for r in rows])
    return index, {k.split("/")[0]: np.array([float(r[k]) for r in rows]) for k in need}


def read_row(folder: pathlib.Path, target: str) -> Row:
    """The row in ``folder`` (see the module docstring)."""
    label, group = ROWS.get(folder.name, (folder.name, "models"))
    index, scores = read_per_image(folder / "test" / "per_image.csv", target)
    row = Row(folder.name, label, group, index, scores, _read_json(folder / "test" / "summary.json") or {},
              _read_json(folder / "config.json"), _read_json(folder / "training_summary.json"),
              records=_read_jsonl(folder / "runs.jsonl"), folder=folder)
    for m in _read_jsonl(folder / "metrics.jsonl"):
        if m.get("split") == "val" and f"dice/{target}" in m:
            row.val_dice[int(m["step"])] = float(m[f"dice/{target}"])
    return row


def find_rows(results: pathlib.Path, target: str) -> list[Row]:
    """Every scored row folder of ``results``, in `ROWS` order, then the others by name."""
    folders = [p for p in results.iterdir() if (p / "test" / "per_image.csv").exists()] if results.is_dir() else []
    order = {name: i for i, name in enumerate(ROWS)}
    folders.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    return [read_row(p, target) for p in folders]


def _aligned(row: Row, reference: Row) -> tuple[np.ndarray, np.ndarray]:
    """``row``'s and ``reference``'s Dice on the same images, in the reference's order."""
    if sorted(row.index.tolist()) != sorted(reference.index.tolist()):
        raise cli.CommandLineError(f"{row.name} and {reference.name} were scored on different test images "
                                   f"({len(row.index)} vs {len(reference.index)}); paired comparisons need the same "
                                   "images: score both with --split=test of the same data.")
    at = {int(i): k for k, i in enumerate(row.index)}
    return row.scores["dice"][[at[int(i)] for i in reference.index]], reference.scores["dice"]


def cost(row: Row) -> dict[str, Any]:
    """What the row cost, from its ``runs.jsonl`` records: CPU and wall hours of training and of scoring,
    invocations, mean load, commits, and CPU-seconds per training step (everything the trainer did, over the
    steps it trained)."""
    train = [r for r in row.records if r.get("label") == "train"]
    score = [r for r in row.records if r.get("label") == "evaluate"]
    steps = (row.training or {}).get("step")
    train_cpu = sum(r.get("cpu_s", 0.0) for r in train)
    loads = [r["load_1min_mean"] for r in row.records if "load_1min_mean" in r]
    return {
        "train_cpu_h": train_cpu / 3600, "train_wall_h": sum(r.get("wall_s", 0.0) for r in train) / 3600,
        "score_cpu_h": sum(r.get("cpu_s", 0.0) for r in score) / 3600,
        "cpu_h": sum(r.get("cpu_s", 0.0) for r in row.records) / 3600,
        "wall_h": sum(r.get("wall_s", 0.0) for r in row.records) / 3600,
        "train_invocations": len(train), "cpu_s_per_step": train_cpu / steps if steps and train else None,
        "load_1min_mean": sum(loads) / len(loads) if loads else None,
        "commits": sorted({r.get("git", {}).get("git_commit", "unknown")[:7] for r in row.records}),
        "start_utc": min((r["start_utc"] for r in row.records if "start_utc" in r), default=None),
        "end_utc": max((r["end_utc"] for r in row.records if "end_utc" in r), default=None),
    }


def _finite_median(x: np.ndarray) -> float | None:
    finite = x[np.isfinite(x)]
    return float(np.median(finite)) if finite.size else None


def row_stats(row: Row, *, target: str, resamples: int, seed: int) -> dict[str, Any]:
    """The row's statistics (see the module docstring)."""
    dice = paired_stats.bootstrap_mean_ci(row.scores["dice"], resamples=resamples, seed=seed)
    iou = paired_stats.bootstrap_mean_ci(row.scores["iou"], resamples=resamples, seed=seed)
    hd95 = row.scores["hd95"]
    step = (row.summary.get("checkpoint") or {}).get("step")
    training = row.training or {}
    return {
        "name": row.name, "label": row.label, "group": row.group, "num_images": dice.n,
        "dice_mean": dice.mean, "dice_ci": [dice.low, dice.high], "dice_median": float(np.median(row.scores["dice"])),
        "dice_std": float(np.std(row.scores["dice"], ddof=1)) if dice.n > 1 else 0.0,
        "iou_mean": iou.mean, "iou_ci": [iou.low, iou.high],
        "pooled_dice": ((row.summary.get("targets") or {}).get(target) or {}).get("pooled_dice"),
        "hd95_median": _finite_median(hd95), "hd95_undefined": int(np.sum(~np.isfinite(hd95))),
        "images_below_0_5": int(np.sum(row.scores["dice"] < 0.5)),
        "best_step": step, "best_val_dice": row.val_dice.get(int(step)) if step is not None else None,
        "train_steps": training.get("step"), "steps_per_epoch": training.get("steps_per_epoch"),
        "params": training.get("num_params"), "train_step_gflops": training.get("train_step_gflops"),
        "gflops_per_image": row.gflops, "model": (row.config or {}).get("model"),
        "loss": (row.config or {}).get("loss"), "augment": ((row.config or {}).get("augment") or {}).get("enabled"),
        "cost": cost(row),
    }


def verdict(diff: paired_stats.MeanCI, reference_label: str) -> str:
    """What the paired interval allows one to say, and no more."""
    if diff.low > 0:
        return f"higher than {reference_label} (interval above 0)"
    if diff.high < 0:
        return f"lower than {reference_label} (interval below 0)"
    return "not resolved at this n (interval contains 0)"


def analyse(rows: Sequence[Row], *, reference: str, target: str, resamples: int, seed: int) -> dict[str, Any]:
    """Row statistics (``rows``: a list in the rows' order) and the paired comparisons against ``reference``,
    Holm-adjusted within each group."""
    by_name = {r.name: r for r in rows}
    if reference not in by_name:
        raise cli.CommandLineError(f"No scored row {reference!r} (the reference of the paired comparisons) among "
                                   f"{', '.join(by_name) or 'none'}; pass --reference=<one of them>.")
    ref = by_name[reference]
    stats = [row_stats(r, target=target, resamples=resamples, seed=seed) for r in rows]
    comparisons = []
    for r in rows:
        if r.name == reference:
            continue
        a, b = _aligned(r, ref)
        c = paired_stats.paired_comparison(a, b, resamples=resamples, seed=seed)
        comparisons.append({"row": r.name, "label": r.label, "group": r.group, "reference": reference,
                            "dice_difference": c.difference.mean,
                            "difference_ci": [c.difference.low, c.difference.high],
                            "wilcoxon_p": c.wilcoxon_p, "wins": c.wins, "ties": c.ties, "losses": c.losses,
                            "verdict": verdict(c.difference, ref.label)})
    for group in {c["group"] for c in comparisons}:
        family = [c for c in comparisons if c["group"] == group]
        for c, p in zip(family, paired_stats.holm([c["wilcoxon_p"] for c in family])):
            c["wilcoxon_p_holm"] = p
    return {"reference": reference, "target": target, "level": 0.95, "resamples": resamples, "seed": seed,
            "rows": stats, "comparisons": comparisons}


# ------------------------------------------------------------------------------------------------ markdown


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _width(model: Mapping[str, Any] | None) -> str:
    if not model:
        return "–"
    for key, text in (("features", "features {}"), ("variant", "{}"), ("encoder", "{} encoder"),
                      ("hidden_size", "ViT hidden {}")):
        if model.get(key):
            return text.format(model[key])
    return "–"


def _recipe(s: Mapping[str, Any]) -> str:
    if s.get("loss") is None:
        return "–"
    loss = s["loss"].get("name", "?")
    return f"{loss}, {'augmentation' if s.get('augment') else 'no augmentation'}"


def to_markdown(result: Mapping[str, Any]) -> str:
    """The tables of ``result`` (`analyse`) as markdown."""
    stats, comparisons = {s["name"]: s for s in result["rows"]}, {c["row"]: c for c in result["comparisons"]}
    ref = result["reference"]
    lines = []
    for group, title in GROUPS.items():
        names = [n for n, s in stats.items() if s["group"] == group or n == ref]
        if not any(n != ref for n in names) and group != "models":
            continue
        lines += [f"## {title}", "",
                  "| row | width | recipe | params (M) | GFLOP/img | best step (val Dice) | **test Dice** [95% CI] "
                  "| median | IoU | pooled Dice | HD95 px median (none) | Dice < 0.5 | Δ Dice vs "
                  f"{stats[ref]['label']} [95% CI] | Wilcoxon p (Holm) | CPU-h |",
                  "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in names:
            s, c, cst = stats[n], comparisons.get(n), stats[n]["cost"]
            diff = (f"{c['dice_difference']:+.3f} [{c['difference_ci'][0]:+.3f}, {c['difference_ci'][1]:+.3f}]"
                    if c else "(reference)")
            p = f"{_p(c['wilcoxon_p'])} ({_p(c['wilcoxon_p_holm'])})" if c else "–"
            params = _f(s["params"] / 1e6, 2) if s["params"] else "–"
            best = f"{s['best_step']} ({_f(s['best_val_dice'])})" if s["best_step"] is not None else "–"
            lines.append(
                f"| {s['label']} | {_width(s['model'])} | {_recipe(s)} | {params} | {_f(s['gflops_per_image'], 2)} "
                f"| {best} | **{s['dice_mean']:.3f}** [{s['dice_ci'][0]:.3f}, {s['dice_ci'][1]:.3f}] "
                f"| {s['dice_median']:.3f} | {s['iou_mean']:.3f} | {_f(s['pooled_dice'])} "
                f"| {_f(s['hd95_median'], 1)} ({s['hd95_undefined']}) | {s['images_below_0_5']} | {diff} | {p} "
                f"| {_f(cst['cpu_h'], 2) if cst['cpu_h'] else '–'} |")
        lines.append("")
    lines += ["## Paired comparisons", "",
              f"Per-image Dice of each row minus {stats[ref]['label']}'s on the same {stats[ref]['num_images']} test "
              f"images: mean with a {result['resamples']}-resample paired percentile bootstrap interval (95%), images "
              "won / tied / lost, two-sided Wilcoxon signed-rank p, Holm-adjusted within the group.", "",
              "| row | group | Δ Dice [95% CI] | won / tied / lost | Wilcoxon p | Holm p | what the interval allows |",
              "|---|---|---:|---|---:|---:|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['label']} | {c['group']} | {c['dice_difference']:+.3f} [{c['difference_ci'][0]:+.3f}, "
                     f"{c['difference_ci'][1]:+.3f}] | {c['wins']} / {c['ties']} / {c['losses']} "
                     f"| {_p(c['wilcoxon_p'])} | {_p(c['wilcoxon_p_holm'])} | {c['verdict']} |")
    lines += ["", "## Cost", "",
              "| row | CPU-s per step (train) | train CPU-h | scoring CPU-h | wall h | train invocations | mean load "
              "(1 min) | commits | ran (UTC) |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in stats.values():
        c = s["cost"]
        lines.append(f"| {s['label']} | {_f(c['cpu_s_per_step'], 2)} | {_f(c['train_cpu_h'], 2)} "
                     f"| {_f(c['score_cpu_h'], 3)} | {_f(c['wall_h'], 2)} | {c['train_invocations']} "
                     f"| {_f(c['load_1min_mean'], 1)} | {', '.join(c['commits']) or '–'} "
                     f"| {c['start_utc'] or '–'} – {c['end_utc'] or '–'} |")
    total = sum(s["cost"]["cpu_h"] for s in stats.values())
    lines += ["", f"Total: {total:.2f} CPU-hours over {len(stats)} rows.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line


def _command() -> cli.Command:
    cmd = cli.Command(PROGRAM, __doc__)
    fv = cmd.flags
    flags.DEFINE_string("results", None, "Folder of row folders (<row>/test/per_image.csv, ...); outputs go here.",
                        flag_values=fv)
    flags.DEFINE_string("workdir_root", None, "Folder of the rows' training runs (<root>/<row>): draws panel.png.",
                        flag_values=fv)
    flags.DEFINE_string("reference", "unet", "Row every other row is compared with.", flag_values=fv)
    flags.DEFINE_string("target", "mask", "Mask scored.", flag_values=fv)
    flags.DEFINE_integer("resamples", paired_stats.DEFAULT_RESAMPLES, "Bootstrap resamples.", lower_bound=100,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.", flag_values=fv)
    flags.DEFINE_bool("no_flops", False, "Skip the forward GFLOPs (they build each model with JAX).", flag_values=fv)
    flags.DEFINE_string("name", "table", "Stem of the markdown/JSON outputs.", flag_values=fv)
    flags.mark_flags_as_required(["results"], flag_values=fv)
    return cmd


def main(argv: Sequence[str]) -> int:
    """The command (see the module docstring); ``argv`` has the program name first. Returns the exit status."""
    cmd = _command()
    start = time.perf_counter()
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
        results = pathlib.Path(cmd.results)
        rows = find_rows(results, cmd.target)
        if not rows:
            raise cli.CommandLineError(f"No scored row in {results}: a row is a folder with test/per_image.csv "
                                       "(run.sh there makes them).")
        from experiments import kvasir_panel  # noqa: PLC0415 -- JAX only past the flags

        if not cmd.no_flops:
            kvasir_panel.add_gflops(rows)
        result = analyse(rows, reference=cmd.reference, target=cmd.target, resamples=cmd.resamples, seed=cmd.seed)
        figures = [kvasir_panel.dice_figure(result, results / "dice_ci.png")]
        if cmd.workdir_root:
            figures.append(kvasir_panel.panel_figure(rows, result, pathlib.Path(cmd.workdir_root),
                                                     results / "panel.png", target=cmd.target))
        note = ("CPU-scale: narrow models at 128 px, short training on a 2-core CPU, every model from random "
                "initialisation (no pretrained weights are reachable here). Intervals are over test images only.")
        path = provenance.write_results(results, cmd.name, "Kvasir-SEG test split, CPU scale: model and recipe table",
                                        to_markdown(result), result, provenance.record(argv[1:],
                                        time.perf_counter() - start, "-m experiments.kvasir_table"), note)
    except Exception as e:  # noqa: BLE001 -- cmd.fail re-raises anything that is not a known failure
        return cmd.fail(e)
    print(path.read_text())
    print("Wrote " + ", ".join(str(p) for p in [path, path.with_suffix(".json"), *figures]))
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
