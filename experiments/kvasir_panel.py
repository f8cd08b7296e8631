"""The figures and model costs of `experiments.kvasir_table`: Dice with intervals, the same test images across models.

* `dice_figure`: each row's per-image Dice mean with its bootstrap interval, and each row's paired difference from
  the reference with its interval (a line at 0), from the table's result (no JAX).
* `panel_figure`: the same 6 test images for every model row -- the 2 best, 2 median and 2 worst by per-image Dice
  averaged over the model rows -- each model's best checkpoint restored from its run (`anemia_jax.runs.restore`),
  applied to the images as the evaluation read them (the run's resolution), drawn as an error map on the image:
  true positives green, false positives red, false negatives blue, with the image's Dice from the scored CSV.
* `add_gflops`: forward GFLOPs per image of each row's model at its resolution (`experiments.model_table.measure`).

matplotlib is optional (`anemia_jax.utils.figures`); the panel needs the runs' checkpoints and prepared data.
"""

from __future__ import annotations

import pathlib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.utils import figures

_GROUP_COLOURS = {"models": "tab:blue", "recipe": "tab:orange"}


def add_gflops(rows: Sequence[Any]) -> None:
    """Sets ``row.gflops`` (forward GFLOPs per image) of every row whose folder has the run's ``config.json``."""
    from anemia_jax.runs import restore  # noqa: PLC0415
    from experiments import model_table  # noqa: PLC0415

    for row in rows:
        if row.folder is not None and (row.folder / "config.json").exists():
            _, row.gflops = model_table.measure(restore.load_config(row.folder))


