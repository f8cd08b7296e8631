"""Scores a trained run (or an ensemble of runs) on one of its splits: per-image CSV and summaries.

    python -m anemia_jax.evaluate --workdir=RUN [--workdir=RUN2 ...] [--split=val|test|train]
        [--checkpoint=auto|latest|best|STEP] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--prune_level=K]
        [--threshold=0.5] [--no_distances] [--out=DIR] [--allow_training_overlap] [--config.<key>=<value> ...]

The split is cut exactly as training cut it (`anemia_jax.data.loading.eval_split`); the images are scored by the
same `anemia_jax.evaluation.evaluator.Evaluator` the trainer uses, at the run's training resolution: Dice, IoU,
precision, recall (`anemia_jax.metrics`, with their empty-mask conventions) and the boundary distances HD95 and ASSD in
its pixels. Several ``--workdir`` form an ensemble (their probabilities averaged); ``--config.<key>=<value>`` changes
the runs' recorded configs (e.g. ``--config.dataset.data_dir=...`` when the prepared data moved).

Ensembles vs single runs: with several ``--workdir`` the ensemble AND each run alone are scored on the same images
(``members`` in summary.json, a table in summary.md with the mean of the members and the ensemble's gain over it).
Score them on images that NONE of the runs trained on: in a K-fold cross-validation every fold's validation part is
training data of the other K-1 folds, so the ensemble of the K folds has no held-out image in the training set.
Use a test split (the left-out country of leave-one-country-out runs, Kvasir-SEG's test split) or another data set,
e.g. for phantom runs the phantom patients of another seed: ``--config.dataset.builder_config=res256_heldout
--config.dataset.test_split=train --split=test``. The command refuses an ensemble some of whose runs trained on
scored images (``training_overlap`` in summary.json counts them per run, from each run's recorded config) unless
``--allow_training_overlap`` is given.

Probability calibration: with a temperature file (``--temperature``; default the ``temperature.json`` that
``calibrate_quality`` writes beside the runs; 'none' to skip) the scores are those of the calibrated probabilities, as
``predict`` computes them, and the report gives the pixels' reliability (equal-width bins: observed frequency against
mean probability) and expected calibration error before and after; without one, before only.

Outputs, in ``--out`` (default ``<workdir>/eval/<split>_step<step>[_tta][_L<k>][_ensemble<M>]``): ``per_image.csv``,
``summary.json``, ``summary.md`` (`anemia_jax.evaluation.eval_report`), and ``reliability.png`` (the reliability
diagram; with matplotlib installed).

Failures end with a one-paragraph message and no traceback unless ``--verbose``. Exit status:

| status | meaning |
|---:|---|
| 0 | scores written |
| 2 | bad arguments, run directory, split or ensemble (e.g. one scored on its own runs' training images) |
| 3 | the run's data are missing or unusable, or were prepared from another source |
| 4 | no usable checkpoint: ``--checkpoint=STEP`` damaged or absent, every checkpoint damaged, or one written by a different model configuration (``latest``/``best``/``auto`` fall back to the newest intact one with a warning) |
| 5 | ``--out`` cannot be written (a file, read-only, full disk) |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from anemia_jax import cli


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.evaluate", __doc__)
    cmd.run_flags(verb="evaluate", checkpoint_default="auto", temperature=True,
                  checkpoint_help="'auto' (default): 'latest' on --split=val, where 'best' was selected and would "
                                  "score optimistically (K-fold: the same fold), 'best' on test/train; or 'best' "
                                  "(validation mean Dice), 'latest' or a step number.")
    flags.DEFINE_enum("split", "val", ["val", "test", "train"], "Split of the run to score.", flag_values=cmd.flags)
    flags.DEFINE_bool("no_distances", False, "Skip HD95/ASSD (faster on large sets).", flag_values=cmd.flags)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the predicted masks.", flag_values=cmd.flags)
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/eval/<split>_step<N>...).",
                        flag_values=cmd.flags)
    flags.DEFINE_bool("allow_training_overlap", False, "Score an ensemble even on images some of its runs trained "
                      "on (the scores are then optimistic).", flag_values=cmd.flags)
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``) and returns the exit status."""
    cmd = _command()
    if (status := cmd.start_runs(sys.argv if argv is None else argv)) is not None:
        return status
    import jax  # noqa: PLC0415 -- after the flags: --help and flag errors stay fast

    from anemia_jax.data import loading
    from anemia_jax.evaluation import eval_report, finished_runs  # noqa: PLC0415
    from anemia_jax.inference import probabilities, temperature
    from anemia_jax.runs import restore

    try:
        transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
        restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint, split=cmd.split, configs=cmd.run_configs())
        builder, tfds_split, indices = loading.eval_split(restored[0].config, cmd.split)
        overlap = finished_runs.training_overlap(restored, builder, tfds_split, indices)
        if len(restored) > 1 and any(overlap) and not cmd.allow_training_overlap:
            trained = ", ".join(f"{r.workdir} trained on {n}" for r, n in zip(restored, overlap) if n)
            raise ValueError(f"Of the {len(indices)} images of split {cmd.split!r}, {trained}: the ensemble would "
                             "be scored on its own training data. Score it on a split none of its runs trained on "
                             "(see --help: a test split or another data set via --config.dataset.*), or pass "
                             "--allow_training_overlap.")
        scale, scale_source = temperature.for_runs(cmd.workdir, cmd.temperature, restored[0].targets)
        result = finished_runs.evaluate_runs(restored, split=cmd.split, transforms=transforms, prune_level=cmd.prune_level,
                                         distances=not cmd.no_distances, threshold=cmd.threshold, builder=builder,
                                         members=len(restored) > 1, temperature=scale,
                                         temperature_source=scale_source)
        if jax.process_index() == 0:
            out = cmd.out or eval_report.default_out_dir(restored[0], cmd.split, tta=cmd.tta,
                                                         prune_level=cmd.prune_level, ensemble=len(restored))
            out = eval_report.write_outputs(out, result.per_image, result.summary, restored[0].targets)
            print(eval_report.format_markdown(result.summary))
            print(f"Wrote {out}/per_image.csv, summary.json and summary.md")
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
