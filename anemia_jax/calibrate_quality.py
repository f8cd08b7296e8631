"""Calibrates the segmentation for screening on validation data: the probabilities' temperature (``temperature.json``)
and the quality verdict's thresholds (``quality.json``), written beside the runs.

    # K-fold runs, each on its own validation fold (thresholds for predicting with ONE run):
    python -m anemia_jax.calibrate_quality --workdir=cv/unet/fold_0 ... --workdir=cv/unet/fold_4 [--split=val]
    # The ensemble of the runs, on images none of them trained on (thresholds for predicting with the ENSEMBLE):
    python -m anemia_jax.calibrate_quality --workdir=... --workdir=... --split=test [--config.dataset.<key>=...]
        [--checkpoint=auto] [--tta ...] [--threshold=0.5] [--out=PATH] [--verbose]

Every photo of the split is segmented (`anemia_jax.inference.segmenter.Segmenter`) at the runs' resolution. First
the temperature of each target is fitted on its pixels (`anemia_jax.inference.temperature`: each member's logits
divided by it, minimising the cross-entropy against the reference masks) and the expected calibration error of the
probabilities reported before and after (``--no_temperature`` skips it); every later step, and ``predict``, the page,
``evaluate`` and ``export``, which find ``temperature.json`` beside the runs, use the calibrated probabilities. Each
photo is then measured
(`anemia_jax.screening.quality.measure`: the quality target's predicted area and mean uncertainty) and its predicted
mask compared with the reference (Dice; photos without a reference mask are left out). `anemia_jax.screening.quality.
choose_thresholds` then picks ``min_area_fraction`` and ``max_uncertainty`` so that each keeps the share
``--keep_good`` of the photos whose segmentation is good (Dice >= ``--good_dice``), and
reports what the rule catches among the poor ones. Fairness: a verdict that rejects pale conjunctivas more often hides
the patients the screen is for, so when the rule sends anemic subjects' photos to retake more often than non-anemic
subjects' (by more than ``--fairness_margin``, default 0) both thresholds are relaxed together until it does not
(`anemia_jax.screening.quality.choose_thresholds`); the report gives the retake shares by anemia status and by Hb band
before and after (``--fairness_margin=-1`` turns the constraint off). The exposure thresholds
(brightness, washed-out pixels) are physical limits (``--min_brightness``, ``--max_clipped_fraction``, defaults
`quality.DEFAULTS`), written unchanged; the report counts the photos they flag.

Which uncertainty the thresholds fit matters, since an ensemble is more uncertain where its members disagree:

* ``--split=val`` (default): each run alone on its own validation split (out-of-fold for K-fold runs), pooled:
  ``mode: per_run``, for predicting with one of these runs.
* any other split: the ensemble of all the runs (mean probability) on that split, which none of them may have
  trained on (checked from each run's recorded config, as ``evaluate`` does): ``mode: ensemble``, for predicting
  with exactly these runs together. For K-fold runs use another data set, e.g. on the phantom
  ``--config.dataset.builder_config=res256_heldout --config.dataset.test_split=train --split=test``.

Writes ``--out`` (default: ``quality.json`` in the run's directory, or in the folder holding all the runs), which
``predict`` (and the app) find there: the thresholds, the mode, split, runs and checkpoint steps, the calibration,
the command and the report; and ``temperature.json`` beside it. The verdict's settings are this command's flags, not part of the runs' training config.

Exit status: 0 written; 2 bad arguments, runs or split (or an ensemble scored on its runs' training images);
3-5 as for ``evaluate``.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from collections.abc import Sequence

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
    flags.DEFINE_string("target", "", "The mask the verdict judges ('' = the runs' first target).", flag_values=fv)
    flags.DEFINE_float("good_dice", quality.CALIBRATION_DEFAULTS["good_dice"], "A photo's segmentation is 'good' at "
                       "Dice >= this.", flag_values=fv)
    flags.DEFINE_float("keep_good", quality.CALIBRATION_DEFAULTS["keep_good"], "Each chosen threshold keeps this "
                       "share of the good photos.", flag_values=fv)
    flags.DEFINE_float("min_brightness", quality.DEFAULTS.min_brightness, "Photos darker than this mean luma (0..1) "
                       "are sent to retake (a physical limit, not calibrated).", flag_values=fv)
    flags.DEFINE_float("max_clipped_fraction", quality.DEFAULTS.max_clipped_fraction, "Photos with more of the "
                       "mask washed out to white are sent to retake (a physical limit, not calibrated).",
                       flag_values=fv)
    flags.DEFINE_float("fairness_margin", quality.CALIBRATION_DEFAULTS["fairness_margin"], "How much larger the "
                       "share of anemic subjects' photos sent to retake may be than the others' (negative: no "
                       "constraint).", flag_values=fv)
    flags.DEFINE_bool("no_temperature", False, "Do not fit the probabilities' temperature (and write no "
                      "temperature.json).", flag_values=fv)
    return cmd


def default_out(workdirs: Sequence[str]) -> str:
    """``quality.json`` in the single run's directory, or in the folder holding all the runs (else the first's)."""
    if len(workdirs) == 1:
        return os.path.join(workdirs[0], quality.THRESHOLDS_FILE)
    parents = {os.path.dirname(os.path.normpath(w)) for w in workdirs}
    folder = parents.pop() if len(parents) == 1 else workdirs[0]
    return os.path.join(folder, quality.THRESHOLDS_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``) and returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    cmd = _command()
    if (status := cmd.start_runs(argv)) is not None:
        return status
    from anemia_jax.inference import probabilities, temperature  # noqa: PLC0415
    from anemia_jax.runs import restore
    from anemia_jax.screening import quality_calibration

    try:
        transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
        restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint, split=cmd.split, configs=cmd.run_configs())
        settings = {"target": cmd.target, "good_dice": cmd.good_dice, "keep_good": cmd.keep_good,
                    "fairness_margin": cmd.fairness_margin if cmd.fairness_margin >= 0 else None,
                    "min_brightness": cmd.min_brightness, "max_clipped_fraction": cmd.max_clipped_fraction}
        thresholds, record, scale = quality_calibration.calibrate(
            restored, cmd.split, settings, threshold=cmd.threshold, transforms=transforms,
            prune_level=cmd.prune_level, fit_temperature=not cmd.no_temperature)
        out = cmd.out or default_out(cmd.workdir)
        record.update(checkpoint=cmd.checkpoint,
                      command=shlex.join(["python", "-m", "anemia_jax.calibrate_quality", *argv[1:]]),
                      date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        scale_out = os.path.join(os.path.dirname(out) or ".", temperature.FILE)
        if scale is not None:
            temperature.save(scale_out, scale, restored[0].targets,
                             {k: record[k] for k in ("mode", "split", "runs", "steps", "checkpoint", "command",
                                                     "date_utc", "calibration")})
        quality.save_thresholds(out, thresholds, record)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)
    r, mode, target = record["report"], record["mode"], thresholds.target
    for t in restored[0].targets:
        c = record["calibration"][t]
        print(f"Probabilities of {t!r}: expected calibration error {c['before']['ece']:.4f} before, "
              f"{c['after']['ece']:.4f} after" + (f" (temperature {record['calibration']['temperature'][t]:.3f})"
                                                  if scale is not None else " (no temperature fitted)") + ".")
    fair = r.get("fairness")
    if fair:
        def shares(s):
            return ", ".join(f"{v:.1%} of {k.replace('_', '-')} subjects" for k, v in s.items()
                             if k in ("anemic", "not_anemic") and v is not None)
        print(f"Fairness: sent to retake before the constraint {shares(fair['before'])}; after "
              f"{shares(fair['after'])} (good photos kept {fair['keep_good_used']:.3f}, asked "
              f"{fair['keep_good_asked']:.3f}){'' if fair['met'] else ': NOT MET by relaxing the thresholds'}.")
    print(f"Quality thresholds for {target!r} ({mode}, split {cmd.split!r}, {r['n']} photos: {r['n_good']} good at "
          f"Dice >= {r['good_dice']}, {r['n_bad']} poor): min_area_fraction {thresholds.min_area_fraction:.4f}, "
          f"max_uncertainty {thresholds.max_uncertainty:.4f} bits. Rejected: {r['good_rejected']:.1%} of good, "
          f"{r['bad_rejected']:.1%} of poor photos; ROC AUC of the uncertainty for poor vs good "
          f"{r['auc_uncertainty_bad_vs_good']:.3f}; usable {r['usable']} of {r['n']}; sent to retake: "
          + ", ".join(f"{share:.1%} of {label.replace('_', '-')} subjects"
                      for label, share in r["retake_share_by_anemia"].items() if share is not None)
          + f".\nWrote {out}" + (f" and {scale_out}" if scale is not None else ""))
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