def dice_figure(result: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Dice [95% CI] per row (left) and Δ Dice vs the reference [95% paired CI] (right); returns ``path``."""
    plt = figures.pyplot()
    stats, ref = {s["name"]: s for s in result["rows"]}, result["reference"]
    comparisons = {c["row"]: c for c in result["comparisons"]}
    names = list(stats)
    y = np.arange(len(names))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    for yi, name in zip(y, names):
        s = stats[name]
        colour = "black" if name == ref else _GROUP_COLOURS.get(s["group"], "tab:gray")
        lo, hi = s["dice_ci"]
        left.errorbar(s["dice_mean"], yi, xerr=[[s["dice_mean"] - lo], [hi - s["dice_mean"]]], fmt="o",
                      color=colour, capsize=3)
        left.annotate(f"{s['dice_mean']:.3f}", (hi, yi), xytext=(4, -3), textcoords="offset points", fontsize=7)
        if name in comparisons:
            c = comparisons[name]
            d, (lo, hi) = c["dice_difference"], c["difference_ci"]
            right.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt="s", color=colour, capsize=3)
            right.annotate(f"{d:+.3f}", (hi, yi), xytext=(4, -3), textcoords="offset points", fontsize=7)
    right.axvline(0.0, color="gray", lw=0.8, ls="--")
    left.set_yticks(y, [stats[n]["label"] for n in names], fontsize=8)
    n = stats[ref]["num_images"]
    left.set_xlabel(f"test Dice per image, mean [95% bootstrap CI], n = {n}")
    right.set_xlabel(f"Δ Dice vs {stats[ref]['label']} [95% paired bootstrap CI]")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Kvasir-SEG test split, CPU scale (128 px, random init): blue model families, orange recipe "
                 "variants, black the reference", fontsize=9)
    return figures.save(fig, path)


def choose_images(result: Mapping[str, Any], rows: Sequence[Any], per_kind: int = 2) -> list[tuple[int, str]]:
    """``[(test index, 'best'|'median'|'worst')]``: the ``per_kind`` images of each kind by the per-image Dice
    averaged over the model rows (group 'models'; the reference always counts), best first."""
    ref = result["reference"]
    models = [r for r in rows if r.group == "models" or r.name == ref]
    reference = next(r for r in rows if r.name == ref)
    order = [int(i) for i in reference.index]
    mean = np.zeros(len(order))
    for r in models:
        at = {int(i): k for k, i in enumerate(r.index)}
        mean += r.scores["dice"][[at[i] for i in order]]
    ranked = [order[k] for k in np.argsort(-mean / len(models), kind="stable")]
    if len(ranked) < 3 * per_kind:
        raise ValueError(f"A panel of {3 * per_kind} images needs that many scored images; there are {len(ranked)}.")
    mid = (len(ranked) - per_kind) // 2
    return ([(i, "best") for i in ranked[:per_kind]] + [(i, "median") for i in ranked[mid:mid + per_kind]]
            + [(i, "worst") for i in ranked[-per_kind:]])


def _predict(workdir: pathlib.Path, indices: Sequence[int], split: str, target: str, threshold: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(images [n,H,W,3] uint8, truth [n,H,W] bool, prediction [n,H,W] bool, checkpoint step)`` of the run."""
    from anemia_jax.data import input_pipeline, loading  # noqa: PLC0415
    from anemia_jax.inference import probabilities  # noqa: PLC0415
    from anemia_jax.runs import restore  # noqa: PLC0415

    run = restore.load_run(workdir, checkpoint="best")
    builder, tfds_split, _ = loading.eval_split(run.config, split)
    examples = input_pipeline.read_examples(builder, tfds_split, np.asarray(indices), image_size=run.image_size,
                                            targets=run.targets)
    fn, variables = probabilities.probability_of(run)
    probs = probabilities.predict_images(probabilities.sharded(fn, run.mesh), variables, examples.images, run.mesh)
    c = run.targets.index(target)
    return examples.images, examples.masks[..., c] > 0, probs[..., c] > threshold, run.step


def _error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32) * 0.55
    for mask, colour in ((truth & pred, (60, 220, 60)), (~truth & pred, (240, 40, 40)), (truth & ~pred, (40, 90, 255))):
        out[mask] = 0.35 * out[mask] + 0.65 * np.array(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def panel_figure(rows: Sequence[Any], result: Mapping[str, Any], workdir_root: pathlib.Path, path: pathlib.Path, *,
                 target: str = "mask", split: str = "test") -> pathlib.Path:
    """The 6 images of `choose_images` (rows) by image, ground truth and every model row whose run is in
    ``workdir_root/<row>`` (columns); returns ``path``.

    Raises:
        FileNotFoundError: no model row has its run under ``workdir_root``.
    """
    chosen = choose_images(result, rows)
    indices = [i for i, _ in chosen]
    ref = result["reference"]
    models = [r for r in rows if (r.group == "models" or r.name == ref) and (workdir_root / r.name).is_dir()]
    if not models:
        raise FileNotFoundError(f"No model row has its training run under {workdir_root} (<root>/<row>/config.json "
                                "and checkpoints): the panel restores each model's best checkpoint.")
    predictions, images, truth = {}, None, None
    for r in models:
        threshold = float(r.summary.get("threshold", 0.5))
        images, truth, predictions[r.name], step = _predict(workdir_root / r.name, indices, split, target, threshold)
        scored = (r.summary.get("checkpoint") or {}).get("step")
        if scored is not None and scored != step:
            raise ValueError(f"{workdir_root / r.name}'s best checkpoint is step {step}, but its test scores are of "
                             f"step {scored}: score it again (python -m anemia_jax.evaluate --checkpoint=best).")
    plt = figures.pyplot()
    cols = 2 + len(models)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(1.7 * cols, 1.8 * len(chosen)), squeeze=False)
    for k, (index, kind) in enumerate(chosen):
        axes[k, 0].imshow(images[k])
        axes[k, 0].set_ylabel(f"{kind}\n#{index}", fontsize=8)
        axes[k, 1].imshow(truth[k], cmap="gray", vmin=0, vmax=1)
        for j, r in enumerate(models):
            dice = r.scores["dice"][list(r.index).index(index)]
            axes[k, 2 + j].imshow(_error_map(images[k], truth[k], predictions[r.name][k]))
            axes[k, 2 + j].set_title(f"Dice {dice:.2f}", fontsize=7, pad=2)
    for j, title in enumerate(["image", "ground truth", *[r.label for r in models]]):
        axes[0, j].annotate(textwrap.fill(title, 20), (0.5, 1.12), xycoords="axes fraction", ha="center",
                            va="bottom", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Kvasir-SEG test images, CPU scale (128 px)\nthe 2 best, 2 median and 2 worst by Dice averaged over "
                 "the models\ngreen true positive, red false positive, blue false negative", fontsize=8)
    return figures.save(fig, path)
