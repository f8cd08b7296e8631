"""Fits the screening model (Hgb estimate, anemia call) on the photos that segmentation runs did not train on.

    python -m anemia_jax.fit_screening --runs=CV --out=screening_model.json [--target=palpebral] [--feature_size=H,W]
        [--constancy=grey_world] [--mask_threshold=0.5] [--coverage=0.9] [--target_sensitivity=0.9] [--bootstrap=2000]
        [--seed=0] [--checkpoint=latest]

``--runs`` is one K-fold set (a folder of fold run directories, as ``experiments/protocols.py`` makes them) or a single
run. Every photo a fold did not train on is segmented by that fold, its colour read inside the predicted ``--target``
mask as the model's feature spec says (`anemia_jax.screening.features.FeatureSpec`: the photo and the probability
map resized to ``--feature_size``, default the runs' resolution; the map thresholded at ``--mask_threshold``; colour
constancy ``--constancy``, grey-world by default: it removes most of a camera's or lamp's colour cast), and the
screening model fitted on those out-of-fold features (`anemia_jax.screening.fit`): ridge regression of Hgb with a
``--coverage`` CV+ prediction interval, a logistic anemia classifier whose threshold reaches ``--target_sensitivity``
on the training folds, and the range of photos it can speak for (`anemia_jax.screening.colour_domain`: brightness,
the light's colour, the colour features). The file records its feature spec (so ``predict`` and the page compute
features exactly so), what it was fitted on (data set, synthetic or real photos, split protocol, photos, subjects,
runs, checkpoints), the command, the commit and the date, and its out-of-fold metrics; every output of ``predict``
and the page shows where it came from (a model fitted on the phantom is labelled PHANTOM).
Then ``python -m anemia_jax.predict ... --screening=screening_model.json``.

Exit status: 0 written; 2 bad arguments or runs; 3 the runs' data are missing or unusable; 4 no usable checkpoint;
5 the file cannot be written.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from absl import flags

from anemia_jax import cli

__all__ = ["main"]


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.fit_screening", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("runs", None, "A run directory, or a folder of the fold run directories of one K-fold set.",
                        flag_values=fv)
    flags.mark_flag_as_required("runs", flag_values=fv)
    flags.DEFINE_string("out", None, "The screening model file to write (JSON).", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("target", "palpebral", "The mask the colour is read from.", flag_values=fv)
    flags.DEFINE_string("feature_size", "", "H,W at which colour is read (default: the runs' resolution).",
                        flag_values=fv)
    flags.DEFINE_string("constancy", "grey_world", "Colour constancy: grey_world (default: it removes most of a "
                        "colour cast), white_patch or none.", flag_values=fv)
    flags.DEFINE_float("mask_threshold", 0.5, "A pixel is in the mask where the probability exceeds this.",
                       flag_values=fv)
    flags.DEFINE_float("coverage", 0.9, "Coverage of the Hgb prediction interval.", flag_values=fv)
    flags.DEFINE_float("target_sensitivity", 0.9, "Sensitivity the anemia threshold must reach on the training "
                       "folds.", flag_values=fv)
    flags.DEFINE_integer("bootstrap", 2000, "Patient-bootstrap replicates of the recorded metrics' intervals.",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Inner-fold shuffling and bootstrap seed.", flag_values=fv)
    flags.DEFINE_string("checkpoint", "latest", "'latest' (default: in K-fold runs 'best' was chosen on the fold "
                        "scored here), 'best' or a step.", flag_values=fv)
    return cmd


def _size(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) < 1:
        raise cli.CommandLineError(f"--feature_size={text!r} must be H,W (or one number for a square), e.g. 256,192.")
    return (parts[0], parts[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``) and returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    cmd = _command()
    try:
        rest = cmd.parse(argv)
        if rest is None:
            return cli.EXIT_OK  # --help
        if rest:
            raise cli.CommandLineError(f"Unexpected arguments: {' '.join(rest)}")
        size = _size(cmd.feature_size)
        if not 0.0 < cmd.coverage < 1.0 or not 0.0 < cmd.target_sensitivity <= 1.0:
            raise cli.CommandLineError("--coverage must lie in (0, 1) and --target_sensitivity in (0, 1].")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    from anemia_jax.screening import fit  # noqa: PLC0415 -- JAX loads only once the command line looks right
    from anemia_jax.screening.features import FeatureSpec

    try:
        run_dirs = fit.find_runs(cmd.runs)
        oof = fit.out_of_fold(run_dirs, target=cmd.target, checkpoint=cmd.checkpoint, feature_size=size)
        spec = FeatureSpec(feature_size=oof.feature_size, target=cmd.target, mask_threshold=cmd.mask_threshold,
                           constancy=cmd.constancy)
        model, features, folds = fit.fit(oof, spec, coverage=cmd.coverage, target_sensitivity=cmd.target_sensitivity,
                                         seed=cmd.seed, num_bootstrap=cmd.bootstrap, checkpoint=cmd.checkpoint,
                                         command=shlex.join(["python", "-m", "anemia_jax.fit_screening", *argv[1:]]))
        path = model.save(cmd.out)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)
    hgb, anemia = model.metrics["hgb"], model.metrics["anemia"]
    data = model.training["data"]
    kind = {True: "synthetic (phantom) photos", False: "real photos"}.get(data.get("synthetic_photos"), "photos")
    print(f"Screening model fitted on {model.training['num_photos']} {kind} of {model.training['num_subjects']} "
          f"subjects ({data['dataset']['name']}, {len(folds)} folds; {int(features.valid.sum())} with colour "
          f"features): out-of-fold Hgb MAE {hgb['mae']:.2f} g/dL, anemia ROC AUC "
          f"{anemia['auc'] if anemia['auc'] is not None else float('nan'):.3f}, threshold p >= "
          f"{model.threshold:.3f}.\nWrote {path}")
    for warning in (*hgb.get("warnings", []), *anemia.get("warnings", [])):
        print(f"Warning: {warning}.")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
