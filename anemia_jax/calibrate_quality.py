"""Chooses the quality verdict's thresholds on validation data and writes them beside the runs (``quality.json``).

    # K-fold runs, each on its own validation fold (thresholds for predicting with ONE run):
    python -m anemia_jax.calibrate_quality --workdir=cv/unet/fold_0 ... --workdir=cv/unet/fold_4 [--split=val]
    # The ensemble of the runs, on images none of them trained on (thresholds for predicting with the ENSEMBLE):
    python -m anemia_jax.calibrate_quality --workdir=... --workdir=... --split=test [--config.dataset.<key>=...]
        [--checkpoint=auto] [--tta ...] [--threshold=0.5] [--out=PATH] [--verbose]

Every photo of the split is segmented (`anemia_jax.inference.segmenter.Segmenter`) at the runs' resolution and measured
(`anemia_jax.screening.quality.measure`: the quality target's predicted area and mean uncertainty) and its predicted
mask compared with the reference (Dice; photos without a reference mask are left out). `anemia_jax.screening.quality.
choose_thresholds` then picks ``min_area_fraction`` and ``max_uncertainty`` so that each keeps the share
``config.quality.keep_good`` of the photos whose segmentation is good (Dice >= ``config.quality.good_dice``), and
reports what the rule catches among the poor ones, and how often it would send anemic and non-anemic subjects' photos to
retake (a verdict that rejects pale conjunctivas more often would bias the screening). The exposure thresholds
(brightness, washed-out pixels) are physical limits copied from ``config.quality`` unchanged; the report counts the
photos they flag.

Which uncertainty the thresholds fit matters, since an ensemble is more uncertain where its members disagree:

* ``--split=val`` (default): each run alone on its own validation split (out-of-fold for K-fold runs), pooled:
  ``mode: per_run``, for predicting with one of these runs.
* any other split: the ensemble of all the runs (mean probability) on that split, which none of them may have
  trained on (checked from each run's recorded config, as ``evaluate`` does): ``mode: ensemble``, for predicting
  with exactly these runs together. For K-fold runs use another data set, e.g. on the phantom
  ``--config.dataset.builder_config=res256_heldout --config.dataset.test_split=train --split=test``.

Writes ``--out`` (default: ``quality.json`` in the run's directory, or in the folder holding all the runs), which
``predict`` (and the app) find there: the thresholds, the mode, split, runs and checkpoint steps, the command and
the report. The quality settings are the first run's ``config.quality`` (defaults for runs older than it);
``--config.quality.<key>=<value>`` changes them.

Exit status: 0 written; 2 bad arguments, runs or split (or an ensemble scored on its runs' training images);
3-5 as for ``evaluate``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from anemia_jax import cli
from anemia_jax.screening import quality


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.calibrate_quality", __doc__)
    cmd.run_flags(verb="choose the quality thresholds of", checkpoint_default="auto",
                  checkpoint_help="'auto' (default): 'latest' on --split=val ('best' was selected there), 'best' "
                                  "elsewhere; or 'best', 'latest' or a step number.")
    fv = cmd.flags
    flags.DEFINE_enum("split", "val", ["val", "test", "train"], "val: each run on its own validation split; "
                      "test/train: the ensemble on the first run's split.", flag_values=fv)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the masks (as predict's).", flag_values=fv)
    flags.DEFINE_string("out", None, f"Output JSON (default {quality.THRESHOLDS_FILE} beside the runs).",
                        flag_values=fv)
    return cmd


def default_out(workdirs: Sequence[str]) -> str:
    """``quality.json`` in the single run's directory, or in the folder holding all the runs (else the first's)."""
    if len(workdirs) == 1:
        return os.path.join(workdirs[0], quality.THRESHOLDS_FILE)
    parents = {os.path.dirname(os.path.normpath(w)) for w in workdirs}
    folder = parents.pop() if len(parents) == 1 else workdirs[0]
    return os.path.join(folder, quality.THRESHOLDS_FILE)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def measure_split(runs, config, split: str, *, threshold: float, transforms, prune_level, channel: int,
                  builder=None) -> dict[str, np.ndarray]:
    """Segments every photo of ``split`` (cut by ``config``) with ``runs`` (one run, or an ensemble) and returns
    [N] ``area_fraction``, ``mean_uncertainty``, ``brightness``, ``clipped_fraction`` and ``dice`` (photos with a
    reference mask of the target only), and ``anemic`` (1/0, -1 unknown)."""
    from anemia_jax.data import input_pipeline  # noqa: PLC0415
    from anemia_jax.inference import segmenter
    from anemia_jax.training import experiment

    builder, tfds_split, indices = experiment.eval_split(config, split, builder)
    first = runs[0]
    host = input_pipeline.read_examples(builder, tfds_split, indices, image_size=first.image_size,
                                        targets=first.targets)
    keep = host.mask_weights[:, channel] > 0
    segs = segmenter.Segmenter(runs, threshold=threshold, transforms=transforms,
                               prune_level=prune_level).segment(list(host.images[keep]))
    rows = []
    for photo, truth, seg in zip(host.images[keep], host.masks[keep], segs):
        m = quality.measure(photo, seg, channel)
        rows.append([m.area_fraction, m.mean_uncertainty, m.brightness, m.clipped_fraction,
                     _dice(seg.probs_model[..., channel] > threshold, truth[..., channel] > 0)])
    names = ("area_fraction", "mean_uncertainty", "brightness", "clipped_fraction", "dice")
    table = np.asarray(rows, np.float64).reshape(-1, len(names))
    anemic = np.asarray(host.metadata.get("anemic", np.full(len(keep), -1)), np.int64)[keep]
    return {**{name: table[:, k] for k, name in enumerate(names)}, "anemic": anemic}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``) and returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    cmd = _command()
    if (status := cmd.start_runs(argv)) is not None:
        return status
    from anemia_jax.evaluation import evaluator  # noqa: PLC0415
    from anemia_jax.inference import probabilities
    from anemia_jax.runs import restore
    from anemia_jax.training import experiment

    try:
        transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
        restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint, split=cmd.split, configs=cmd.run_configs())
        settings = {**quality.default_config().to_dict(), **dict(restored[0].config.get("quality") or {})}
        channel = quality.target_channel(restored[0].targets, settings["target"])
        target = restored[0].targets[channel]
        kwargs = dict(threshold=cmd.threshold, transforms=transforms, prune_level=cmd.prune_level, channel=channel)
        if cmd.split == "val":
            mode = "per_run"
            parts = [measure_split([r], r.config, "val", **kwargs) for r in restored]
            measured = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            mode = "ensemble"
            builder, tfds_split, indices = experiment.eval_split(restored[0].config, cmd.split)
            overlap = evaluator.training_overlap(restored, builder, tfds_split, indices)
            if any(overlap):
                raise ValueError(f"The runs trained on {overlap} of the {len(indices)} images of split "
                                 f"{cmd.split!r} (per run): choose the ensemble's thresholds on images none of them "
                                 "trained on (see --help).")
            measured = measure_split(restored, restored[0].config, cmd.split, builder=builder, **kwargs)
        if not len(measured["dice"]):
            raise ValueError(f"No photo of split {cmd.split!r} has a reference {target!r} mask to calibrate on.")
        chosen = quality.choose_thresholds(measured["area_fraction"], measured["mean_uncertainty"],
                                           measured["dice"], good_dice=settings["good_dice"],
                                           keep_good=settings["keep_good"])
        base = quality.thresholds_from_config(settings)
        thresholds = dataclasses.replace(
            base, min_area_fraction=chosen["min_area_fraction"], max_uncertainty=chosen["max_uncertainty"],
            target=target, source=f"chosen by calibrate_quality on split {cmd.split!r} ({mode})")
        verdicts = [quality.verdict(quality.QualityMeasures(*values), thresholds) for values in zip(
            *(measured[k] for k in ("area_fraction", "mean_uncertainty", "brightness", "clipped_fraction")))]
        report = {**chosen["report"], "usable": int(sum(v.usable for v in verdicts)),
                  "retake_by_reason": {code: int(sum(code in v.codes for v in verdicts)) for code in
                                       ("too_dark", "no_conjunctiva", "region_too_small", "uncertain", "overexposed")},
                  # A verdict that rejects anemic patients' (paler) photos more often would bias the screening.
                  "retake_share_by_anemia": {
                      label: float(np.mean([not v.usable for v, a in zip(verdicts, measured["anemic"]) if a == flag]))
                      if np.any(measured["anemic"] == flag) else None
                      for label, flag in (("anemic", 1), ("not_anemic", 0))},
                  "brightness_range": [float(measured["brightness"].min()), float(measured["brightness"].max())],
                  "clipped_fraction_max": float(measured["clipped_fraction"].max())}
        out = cmd.out or default_out(cmd.workdir)
        record = {"mode": mode, "split": cmd.split, "runs": [str(r.workdir) for r in restored],
                  "steps": [r.step for r in restored], "checkpoint": cmd.checkpoint, "mask_threshold": cmd.threshold,
                  "tta": [t.name for t in transforms] if transforms else None, "prune_level": cmd.prune_level,
                  "settings": settings, "report": report, "command": shlex.join(["python", "-m",
                                                                                "anemia_jax.calibrate_quality",
                                                                                *argv[1:]]),
                  "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        quality.save_thresholds(out, thresholds, record)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        if cli.exit_status(e) is None and isinstance(e, (FileNotFoundError, ValueError)):
            wrapped = cli.CommandLineError(str(e))
            wrapped.__cause__, e = e, wrapped
        return cmd.fail(e)
    r = report
    print(f"Quality thresholds for {target!r} ({mode}, split {cmd.split!r}, {r['n']} photos: {r['n_good']} good at "
          f"Dice >= {r['good_dice']}, {r['n_bad']} poor): min_area_fraction {thresholds.min_area_fraction:.4f}, "
          f"max_uncertainty {thresholds.max_uncertainty:.4f} bits. Rejected: {r['good_rejected']:.1%} of good, "
          f"{r['bad_rejected']:.1%} of poor photos; ROC AUC of the uncertainty for poor vs good "
          f"{r['auc_uncertainty_bad_vs_good']:.3f}; usable {r['usable']} of {r['n']}; sent to retake: "
          + ", ".join(f"{share:.1%} of {label.replace('_', '-')} subjects"
                      for label, share in r["retake_share_by_anemia"].items() if share is not None)
          + f".\nWrote {out}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
