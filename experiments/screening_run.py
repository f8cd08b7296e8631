"""Anemia screening from conjunctival colour with ground-truth vs predicted masks: what segmentation errors cost.

    # A K-fold set (the folder of fold workdirs that experiments/protocols.py made for one model):
    python experiments/screening_run.py --runs=/tmp/folds/unet --out=experiments/results/x [--target=palpebral]
    # A single run (its validation part only, split again into patient-level folds for the regressors):
    python experiments/screening_run.py --runs=runs/unet --out=...

For every photo that a segmentation model did NOT train on -- the validation fold of each K-fold run (or the
left-out country of a leave-one-country-out run) -- the run's model predicts the ``--target`` mask (default
palpebral, the region the anemia literature reads colour from) at its training resolution; the probabilities are
resized to ``--feature_size`` (default: the training resolution) and thresholded at 0.5. Colour features
(`anemia_jax.colour`: CIELAB means, a*/L*, mean RGB and chromaticities, erythema index, high hue ratio) are
computed inside the ground-truth mask and inside the predicted mask of the same photo, and
`anemia_jax.screening.screening_table` cross-validates Hgb regression (ridge) and anemia detection (logistic
regression, Youden threshold chosen on training parts) from each feature set on the same patient-level folds:

* a K-fold set: the segmentation folds themselves (fold k's regressors train on the other folds' photos, whose
  predicted masks come from the other folds' models), so no photo's mask, features or label leaks into its own
  prediction;
* a single run: `screening.grouped_folds` over the patients of its validation part.

Photos whose mask is missing or empty under either source are excluded from both rows and counted. The checkpoint
defaults to 'latest': in K-fold runs 'best' was chosen on the very fold it would be scored on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from anemia_jax import colour, input_pipeline, run_lib, screening  # noqa: E402
from anemia_jax.predict import resize_probabilities  # noqa: E402
from experiments import provenance  # noqa: E402


def find_runs(path: str | pathlib.Path) -> list[pathlib.Path]:
    """``path`` itself if it is a run (has config.json), else its subfolders that are runs, sorted."""
    path = pathlib.Path(path).expanduser()
    if (path / "config.json").is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob("*/config.json"))
    if not runs:
        raise FileNotFoundError(f"{path} is neither a run (config.json) nor a folder of runs (*/config.json).")
    return runs


def _size(text: str, default: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return default
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def out_of_sample_masks(run_dirs: Sequence[pathlib.Path], *, target: str, checkpoint: str,
                        feature_size: str = "") -> dict[str, Any]:
    """Predicted and ground-truth ``target`` masks of every photo each run did not train on.

    Returns:
        dict with [N] ``index``, ``patient_id``, ``hgb``, ``anemic``, ``run`` (position in ``run_dirs``),
        ``has_mask`` and [N, H, W, 3] ``images``, [N, H, W] bool ``truth`` / ``pred`` at the feature size, plus
        ``feature_size`` and ``checkpoints`` (the step restored per run).
    """
    parts: dict[str, list] = {k: [] for k in ("index", "patient_id", "hgb", "anemic", "run", "has_mask", "images",
                                               "truth", "pred")}
    steps, builder, size = [], None, None
    for r, workdir in enumerate(run_dirs):
        run = run_lib.load_run(workdir, checkpoint=checkpoint)
        if target not in run.targets:
            raise ValueError(f"{workdir} was trained on {run.targets}, not {target!r}; pass --target.")
        split = "test" if run.config.split.protocol == "loco" else "val"
        builder, tfds_split, indices = run_lib.eval_split(run.config, split, builder)
        size = _size(feature_size, run.image_size) if size is None else size
        host = input_pipeline.read_examples(builder, tfds_split, indices, image_size=run.image_size, targets=(target,))
        probs = run_lib.predict_images(run, host.images)[..., run.targets.index(target)]
        feat = host if size == run.image_size else input_pipeline.read_examples(
            builder, tfds_split, indices, image_size=size, targets=(target,))
        parts["pred"].append(np.stack([resize_probabilities(p[..., None], size)[..., 0] > 0.5 for p in probs]))
        parts["truth"].append(feat.masks[..., 0] > 0)
        parts["images"].append(feat.images)
        parts["has_mask"].append(feat.mask_weights[:, 0] > 0)
        parts["index"].append(feat.indices)
        parts["run"].append(np.full(len(indices), r))
        for key in ("patient_id", "hgb", "anemic"):
            parts[key].append(feat.metadata[key])
        steps.append(run.step)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if len(np.unique(out["index"])) != len(out["index"]):
        raise ValueError("The runs' held-out parts overlap: pass the fold workdirs of ONE K-fold set (or one run).")
    out["feature_size"], out["checkpoints"] = size, steps
    return out


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def run_screening(masks: dict[str, Any], *, seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """`screening.screening_table` rows for ground-truth and predicted masks, plus segmentation context."""
    has = masks["has_mask"]
    truth = np.where(has[:, None, None], masks["truth"], False)  # a missing mask is empty: NaN features, excluded
    features = {"ground-truth mask": colour.batch_colour_features(masks["images"], truth),
                "predicted mask": colour.batch_colour_features(masks["images"], masks["pred"])}
    runs = np.unique(masks["run"])
    if len(runs) > 1:
        folds = [(np.flatnonzero(masks["run"] != r), np.flatnonzero(masks["run"] == r)) for r in runs]
    else:
        folds = screening.grouped_folds(masks["patient_id"], 5, seed=seed)
    rows = screening.screening_table(features, hgb=masks["hgb"], anemic=masks["anemic"], folds=folds,
                                     groups=masks["patient_id"], seed=seed)
    dice = [_dice(p, t) for p, t, h in zip(masks["pred"], truth, has) if h]
    context = {"num_photos": int(len(has)), "num_missing_mask": int((~has).sum()),
               "num_empty_predicted_mask": int(sum(not p.any() for p in masks["pred"])),
               "segmentation_dice_mean": float(np.mean(dice)) if dice else float("nan"),
               "segmentation_dice_std": float(np.std(dice)) if dice else float("nan"),
               "num_folds": len(folds), "feature_names": list(colour.FEATURE_NAMES)}
    return rows, context


def main(argv: Sequence[str]) -> int:
    start = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="A run workdir, or a folder of fold workdirs (one K-fold set).")
    p.add_argument("--target", default="palpebral", help="Mask the colour is read from.")
    p.add_argument("--checkpoint", default="latest", help="'latest' (default), 'best' or a step.")
    p.add_argument("--feature_size", default="", help="H,W at which colour is read (default: training size).")
    p.add_argument("--seed", type=int, default=0, help="Inner-fold shuffling of the regressors.")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="screening")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    run_dirs = find_runs(args.runs)
    masks = out_of_sample_masks(run_dirs, target=args.target, checkpoint=args.checkpoint,
                                feature_size=args.feature_size)
    rows, context = run_screening(masks, seed=args.seed)
    h, w = masks["feature_size"]
    body = (f"Colour of the **{args.target}** mask, read at {h}x{w} from {context['num_photos']} photos that the "
            f"segmentation models did not train on ({len(run_dirs)} run(s): {', '.join(d.name for d in run_dirs)}; "
            f"checkpoint '{args.checkpoint}', steps {masks['checkpoints']}). Segmentation Dice of the predicted "
            f"masks on them: {context['segmentation_dice_mean']:.4f} ± {context['segmentation_dice_std']:.4f} "
            f"(images with a reference mask; {context['num_empty_predicted_mask']} predicted masks empty). Hgb: ridge "
            f"regression, anemia: logistic regression, both on all {len(colour.FEATURE_NAMES)} colour features, "
            f"{context['num_folds']} patient-level folds.\n\n" + screening.format_markdown(rows))
    data = {"rows": [{k: v for k, v in r.items() if k not in ("regression", "detection")} for r in rows],
            "context": context, "runs": [str(d) for d in run_dirs], "target": args.target}
    path = provenance.write_results(args.out, args.name, "Anemia screening: ground-truth vs predicted masks", body,
                                    data, provenance.record(argv, time.time() - start, "experiments/screening_run.py"),
                                    args.note)
    print(body)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
