"""PNG figures of runs: their training curves (`training_curves`, from their ``metrics.jsonl``) and the reliability
diagram of an evaluation (`reliability_diagram`).

matplotlib is optional (`anemia_jax.utils.figures`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from anemia_jax.utils import figures

__all__ = ["reliability_diagram", "training_curves"]


def training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path, *,
                    metric: str = "dice/mean", title: str = "") -> pathlib.Path:
    """Training loss and validation ``metric`` against the step, one line per run, side by side.

    Args:
        runs: ``{label: records}``, each a run's ``metrics.jsonl`` lines as dicts (``split`` 'train' records with
            ``loss``; 'val' records with ``metric``; `anemia_jax.training.reporting` writes them).
        path: the PNG to write.
        metric: the validation metric drawn (default the mean Dice over targets); the best value is marked.
        title: the figure's title.
    """
    plt = figures.pyplot()
    fig, (loss_ax, val_ax) = figures.grid(plt, 2, size=4.2)
    for label, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
        val = [(r["step"], r[metric]) for r in records if r.get("split") == "val" and metric in r]
        if train:
            loss_ax.plot(*zip(*train), lw=1.0, label=label)
        if val:
            line, = val_ax.plot(*zip(*val), marker="o", ms=3, lw=1.2, label=label)
            best_step, best = max(val, key=lambda sv: sv[1])
            val_ax.annotate(f"{best:.3f}", (best_step, best), fontsize=7, color=line.get_color(),
                            xytext=(0, 5), textcoords="offset points", ha="center")
    for ax, ylabel in ((loss_ax, "training loss"), (val_ax, f"validation {metric}")):
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return figures.save(fig, path)


def reliability_diagram(calibration: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Observed frequency against mean predicted probability per bin, one panel per target, before (and after) the
    temperature (`anemia_jax.evaluation.eval_report.format_calibration`'s data), with the ECE in the legend."""
    plt = figures.pyplot()
    before, after = calibration["before"], calibration.get("after")
    fig, axes = figures.grid(plt, len(before), size=3.6)
    for ax, target in zip(axes, before):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for label, rel in (("before", before[target]), ("after", after[target] if after else None)):
            if rel is None:
                continue
            points = [(b["mean_probability"], b["observed"]) for b in rel["bins"] if b["mean_probability"] is not None]
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{label} (ECE {rel['ece']:.3f})")
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figures.save(fig, path)
