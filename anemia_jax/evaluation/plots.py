"""PNG figures of training runs: their training curves (`training_curves`, from their ``metrics.jsonl``).

matplotlib is optional (`anemia_jax.utils.figures`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from anemia_jax.utils import figures

__all__ = ["training_curves"]


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
