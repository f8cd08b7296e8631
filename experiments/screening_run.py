"""Anemia screening from conjunctival colour with ground-truth vs predicted masks: what segmentation errors cost.

    # A K-fold set (the folder of fold workdirs that experiments/protocols.py made for one model):
    python -m experiments.screening_run --runs=/tmp/folds/unet --out=experiments/results/x [--target=palpebral] \
        [--constancy=none,grey_world,white_patch] [--artifact_constancy=grey_world] [--bootstrap=2000]
    # A single run (its validation part only, split again into patient-level folds for the regressors):
    python -m experiments.screening_run --runs=runs/unet --out=...
    # Also the fold ensemble vs each single fold on a data set none of the folds trained on:
    python -m experiments.screening_run --runs=/tmp/folds/unet ... --heldout_data=res256_heldout \
        [--heldout_split=train] [--heldout_constancy=none,grey_world]

For every photo that a segmentation model did NOT train on -- the validation fold of each K-fold run (or the left-out
country of a leave-one-country-out run) -- the run's model predicts the ``--target`` mask (default palpebral, the region
the anemia literature reads colour from) at its training resolution (`anemia_jax.screening.fit.out_of_fold`); the
photo and the probabilities become colour features by the screening model's feature spec
(`anemia_jax.screening.features.FeatureSpec`: resized to ``--feature_size``, default the training resolution, the
map thresholded at 0.5). Colour features (`anemia_jax.screening.colour`: CIELAB means,
a*/L*, mean RGB and chromaticities, erythema index, high hue ratio) are computed inside the ground-truth mask and inside
the predicted mask of the same photo, each with every ``--constancy`` option (none, grey-world, white patch: see
`anemia_jax.screening.colour`), and `anemia_jax.screening.cross_validation.screening_table` cross-validates Hgb
regression (ridge) and anemia detection (logistic regression; Youden and screening thresholds chosen on training parts)
from each feature set on the same patient-level folds, with the clinical statistics of
`anemia_jax.screening.clinical_stats` (Bland-Altman bias and limits of agreement, MAE, RMSE, r, AUC with
patient-bootstrap 95% intervals; sensitivity/specificity at the threshold reaching ``--target_sensitivity`` on the
training folds, with Wilson intervals):

* a K-fold set: the segmentation folds themselves (fold k's regressors train on the other folds' photos, whose
  predicted masks come from the other folds' models), so no photo's mask, features or label leaks into its own
  prediction;
* a single run: `cross_validation.grouped_folds` over the patients of its validation part.

Photos whose mask is missing or empty (or whose colour constancy finds no reference pixels) under any source are
excluded from every row and counted; a source with usable features for fewer than half of the photos is left out
of the table with a warning (and listed in the record's ``dropped_sources``) rather than emptying every row. The
checkpoint defaults to 'latest': in K-fold runs 'best' was chosen on the very fold it would be scored on.

Beside ``<out>/<name>.md`` / ``.json`` it writes ``<name>_{bland_altman,roc,calibration,hgb_scatter}.png`` (needs
matplotlib: ``pip install 'anemia_jax[report]'``; skipped with a warning without it) and ``<name>_model.json``: the
screening model (`anemia_jax.screening.screening_model`) fitted on ALL the out-of-fold features of the predicted masks
with ``--artifact_constancy``, on the same folds (which also give its CV+ prediction intervals and its recorded
out-of-fold metrics), for ``predict --screening=...``: exactly what ``python -m anemia_jax.fit_screening`` writes
(`anemia_jax.screening.fit.fit`), this script adding the comparison tables around it.

Ensemble vs single fold (``--heldout_data``): out-of-fold photos have no ensemble (every other fold trained on
them), so the comparison runs on photos none of the runs trained on: every photo of ``--heldout_split`` of the
runs' data set under builder config ``--heldout_data`` (checked: no run may have trained on it). Each fold model
alone and the fold ensemble (mean probability, as ``predict`` with every fold) segment them; the second table has
a row per mask source (ground truth, each fold, the ensemble) and ``--heldout_constancy`` option, its regressors
cross-validated on 5 patient-level folds of those photos (`experiments.screening_heldout`), with plots
``<name>_heldout_*.png`` (ground truth, the first fold and the ensemble). Then the SAVED screening model (fitted
above on the training set) screens those photos from each fold's and the ensemble's masks, its features computed as
``predict`` computes them: an external check of its Hgb estimates, anemia calls and interval coverage.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from anemia_jax import cli
from anemia_jax.screening import colour, cross_validation, fit, plots, screening_model
from anemia_jax.screening.features import FeatureSpec
from experiments import provenance, screening_heldout


def _size(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def masks_of(oof: fit.OutOfFold, spec: FeatureSpec) -> dict[str, Any]:
    """The table's view of the out-of-fold photos: [N] ``patient_id``, ``hgb``, ``anemic``, ``run``, ``has_mask``,
    [N, H, W, 3] ``images``, [N, H, W] bool ``truth`` and ``pred`` (the runs' masks as ``spec`` makes them) at the
    feature size, ``feature_size`` and ``checkpoints``."""
    return {"patient_id": oof.patient_id, "hgb": oof.hgb, "anemic": oof.anemic, "run": oof.run,
            "has_mask": oof.has_mask, "images": oof.photos, "truth": oof.truth,
            "pred": np.stack(spec.masks(oof.probabilities)), "feature_size": oof.feature_size,
            "checkpoints": oof.steps}


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def source_name(masks: str, constancy: str) -> str:
    """Row label of a feature source, e.g. 'predicted mask' or 'predicted mask, grey-world'."""
    return masks if constancy == "none" else f"{masks}, {constancy.replace('_', '-')}"


def predicted_sources(masks: dict[str, Any]) -> dict[str, np.ndarray]:
    """The predicted-mask sources of the table, ``{label: [N, H, W] bool}``: out-of-fold masks (one per photo, from
    the fold that did not train on it), or on held-out photos each fold's masks and the fold ensemble's."""
    if "members" in masks:
        return screening_heldout.predicted_sources(masks)
    return {"predicted mask": masks["pred"]}


def run_screening(masks: dict[str, Any], spec: FeatureSpec, *, seed: int = 0, constancies: Sequence[str] = ("none",),
                  predicted: dict[str, np.ndarray] | None = None, target_sensitivity: float = 0.9,
                  num_bootstrap: int = 2000) -> tuple[list[dict], dict[str, Any], dict[str, Any]]:
    """`cross_validation.screening_table` rows for ground-truth and predicted masks under each colour constancy
    (features computed by ``spec`` with that constancy: `FeatureSpec.compute_from_masks`).

    Returns:
        rows, segmentation context, and ``{'features': {label: ColourFeatures}, 'folds': [...]}`` for the artifact.
    """
    has = masks["has_mask"]
    truth = np.where(has[:, None, None], masks["truth"], False)  # a missing mask is empty: NaN features, excluded
    predicted = predicted_sources(masks) if predicted is None else predicted
    features = {source_name(name, c): dataclasses.replace(spec, constancy=c).compute_from_masks(masks["images"], m)
                for name, m in {"ground-truth mask": truth, **predicted}.items() for c in constancies}
    # Rows share their photos (common_examples), so one source missing most photos (e.g. a mask covering the whole
    # frame leaves colour constancy no reference pixels) would empty every row: such a source is dropped instead.
    dropped = {name: f"usable features for {int(f.valid.sum())} of {len(f.valid)} photos "
                     f"({int((f.num_pixels == 0).sum())} empty masks)"
               for name, f in features.items() if f.valid.sum() < 0.5 * len(f.valid)}
    for name, why in dropped.items():
        print(f"WARNING: source {name!r} left out of the table: {why}.")
    table_features = {k: v for k, v in features.items() if k not in dropped}
    folds = fit.folds_of(masks["run"], masks["patient_id"], seed=seed)
    rows = cross_validation.screening_table(table_features, hgb=masks["hgb"], anemic=masks["anemic"], folds=folds,
                                            groups=masks["patient_id"], seed=seed, target_sensitivity=target_sensitivity,
                                            num_bootstrap=num_bootstrap)
    context = {"num_photos": int(len(has)), "num_missing_mask": int((~has).sum()),
               "num_folds": len(folds), "feature_names": list(colour.FEATURE_NAMES),
               "constancies": list(constancies), "target_sensitivity": target_sensitivity,
               "num_bootstrap": num_bootstrap, "dropped_sources": dropped}
    for name, m in predicted.items():
        dice = [_dice(p, t) for p, t, h in zip(m, truth, has) if h]
        context[name] = {"num_empty": int(sum(not p.any() for p in m)),
                         "dice_mean": float(np.mean(dice)) if dice else float("nan"),
                         "dice_std": float(np.std(dice)) if dice else float("nan")}
    return rows, context, {"features": features, "folds": folds}


def _row_record(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("regression", "detection", "agreement", "screening")}
    out["agreement"] = dataclasses.asdict(row["agreement"])
    out["screening"] = dataclasses.asdict(row["screening"])
    out["screening_thresholds"] = row["detection"].screening_thresholds
    out["youden_thresholds"] = row["detection"].thresholds
    return out


def heldout_section(args, run_dirs, model, constancies: Sequence[str], out: pathlib.Path
                    ) -> tuple[str, dict[str, Any]]:
    """The ensemble-vs-single-fold table, its plots and the saved model's external check (module docstring)."""
    spec = dataclasses.replace(model.feature_spec, constancy="none")  # the model's size, mask and threshold
    masks = screening_heldout.heldout_masks(run_dirs, spec, builder_config=args.heldout_data,
                                            tfds_split=args.heldout_split, checkpoint=args.checkpoint)
    predicted = predicted_sources(masks)
    rows, context, _ = run_screening(masks, spec, seed=args.seed, constancies=constancies, predicted=predicted,
                                     target_sensitivity=args.target_sensitivity, num_bootstrap=args.bootstrap)
    shown = {"ground-truth mask", next(iter(predicted)), f"{screening_heldout.ENSEMBLE} mask"}
    figures = _write_plots([r for r in rows if r["source"].split(",")[0] in shown], masks, out,
                           f"{args.name}_heldout", args.bootstrap)
    check = screening_heldout.artifact_check(model, masks, num_bootstrap=args.bootstrap, seed=args.seed)
    d = masks["data"]
    seg = "; ".join(f"{k}: {v['dice_mean']:.4f} ± {v['dice_std']:.4f}" for k, v in context.items()
                    if isinstance(v, dict) and "dice_mean" in v)
    h, w = masks["feature_size"]
    body = (f"\n## Fold ensemble vs single folds, on held-out photos\n\n{d['num_photos']} photos of "
            f"`{d['builder']}/{d['builder_config']}` split '{d['split']}', which none of the {len(run_dirs)} runs "
            f"trained on (checkpoints {masks['checkpoints']}); the ensemble averages the {len(run_dirs)} folds' "
            f"probabilities. Dice of the {args.target} masks at {h}x{w}: {seg}. Regressors cross-validated on "
            f"{context['num_folds']} patient-level folds of these photos; the same statistics as above.\n\n"
            + cross_validation.format_markdown(rows)
            + f"\nThe saved screening model `{model_path_name(args)}` (fitted above on the training set's "
            f"out-of-fold features; colour constancy '{model.constancy}') on these photos, its features computed "
            f"as `predict --screening` computes them from each source's probabilities: an external check.\n\n"
            + screening_heldout.format_artifact_check(check, model.coverage)
            + "".join(f"\n![{f}]({f})" for f in figures) + "\n")
    data = {"rows": [_row_record(r) for r in rows], "context": context, "data": d,
            "checkpoints": masks["checkpoints"], "artifact_check": screening_heldout.record_rows(check),
            "figures": figures}
    return body, data


def model_path_name(args) -> str:
    """File name of the screening model the script writes."""
    return f"{args.name}_model.json"


def _write_plots(rows, masks, out: pathlib.Path, name: str, num_bootstrap: int) -> list[str]:
    try:
        paths = plots.screening_plots(rows, hgb=masks["hgb"], anemic=masks["anemic"], out_dir=out, name=name,
                                      groups=masks["patient_id"], num_bootstrap=num_bootstrap)
    except ImportError as e:  # the tables and the model are written regardless
        print(f"WARNING: no plots: {e}")
        return []
    return [p.name for p in paths.values()]


def held_out_coverage(features: colour.ColourFeatures, masks: dict[str, Any], folds, spec: FeatureSpec, *,
                      coverage: float, seed: int) -> dict[str, float]:
    """Checks the screening model's prediction intervals on photos it did not see: for each outer fold k, a model
    fitted (with its own inner CV+ folds) on the other folds predicts fold k; returns the pooled coverage and the
    median interval width."""
    hgb, groups = np.asarray(masks["hgb"], np.float64), np.asarray(masks["patient_id"]).astype(str)
    hits, widths = [], []
    for train, test in folds:
        sub = colour.ColourFeatures(features.values[train], features.names, features.num_pixels[train],
                                    features.constancy)
        model = screening_model.fit_screening_model(
            sub, hgb=hgb[train], anemic=masks["anemic"][train], groups=groups[train],
            folds=cross_validation.grouped_folds(groups[train], len(folds), seed=seed), coverage=coverage, seed=seed,
            num_bootstrap=0, feature_spec=spec)
        pred = model.predict(features.values[test])
        known = np.isfinite(pred.hgb) & np.isfinite(hgb[test])
        hits.append((hgb[test] >= pred.hgb_lo) & (hgb[test] <= pred.hgb_hi))
        hits[-1], widths = hits[-1][known], widths + list((pred.hgb_hi - pred.hgb_lo)[known])
    hits = np.concatenate(hits)
    return {"coverage_nominal": coverage, "coverage_held_out": float(hits.mean()) if hits.size else float("nan"),
            "n": int(hits.size), "median_width": float(np.median(widths)) if widths else float("nan")}


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.screening_run", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("runs", None, "A run workdir, or a folder of fold workdirs (one K-fold set).", flag_values=fv)
    flags.mark_flag_as_required("runs", flag_values=fv)
    flags.DEFINE_string("target", "palpebral", "Mask the colour is read from.", flag_values=fv)
    flags.DEFINE_string("checkpoint", "latest", "'latest' (default), 'best' or a step.", flag_values=fv)
    flags.DEFINE_string("feature_size", "", "H,W at which colour is read (default: training size).", flag_values=fv)
    flags.DEFINE_list("constancy", ["none", "grey_world", "white_patch"],
                      f"Colour constancy options of the table, of {colour.CONSTANCY_METHODS}.", flag_values=fv)
    flags.DEFINE_string("artifact_constancy", "grey_world", "Colour constancy of the saved screening model (the "
                        "default of fit_screening).",
                        flag_values=fv)
    flags.DEFINE_float("coverage", 0.9, "Coverage of the model's Hgb prediction intervals.", flag_values=fv)
    flags.DEFINE_float("target_sensitivity", 0.9, "Sensitivity the screening threshold must reach on the training "
                       "folds.", flag_values=fv)
    flags.DEFINE_integer("bootstrap", 2000, "Patient-bootstrap replicates of the intervals.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Inner-fold shuffling of the regressors, bootstrap seed.", flag_values=fv)
    flags.DEFINE_string("out", None, "Folder for <name>.md, .json, the plots and the model.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("name", "screening", "Result file name.", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    flags.DEFINE_string("heldout_data", "", "Builder config of the runs' data set that none of them trained on "
                        "(e.g. res256_heldout): adds the fold ensemble vs single fold table.", flag_values=fv)
    flags.DEFINE_string("heldout_split", "train", "TFDS split of --heldout_data.", flag_values=fv)
    flags.DEFINE_list("heldout_constancy", ["none", "grey_world"], "Colour constancy options of the held-out table.",
                      flag_values=fv)
    return cmd


def main(argv: Sequence[str]) -> int:
    start = time.time()
    args = _command()
    try:
        if args.parse(argv) is None:
            return 0  # --help
        constancies = list(args.constancy)
        for c in {*constancies, args.artifact_constancy, *args.heldout_constancy}:
            if c not in colour.CONSTANCY_METHODS:
                raise cli.CommandLineError(f"unknown colour constancy {c!r}; choose from {colour.CONSTANCY_METHODS}.")
    except cli.CommandLineError as e:
        print(f"screening_run: {e}", file=sys.stderr)
        return cli.EXIT_CONFIG
    cli.setup_logging()
    if args.artifact_constancy not in constancies:
        constancies.append(args.artifact_constancy)
    run_dirs = fit.find_runs(args.runs)
    oof = fit.out_of_fold(run_dirs, target=args.target, checkpoint=args.checkpoint,
                          feature_size=_size(args.feature_size))
    spec = FeatureSpec(feature_size=oof.feature_size, target=args.target)  # the table's; constancy set per row
    masks = masks_of(oof, spec)
    predicted = predicted_sources(masks)
    rows, context, fit_inputs = run_screening(masks, spec, seed=args.seed, constancies=constancies,
                                              predicted=predicted, target_sensitivity=args.target_sensitivity,
                                              num_bootstrap=args.bootstrap)
    prov = provenance.record(argv[1:], time.time() - start, "-m experiments.screening_run")
    out = pathlib.Path(args.out)
    h, w = masks["feature_size"]
    model_source = source_name(next(iter(predicted)), args.artifact_constancy)
    # The saved model is fitted as `python -m anemia_jax.fit_screening` fits it (the same features as its table row).
    model_spec = dataclasses.replace(spec, constancy=args.artifact_constancy)
    model, _, _ = fit.fit(oof, model_spec, coverage=args.coverage, target_sensitivity=args.target_sensitivity,
                          seed=args.seed, num_bootstrap=args.bootstrap, checkpoint=args.checkpoint,
                          command=prov["command"])
    model_path = model.save(out / model_path_name(args))
    context["model_interval_check"] = check = held_out_coverage(
        fit_inputs["features"][model_source], masks, fit_inputs["folds"], model_spec, coverage=args.coverage,
        seed=args.seed)
    figures = _write_plots(rows, masks, out, args.name, args.bootstrap)
    seg = "; ".join(f"{k}: Dice {v['dice_mean']:.4f} ± {v['dice_std']:.4f}, {v['num_empty']} empty"
                    for k, v in context.items() if isinstance(v, dict) and "dice_mean" in v)
    half = model.metrics["hgb"]["conformal_half_width"]  # None: too few photos for a finite interval
    half = "unbounded: too few photos" if half is None else f"typical half-width {half:.2f} g/dL"
    body = (f"Colour of the **{args.target}** mask, read at {h}x{w} from {context['num_photos']} photos that the "
            f"segmentation models did not train on ({len(run_dirs)} run(s): {', '.join(d.name for d in run_dirs)}; "
            f"checkpoint '{args.checkpoint}', steps {masks['checkpoints']}). Segmentation of the predicted masks on "
            f"them (images with a reference mask): {seg}. Hgb: ridge regression, anemia: logistic regression, both "
            f"on all {len(colour.FEATURE_NAMES)} colour features, {context['num_folds']} patient-level folds; colour "
            f"constancy: {', '.join(constancies)}. Intervals: 95%, patient-level bootstrap ({args.bootstrap} "
            f"replicates) except sensitivity/specificity at the screening threshold (Wilson); the screening "
            f"threshold is the highest reaching sensitivity {args.target_sensitivity:g} on each training part's "
            f"inner out-of-fold probabilities.\n\n" + cross_validation.format_markdown(rows) +
            f"\nScreening model `{model_path.name}` (`anemia_jax.screening.screening_model`): fitted on all "
            f"{model.training['n_hgb']} photos of **{model_source}**; ridge alpha {model.alpha:g}, logistic l2 "
            f"{model.l2:g}, threshold p >= {model.threshold:.3f}; {model.coverage:.0%} CV+ prediction intervals "
            f"({half}). Its out-of-fold metrics are the '{model_source}' row above. Held-out check of the intervals: "
            f"models fitted the same way without fold k covered {check['coverage_held_out']:.1%} of fold k's "
            f"measured Hgb (nominal {args.coverage:.0%}; {check['n']} photos pooled over the folds; median width "
            f"{check['median_width']:.2f} g/dL).\n" + "".join(f"\n![{f}]({f})" for f in figures) + "\n")
    data = {"rows": [_row_record(r) for r in rows], "context": context, "runs": [str(d) for d in run_dirs],
            "target": args.target, "model": model_path.name, "figures": figures}
    if args.heldout_data:
        section, data["heldout"] = heldout_section(args, run_dirs, model, list(args.heldout_constancy), out)
        body += section
        prov["wall_time_s"] = round(time.time() - start, 1)
    path = provenance.write_results(out, args.name, "Anemia screening: ground-truth vs predicted masks", body,
                                    data, prov, args.note)
    print(body)
    print(f"Wrote {path}, {model_path} and {len(figures)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
