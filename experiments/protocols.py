"""Evaluation protocols: K-fold cross-validation, leave-one-country-out, loss comparison; fold aggregation.

Runs the trainer (`anemia_jax.training.train.train_and_evaluate`, in this process) once per fold, each in its own
workdir, then aggregates the folds' ``summary.json`` files into a markdown table (mean ± std over folds per model and
target) written beside a record of the command, git commit and uncommitted paths, machine and wall time
(`experiments/provenance.py`)::

    # 5-fold patient-level CV (stratified by country x anemia); --models adds other model configs on the same folds:
    python -m experiments.protocols --mode=cv --config=configs/unet.py:data=phantom,size=64 --models=unetpp \
        --folds=5 --out=experiments/results/x [--name=cv_models]
    # Leave one country out, every country in turn (or --countries=India,Italy):
    python -m experiments.protocols --mode=loco --config=configs/unet.py:data=eyes --out=...
    # Class imbalance: the same config and folds under several losses (presets in LOSS_PRESETS):
    python -m experiments.protocols --mode=compare --config=configs/unet.py:data=phantom \
        --losses=ce_dice,focal_tversky ...
    # Re-aggregate finished fold workdirs (any mode's --workdir_root), optionally only some groups:
    python -m experiments.protocols --mode=aggregate --runs=/tmp/folds [--groups=unet,unetpp] --out=... --name=...

Run from the repository root. Flags follow the project's one grammar (`anemia_jax.cli`): ``--config`` is the
trainer's config flag and ``--config.<key>=<value>`` overrides apply to it and to every ``--models`` config (loaded
from ``configs/<model>.py`` with the same argument). Also ``--workdir_root`` (fold workdirs, default
``<out>/runs``; a workdir that already holds a completed run of the same config is reused, one with a different
config is refused) and ``--note`` (free text for the record).

Which scores are aggregated: K-fold runs have no test set, and their 'best' checkpoint is chosen on the very fold it
would be scored on, so cv/compare report the FINAL state on the validation fold (``--which=final --split=val``);
leave-one-country-out runs choose 'best' on a holdout of the training countries and are scored on the left-out
country (``--which=best --split=test``). Standard deviations are over folds (ddof=1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from anemia_jax import cli
from anemia_jax.runs import config_lib, loss_config
from anemia_jax.utils import conversions
from experiments import provenance

METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd")
_DIGITS = {"hd95": 2, "assd": 2}
LOSS_PRESETS = {
    # Cross-entropy + soft Dice, equal weights (the configs' default).
    "ce_dice": dict(name="combo", ce_weight=0.5, dice_weight=0.5),
    # Abraham & Khan 2019: false negatives weighted 0.7, exponent 0.75 (= 1/gamma_paper with gamma_paper = 4/3).
    "focal_tversky": dict(name="focal_tversky", alpha=0.3, beta=0.7, gamma=0.75),
}


# --------------------------------------------------------------------------------------------- aggregation


def _number(value: Any) -> float:
    """A summary value as a float ('NaN'/'Infinity' strings, as `conversions.jsonable` writes them, included)."""
    if value is None:
        return math.nan
    return float(value)


def scores_of(summary: Mapping[str, Any], *, which: str, split: str) -> dict[str, float]:
    """The ``<metric>/<target>`` scores of ``summary[which][split]`` (a trainer summary.json)."""
    if summary.get("status") != "completed":
        raise ValueError(f"run status is {summary.get('status')!r}, not 'completed'; rerun it to finish.")
    if which not in summary or split not in summary[which]:
        have = {w: sorted(summary[w]) for w in ("final", "best") if isinstance(summary.get(w), Mapping)}
        raise KeyError(f"summary has no {which!r}/{split!r} scores; it has {have}.")
    return {k: _number(v) for k, v in summary[which][split].items() if "/" in k}


def _targets(scores: Sequence[Mapping[str, float]]) -> list[str]:
    found: dict[str, None] = {}
    for s in scores:
        for key in s:
            name, _, target = key.partition("/")
            if name == "dice" and target != "mean":
                found[target] = None
    return list(found)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def aggregate(records: Sequence[Mapping[str, Any]], *, which: str = "final", split: str = "val",
              metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Mean ± std over runs, per group and target (pure: no files, no JAX).

    Args:
        records: one per run: ``group`` (e.g. the model), ``run`` (e.g. 'fold_0'), ``summary`` (the trainer's
            summary.json dict) and optionally ``targets`` (the config's targets: the table's row order; otherwise
            the order in which the summaries name them).
        which: 'final' or 'best' state; split: 'val' or 'test' scores.
        metrics: metric names, looked up as ``<metric>/<target>``.

    Returns:
        ``{'which', 'split', 'metrics', 'targets', 'groups': {group: {'runs': [...], 'targets': {target: {metric:
        {'mean', 'std', 'n', 'values'}}}}}, 'runs': [per-run rows]}``. Non-finite values (a metric undefined on
        every image of a run) are kept in ``values`` but left out of mean/std, and ``n`` counts the finite ones;
        std is the sample standard deviation over runs (ddof=1), NaN for fewer than two.
    """
    if not records:
        raise ValueError("No runs to aggregate.")
    per_run = [(r["group"], r["run"], scores_of(r["summary"], which=which, split=split),
                r["summary"].get("step"), r["summary"].get("wall_time_s")) for r in records]
    scored = _targets([s for _, _, s, _, _ in per_run])
    targets = list(dict.fromkeys([t for r in records for t in r.get("targets", ()) if t in scored] + scored))
    groups: dict[str, Any] = {}
    for group in dict.fromkeys(g for g, *_ in per_run):
        mine = [(run, s) for g, run, s, _, _ in per_run if g == group]
        groups[group] = {"runs": [run for run, _ in mine], "targets": {
            t: {m: _stats([s.get(f"{m}/{t}", math.nan) for _, s in mine]) for m in metrics} for t in targets}}
    rows = [{"group": g, "run": run, "step": step, "wall_time_s": wall,
             **{k: v for k, v in s.items() if k.split("/")[0] in (*metrics, "hd95_infinite", "num_images")}}
            for g, run, s, step, wall in per_run]
    return {"which": which, "split": split, "metrics": list(metrics), "targets": targets, "groups": groups,
            "runs": rows}


def _cell(stats: Mapping[str, Any], digits: int) -> str:
    if stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:.{digits}f}"
    if stats["n"] > 1:
        text += f" ± {stats['std']:.{digits}f}"
    return text + (f" ({stats['n']}/{len(stats['values'])})" if stats["n"] < len(stats["values"]) else "")


def format_table(agg: Mapping[str, Any]) -> str:
    """Markdown: the mean ± std table (one row per group and target), then every run's own scores."""
    metrics = agg["metrics"]
    names = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)", "assd": "ASSD (px)"}
    head = "| model | target | runs | " + " | ".join(names.get(m, m) for m in metrics) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(metrics)]
    for group, g in agg["groups"].items():
        for t in agg["targets"]:
            cells = [_cell(g["targets"][t][m], _DIGITS.get(m, 4)) for m in metrics]
            lines.append(f"| {group} | {t} | {len(g['runs'])} | " + " | ".join(cells) + " |")
    lines += ["", "Per run (" + f"{agg['which']} state, {agg['split']} split" + "):", "",
              "| model | run | step | target | Dice | IoU | HD95 (px) | HD95 undefined | images |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in agg["runs"]:
        for t in agg["targets"]:
            def get(key, digits, r=r, t=t):
                v = r.get(f"{key}/{t}")
                return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
            lines.append(f"| {r['group']} | {r['run']} | {r['step']} | {t} | {get('dice', 4)} | {get('iou', 4)} | "
                         f"{get('hd95', 2)} | {get('hd95_infinite', 0)} | {get('num_images', 0)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- fold runner


@dataclasses.dataclass
class Job:
    """One training run of a protocol: its group (row of the table), run label and config."""

    group: str
    run: str
    config: ml_collections.ConfigDict


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "run"


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``{dotted key: typed value}`` overrides (`cli.Command.config_overrides`) applied;
    unknown keys fail with the closest existing keys."""
    loss = {k.removeprefix("loss."): v for k, v in overrides.items()
            if k.startswith("loss.") and k.removeprefix("loss.") not in loss_config.WRAPPER_KEYS}
    rest = {k: v for k, v in overrides.items() if k.removeprefix("loss.") not in loss or not k.startswith("loss.")}
    unknown = config_lib.unknown_keys(config, list(rest))
    if unknown:
        raise ValueError("; ".join(unknown))
    c = ml_collections.ConfigDict(config.to_dict())
    c.update_from_flattened_dict(rest)
    if loss:  # the loss block changes shape with the chosen loss (`loss_config.apply_overrides`)
        loss_config.apply_overrides(c, loss)
    return c


def kfold_jobs(config: ml_collections.ConfigDict, group: str, num_folds: int) -> list[Job]:
    """One job per fold of patient-level K-fold CV (the same folds for every config: split.seed is fixed)."""
    jobs = []
    for fold in range(num_folds):
        c = ml_collections.ConfigDict(config.to_dict())
        c.split.protocol, c.split.num_folds, c.split.fold = "kfold", num_folds, fold
        jobs.append(Job(group, f"fold_{fold}", c))
    return jobs


def loco_jobs(config: ml_collections.ConfigDict, group: str, countries: Sequence[str]) -> list[Job]:
    """One job per left-out country (trained on all the others)."""
    jobs = []
    for country in countries:
        c = ml_collections.ConfigDict(config.to_dict())
        c.split.protocol, c.split.test_country = "loco", country
        jobs.append(Job(group, f"test_{country}", c))
    return jobs


def with_loss(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """``config`` with its loss replaced by `LOSS_PRESETS` ``preset`` (deep-supervision weights kept)."""
    if preset not in LOSS_PRESETS:
        raise ValueError(f"Unknown loss preset {preset!r}; presets: {', '.join(LOSS_PRESETS)}.")
    c = ml_collections.ConfigDict(config.to_dict())
    preset = dict(LOSS_PRESETS[preset])
    # A new loss block with the preset's loss at its defaults (the deep-supervision weights kept), then its values.
    loss_config.apply_overrides(c, {"name": preset.pop("name")})
    loss_config.apply_overrides(c, preset)
    return c


# Fields that do not change what a run trains: where compiled programs are cached, profiling, panels, and the
# inference-time quality thresholds that runs recorded before they left the training config.
_NOT_TRAINING = ("compilation_cache_dir", "profile_steps", "max_panels", "quality")
# Fields added to the configs after runs were recorded, whose default reproduces what those runs did.
_ADDED_LATER = {("optimizer", "encoder_lr_multiplier"): 1.0, ("optimizer", "freeze_encoder_steps"): 0,
                # The loss block shows every hyper-parameter of the chosen loss since runs recorded only some.
                ("loss", "pos_weight"): None, ("loss", "smooth"): 1.0}


def _canonical(config_dict: Mapping[str, Any]) -> str:
    """A config as comparable text, without the fields that do not change training (`_NOT_TRAINING`) and with the
    fields added later (`_ADDED_LATER`) dropped where they hold their default, so older runs stay comparable."""
    plain = json.loads(json.dumps(conversions.jsonable(dict(config_dict))))
    for key in _NOT_TRAINING:
        plain.pop(key, None)
    for (block, key), default in _ADDED_LATER.items():
        if plain.get(block, {}).get(key, default) == default:
            plain.get(block, {}).pop(key, None)
    return json.dumps(plain, sort_keys=True)


def _completed_runs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Canonical config -> workdir of every completed run under ``<root>/<group>/<run>``."""
    found = {}
    for summary in sorted(root.glob("*/*/summary.json")):
        config = summary.parent / "config.json"
        if config.exists() and json.loads(summary.read_text()).get("status") == "completed":
            found.setdefault(_canonical(json.loads(config.read_text())), summary.parent)
    return found


def run_jobs(jobs: Sequence[Job], workdir_root: str | pathlib.Path, *,
             train_fn: Callable[[ml_collections.ConfigDict, pathlib.Path], Mapping[str, Any]] | None = None
             ) -> list[dict[str, Any]]:
    """Trains every job in ``<workdir_root>/<group>/<run>``, reusing any completed run of the identical config.

    A completed run of the same config anywhere under the root is reused rather than retrained (so e.g. the
    cross-entropy + Dice arm of ``compare`` reuses the ``cv`` folds of the same model); a job's own workdir that
    holds an unfinished run of its config is resumed by the trainer.

    Args:
        jobs: from `kfold_jobs` / `loco_jobs`.
        workdir_root: parent of the per-run workdirs.
        train_fn: ``(config, workdir) -> summary``; default `anemia_jax.training.train.train_and_evaluate`.

    Returns:
        ``[{'group', 'run', 'workdir', 'summary', 'reused'}]`` in job order.

    Raises:
        FileExistsError: a job's workdir holds a run of a different config (choose another root or delete it).
        RuntimeError: a run did not complete (e.g. preempted; rerunning the command resumes it).
    """
    if train_fn is None:
        from anemia_jax.training import train  # noqa: PLC0415

        train_fn = train.train_and_evaluate
    root = pathlib.Path(workdir_root).expanduser().absolute()
    completed = _completed_runs(root)
    records = []
    for k, job in enumerate(jobs):
        workdir = root / _slug(job.group) / _slug(job.run)
        key = _canonical(job.config.to_dict())
        if (workdir / "config.json").exists() and _canonical(json.loads((workdir / "config.json").read_text())) != key:
            raise FileExistsError(f"{workdir} holds a run of a different config; pass another --workdir_root or "
                                  "delete it.")
        if key in completed:
            workdir, reused = completed[key], True
            summary = json.loads((workdir / "summary.json").read_text())
            print(f"[{k + 1}/{len(jobs)}] {job.group} {job.run}: reusing the completed run in {workdir}", flush=True)
        else:
            print(f"[{k + 1}/{len(jobs)}] training {job.group} {job.run} in {workdir}", flush=True)
            summary, reused = dict(train_fn(job.config, workdir)), False
            if summary.get("status") != "completed":
                raise RuntimeError(f"{job.group} {job.run} ended with status {summary.get('status')!r} in "
                                   f"{workdir}; rerun the same command to resume it.")
            completed[key] = workdir
        records.append({"group": job.group, "run": job.run, "workdir": str(workdir), "summary": summary,
                        "reused": reused, "targets": list(job.config.targets)})
    return records


def load_records(roots: Sequence[str | pathlib.Path], groups: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Completed runs under ``roots`` (``<root>/<group>/<run>/summary.json``), sorted by group and run; only the
    ``groups`` (folder names) given, in that order, if any."""
    records = []
    for root in roots:
        for path in sorted(pathlib.Path(root).expanduser().glob("*/*/summary.json")):
            summary = json.loads(path.read_text())
            config = path.parent / "config.json"
            targets = json.loads(config.read_text()).get("targets", []) if config.exists() else []
            if summary.get("status") == "completed":
                records.append({"group": path.parent.parent.name, "run": path.parent.name,
                                "workdir": str(path.parent), "summary": summary, "reused": True,
                                "targets": targets})
    if groups:
        records = sorted((r for r in records if r["group"] in groups), key=lambda r: list(groups).index(r["group"]))
    if not records:
        raise FileNotFoundError(f"No completed run (<root>/<group>/<run>/summary.json) under {list(roots)}"
                                + (f" in groups {list(groups)}" if groups else "") + ".")
    return records


# -------------------------------------------------------------------------------------------- command line


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.protocols", __doc__)
    cmd.config_flag(required=False)
    fv = cmd.flags
    flags.DEFINE_enum("mode", None, ["cv", "loco", "compare", "aggregate"], "Protocol to run.", flag_values=fv)
    flags.mark_flag_as_required("mode", flag_values=fv)
    flags.DEFINE_list("models", [], "cv/compare/loco: other model configs (configs/<model>.py) to run on the same "
                      "folds with --config's argument and overrides.", flag_values=fv)
    flags.DEFINE_integer("folds", 5, "K of K-fold (cv, compare).", flag_values=fv)
    flags.DEFINE_list("countries", [], "loco: countries to leave out (default: every country).", flag_values=fv)
    flags.DEFINE_list("losses", ["ce_dice", "focal_tversky"], f"compare: presets of {list(LOSS_PRESETS)}.",
                      flag_values=fv)
    flags.DEFINE_multi_string("runs", [], "aggregate: workdir roots to collect.", flag_values=fv)
    flags.DEFINE_list("groups", [], "aggregate: group folders to keep, in order.", flag_values=fv)
    flags.DEFINE_string("out", None, "Folder for <name>.md and <name>.json.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("name", "", "Result file name (default: the mode).", flag_values=fv)
    flags.DEFINE_string("workdir_root", "", "Parent of the per-run workdirs (default <out>/runs).", flag_values=fv)
    flags.DEFINE_enum("which", "", ["", "final", "best"], "State to report (see the docstring).", flag_values=fv)
    flags.DEFINE_enum("split", "", ["", "val", "test"], "Split to report (see the docstring).", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    return cmd


def _configs(cmd: cli.Command) -> list[ml_collections.ConfigDict]:
    """--config and each --models config (same argument), all with the --config.<key>=<value> overrides."""
    if cmd.flags["config"].value is None:
        raise cli.CommandLineError("Pass --config=configs/<model>.py[:arg] (the protocol's model and data).")
    configs = [cmd.config]
    if cmd.models:
        path, _, arg = cmd.config_file_name().partition(":")
        folder = pathlib.Path(path).parent
        for model in cmd.models:
            base = config_lib.load_config_file(f"{folder / model}.py" + (f":{arg}" if arg else ""))
            configs.append(with_overrides(base, cmd.config_overrides()))
    return configs


def main(argv: Sequence[str]) -> int:
    start = time.time()
    cmd = _command()
    try:
        if cmd.parse(argv) is None:
            return 0  # --help
        mode = cmd.mode
        which = cmd.which or ("best" if mode == "loco" else "final")
        split = cmd.split or ("test" if mode == "loco" else "val")
        name = cmd.name or mode
        root = pathlib.Path(cmd.workdir_root or pathlib.Path(cmd.out) / "runs")
        if mode == "aggregate":
            records = load_records(cmd.runs or [root], cmd.groups)
        else:
            configs = _configs(cmd)
    except (cli.CommandLineError, ValueError, FileNotFoundError) as e:
        print(f"protocols: {e}", file=sys.stderr)
        return cli.EXIT_CONFIG
    if mode != "aggregate":
        from anemia_jax.data import (
            input_pipeline,  # noqa: PLC0415 -- JAX only when training
            loading,
        )

        cli.setup_logging()
        names = [c.name for c in configs]
        labels = [c.name if names.count(c.name) == 1 else f"{c.name}[{c.arg}]" for c in configs]
        jobs: list[Job] = []
        for config, label in zip(configs, labels):
            if mode == "cv":
                jobs += kfold_jobs(config, label, cmd.folds)
            elif mode == "compare":
                for preset in cmd.losses:
                    jobs += kfold_jobs(with_loss(config, preset), f"{label} {preset}", cmd.folds)
            else:
                countries = list(cmd.countries)
                if not countries:
                    metadata = input_pipeline.read_metadata(loading.prepare_builder(config), config.dataset.split)
                    countries = sorted(set(metadata["country"].tolist()))
                jobs += loco_jobs(config, label, countries)
        records = run_jobs(jobs, root)
    agg = aggregate(records, which=which, split=split)
    titles = {"cv": f"{cmd.folds}-fold patient-level cross-validation", "loco": "Leave one country out",
              "compare": f"Loss comparison on the same {cmd.folds} folds", "aggregate": "Aggregated runs"}
    trained = sum(not r["reused"] for r in records)
    run_time = sum(float(r["summary"].get("wall_time_s") or 0.0) for r in records)
    body = (f"{len(records)} runs ({trained} trained by this command, {len(records) - trained} reused from earlier "
            f"ones); their own wall times add up to {run_time / 60:.1f} min. Scores of the {which} state on the "
            f"{split} split; mean ± std over runs (ddof=1); '(k/n)' marks a metric finite in only k of n runs.\n\n"
            + format_table(agg))
    data = {"aggregate": agg, "workdirs": [r["workdir"] for r in records],
            "reused_runs": [r["workdir"] for r in records if r["reused"]]}
    path = provenance.write_results(cmd.out, name, titles[mode], body, data,
                                    provenance.record(argv[1:], time.time() - start, "-m experiments.protocols"),
                                    cmd.note)
    print(format_table(agg))
    print(f"Wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
