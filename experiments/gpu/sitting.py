"""Planner and report of the one-call GPU sitting (driven by experiments/gpu/run_device.sh; not a library module).

Subcommands, each run by the shell script on the device machine:

* ``stamp``: run by prepare.sh here: the git state and a digest of the working tree, into ``.device/git_state.json``
  (the device's copy of the checkout has no ``.git``; ``env`` checks the digest there).
* ``env --out=F``: imports what the sitting needs (recording each failure instead of stopping), the card
  (``nvidia-smi``), the versions, and whether the carried Kvasir-SEG data are prepared; writes JSON to ``F``.
* ``plan --model=M --left=S ...``: the Kvasir-SEG run of model ``M`` that fits in the ``S`` seconds left, from the
  benchmark this sitting just measured (step rate and cold first step of the same model) or assumed figures.
  Prints ``steps eval_every train_deadline_s`` for the shell and writes the plan as JSON.
* ``note FILE KEY ARGV...``: records the command ``ARGV`` under ``KEY`` in the JSON ``FILE``.
* ``bundle --work=W --out=F``: one tar.gz of what the Kvasir runs left, without checkpoints.
* ``report --work=W --out=O ...``: gathers the environment, the benchmark rows, each Kvasir run (trainer summary,
  metrics, the test split scored by ``anemia_jax.evaluate``) into ``O/sitting.json`` (the record to commit under
  experiments/gpu/results/) and prints the short table, targets beside the figures.

Every figure printed comes from a file the sitting wrote; a missing one is shown as missing, never guessed. A
sitting that did not run on a GPU labels its table a rehearsal.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
STAMP = REPO / ".device" / "git_state.json"  # written by prepare.sh (`stamp`): the device's copy has no .git
# Official Kvasir-SEG split: 880 training images, of which the trainer holds out 10% (split.val_fraction) to choose
# the best checkpoint, so 792 are trained on.
KVASIR_TRAIN_IMAGES = 792
# Published per-image test figures on the official split at 256x256 (MKDCNet, Tomar et al. 2022, Table 1).
PUBLISHED = {"unet": {"dice": 0.8264, "iou": 0.7472}, "unetpp": {"dice": 0.8228, "iou": 0.7419}}
NAMES = {"unet": "U-Net", "unetpp": "UNet++"}
# Issue 13's targets for this sitting.
TARGET_RATIO = {"unetpp": ("compile", 1.5), "unet": ("eager", 1.3)}
TARGET_FIRST_STEP_S = {"cold": 60.0, "warm": 10.0}
TARGET_KVASIR_DICE = {"unetpp": 0.86}
# Assumed when this sitting has no benchmark row of the model (a STAGES=kvasir sitting): the H100 development
# figures (experiments/gpu/NOTES.md), trainer step 892 img/s for UNet++ and a first step of 87 s.
ASSUMED_BENCH = {"unetpp": {"images_per_s": 900.0, "first_step_cold_s": 90.0},
                 "unet": {"images_per_s": 1100.0, "first_step_cold_s": 90.0}}


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # A line cut by a killed run.
    return rows


def bench_rows(out: pathlib.Path, model: str) -> list[dict]:
    """The benchmark's JSON rows for ``model`` (ours first, then the peers), or [] when it did not finish."""
    rows = _read_json(out / f"bench_{model}.json")
    return rows if isinstance(rows, list) else []


def ours(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("framework") == "anemia_jax"), None)


def peer(rows: list[dict], run: str) -> dict | None:
    """The peer row of ``run`` ('eager' or 'compile'); peer_bench.py names them 'torch' and 'torch+compile'."""
    for r in rows:
        name = str(r.get("framework", ""))
        if name.startswith("torch") and ("compile" in name) == (run == "compile"):
            return r
    return None


def plan_kvasir(model: str, left_s: float, rows: list[dict], *, batch: int, concurrent: int, rate_factor: float,
                eval_s: float, reserve_s: float, evals: int, steps: int = 0) -> dict[str, Any]:
    """The step count of ``model``'s Kvasir-SEG run that ends, scored, inside ``left_s`` seconds.

    Time line from now: the trainer starts, compiles and trains, scores its final and best states (its overhead,
    estimated as 1.3x the benchmark's cold first step plus 35 s for the evaluation programs and the final
    scoring), then ``anemia_jax.evaluate`` scores the test split (``eval_s``), then the report (``reserve_s``).
    The training rate is the benchmark's img/s (batch 32, one process) times ``rate_factor``, which covers
    ``concurrent`` runs sharing the card, the smaller batch, augmentation and the pauses to evaluate and save.

    Returns:
        the plan: ``steps`` (``steps`` if given, else at least one epoch), ``eval_every`` (steps between
        evaluations, ``evals`` per run), ``train_deadline_s`` (seconds from now after which the trainer is sent
        SIGTERM: it then saves a checkpoint and stops, and the best one is still scored), and what they came from.
    """
    row = ours(rows)
    measured = bool(row and row.get("images_per_s"))
    source = "this sitting's benchmark" if measured else "H100 development figures: no benchmark row"
    bench = row if measured else ASSUMED_BENCH[model]
    cold = float(bench.get("first_step_cold_s") or bench.get("first_step_s") or ASSUMED_BENCH[model][
        "first_step_cold_s"])
    overhead_s = 1.3 * cold + 35.0
    rate = float(bench["images_per_s"]) * rate_factor
    train_s = left_s - reserve_s - eval_s - overhead_s
    steps_per_epoch = math.ceil(KVASIR_TRAIN_IMAGES / batch)
    planned = steps or max(steps_per_epoch, int(train_s * rate / batch))
    return {"model": model, "steps": planned, "epochs": round(planned / steps_per_epoch, 1),
            "eval_every": max(1, math.ceil(planned / evals)),
            "train_deadline_s": max(30, int(left_s - reserve_s - eval_s)),
            "left_s": left_s, "overhead_s": round(overhead_s, 1), "train_s": round(train_s, 1),
            "rate_images_per_s": round(rate, 1), "rate_source": source, "rate_factor": rate_factor,
            "concurrent_runs": concurrent, "batch": batch, "steps_given": bool(steps)}


def environment() -> dict[str, Any]:
    """Card, versions and the carried data, each failure recorded as text (the sitting goes on regardless)."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "versions": {}, "import_errors": {}}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "tensorflow_datasets", "ml_collections",
                 "array_record", "tensorboardX", "google.protobuf", "numpy", "scipy", "etils", "torch"):
        try:
            module = __import__(name, fromlist=["_"])
            env["versions"][name] = str(getattr(module, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 -- any import failure is recorded, not raised
            env["import_errors"][name] = f"{type(e).__name__}: {e}"
    try:
        import jax

        env["devices"] = [str(d) for d in jax.devices()]
        env["platform"] = jax.default_backend()
        env["device_kind"] = jax.devices()[0].device_kind
    except Exception as e:  # noqa: BLE001
        env["import_errors"]["jax.devices"] = f"{type(e).__name__}: {e}"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["card"] = q.stdout.strip() or q.stderr.strip()
    try:
        from anemia_jax.data import datasets

        data_dir = os.environ.get("KVASIR_DATA_DIR", ".device/tfds")
        b = datasets.get_builder("image_mask_folder", data_dir=data_dir, config="kvasir_seg_256")
        env["kvasir_prepared"] = {"data_dir": data_dir, "version": str(b.version), "prepared": bool(b.is_prepared())}
    except Exception as e:  # noqa: BLE001
        env["import_errors"]["kvasir_data"] = f"{type(e).__name__}: {e}"
    env["git"] = git_record()
    env["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env["cpu_count"] = os.cpu_count()
    return env


def stage_times(path: pathlib.Path) -> dict[str, int]:
    """``{stage: seconds}`` from the ``<stage> <seconds>`` lines the shell script appends."""
    try:
        return {name: int(sec) for name, sec in (line.split() for line in path.read_text().splitlines() if line)}
    except (OSError, ValueError):
        return {}


def bundle(work: pathlib.Path, out: pathlib.Path, limit_bytes: int = 15 * 2**20) -> None:
    """One tar.gz of everything small the Kvasir runs left (no checkpoints; each run's last panel only)."""
    files = [f for f in sorted(work.glob("*")) if f.is_file() and f.suffix in (".json", ".log", ".txt")]
    for run in sorted(work.glob("kvasir_*")):
        panels = sorted(run.glob("panels/*.png"))
        files += [f for f in sorted(run.rglob("*")) if f.is_file() and "checkpoints" not in f.relative_to(
            run).parts and f.suffix != ".png"] + panels[-1:]
    with tarfile.open(out, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(work)))
    if out.stat().st_size > limit_bytes:  # over what comes back from the device: keep the text alone
        with tarfile.open(out, "w:gz") as tar:
            for f in files:
                if f.suffix != ".png":
                    tar.add(f, arcname=str(f.relative_to(work)))
    print(f"bundled {len(files)} files into {out} ({out.stat().st_size / 2**20:.2f} MiB)")


def tree_digest(paths: list[str]) -> str:
    """sha256 over the contents of ``paths`` (relative to the repository root; a missing file counts as such)."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        f = REPO / rel
        h.update(rel.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"<missing>") + b"\0")
    return h.hexdigest()


def stamp() -> dict[str, Any]:
    """The git state here (commit, uncommitted changes) and a digest of every file git sees, for the device.

    The device's copy of the checkout has no ``.git``: prepare.sh stamps the state into ``.device/`` and the sitting
    recomputes the digest there, so the record says whether it ran exactly the stamped working tree.
    """
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    files = [f for f in files if f]
    return {**_provenance().git_state(), "files": files, "tree_sha256": tree_digest(files)}


def _provenance():
    sys.path.insert(0, str(REPO / "experiments"))
    import provenance  # noqa: PLC0415 -- experiments/provenance.py

    return provenance


def git_record() -> dict[str, Any]:
    """The git state where git works; on the device, the stamp prepare.sh wrote, checked against the files there."""
    try:
        state = _provenance().git_state()
    except Exception as e:  # noqa: BLE001
        state = {"git_commit": "unknown", "error": f"{type(e).__name__}: {e}"}
    if state.get("git_commit") != "unknown":
        return state
    stamped = _read_json(STAMP)
    if not stamped:
        return {**state, "stamp": f"no {STAMP.relative_to(REPO)} (run experiments/gpu/prepare.sh before the call)"}
    files = stamped.pop("files", [])
    matches = tree_digest(files) == stamped.get("tree_sha256")
    return {**stamped, "from_stamp": str(STAMP.relative_to(REPO)), "tree_matches_stamp": matches,
            **({} if matches else {"git_commit": f"unknown (files differ from the stamp of "
                                                 f"{stamped.get('git_commit')})"})}


def kvasir_run(work: pathlib.Path, model: str) -> dict[str, Any]:
    """What the Kvasir-SEG run of ``model`` left in ``work``: plan, trainer summary, training rate, test scores."""
    run = work / f"kvasir_{model}"
    result: dict[str, Any] = {"plan": _read_json(work / f"plan_{model}.json")}
    commands = _read_json(work / f"commands_{model}.json") or {}
    result.update(commands)
    summary = _read_json(run / "summary.json") or {}
    metrics = _read_jsonl(run / "metrics.jsonl")
    train = [m for m in metrics if m.get("split") == "train" and "images_per_s" in m]
    val = [m for m in metrics if m.get("split") == "val" and "dice/mean" in m]
    step = summary.get("step") or (max((m.get("step", 0) for m in metrics), default=0))
    per_epoch = summary.get("steps_per_epoch") or math.ceil(KVASIR_TRAIN_IMAGES / ((result["plan"] or {}).get(
        "batch") or 16))
    exit_code = commands.get("trainer_exit")
    status = summary.get("status") or {"124": "stopped at its deadline (SIGTERM)",
                                       "137": "killed 30 s after its deadline's SIGTERM"}.get(
        exit_code, (f"failed (exit {exit_code})" if exit_code else "no summary") if metrics else "did not start")
    result["trainer"] = {
        "status": status, "exit_code": exit_code,
        "step": step, "num_train_steps": summary.get("num_train_steps"), "steps_per_epoch": per_epoch,
        "epochs": round(step / per_epoch, 1) if per_epoch else None,
        "train_time_s": summary.get("train_time_s"), "wall_time_s": summary.get("wall_time_s"),
        "median_images_per_s": sorted(m["images_per_s"] for m in train)[len(train) // 2] if train else None,
        "best_val_dice": max((m["dice/mean"] for m in val), default=None),
        "summary_best": summary.get("best"), "summary_final": summary.get("final"),
    }
    test = _read_json(run / "eval_test" / "summary.json")
    if test:
        scores = test.get("targets", {}).get("mask", {})
        result["test"] = {"checkpoint": test.get("checkpoint"), "num_images": test.get("num_images"),
                          **{k: scores.get(k, {}).get("mean") for k in ("dice", "iou", "precision", "recall")},
                          "hd95_mean": scores.get("hd95", {}).get("mean")}
    return result


def _fmt(x: Any, spec: str = ".1f", missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "missed")


def targets_and_table(record: dict[str, Any]) -> tuple[list[dict], str]:
    """The targets with their measured values, and the short table printed last."""
    env = record.get("env", {})
    on_gpu = env.get("platform") == "gpu"
    targets, lines = [], []
    scale = f"GPU: {env.get('card') or env.get('device_kind')}" if on_gpu else \
        f"REHEARSAL on {env.get('device_kind', '?')} (tiny knobs): NOT a result"
    lines.append(f"GPU sitting {env.get('date_utc', '')} | {scale} | jax {env.get('versions', {}).get('jax', '?')}"
                 f" | torch {env.get('versions', {}).get('torch', '-')} | commit "
                 f"{str(env.get('git', {}).get('git_commit', '?'))[:10]} | {record.get('wall_s', '?')} s of "
                 f"{_fmt(record.get('budget_s'), '.0f')} s")
    lines.append(f"{'benchmark (train step)':<24}{'ours img/s':>11}{'eager':>9}{'compile':>9}{'ratio':>8}"
                 f"{'target':>10}  {'first step cold / warm s (target <60 / <10)'}")
    for model in ("unetpp", "unet"):
        rows = record.get("benchmark", {}).get(model) or []
        o, e, c = ours(rows), peer(rows, "eager"), peer(rows, "compile")
        run, need = TARGET_RATIO[model]
        ref = e if run == "eager" else c
        ratio = (o["images_per_s"] / ref["images_per_s"]) if o and ref and o.get("images_per_s") and \
            ref.get("images_per_s") else None
        ok = None if ratio is None else ratio >= need
        targets.append({"what": f"{NAMES[model]} img/s >= {need}x torch {run}", "value": ratio, "met": ok})
        cold = o.get("first_step_cold_s", o.get("first_step_s")) if o else None
        warm = o.get("first_step_warm_s") if o else None
        for kind, v in (("cold", cold), ("warm", warm)):
            if v is not None:
                targets.append({"what": f"{NAMES[model]} first step {kind} < {TARGET_FIRST_STEP_S[kind]:.0f} s",
                                "value": v, "met": v < TARGET_FIRST_STEP_S[kind]})
        started = rows or model in record.get("bench_started", [])
        shape = f"b{o['batch']} {o['size']}px {o['dtype']}" if o else ("did not finish" if started else "not run")
        lines.append(
            f"{NAMES[model] + ' ' + shape:<24}{_fmt(o and o.get('images_per_s')):>11}"
            f"{_fmt(e and e.get('images_per_s')):>9}{_fmt(c and c.get('images_per_s')):>9}"
            f"{_fmt(ratio, '.2f') + ('x' if ratio else ''):>8}{f'>={need}x {run[0]}':>10}  "
            f"{_fmt(cold)} / {_fmt(warm)} ({_verdict(None if cold is None else cold < 60)} / "
            f"{_verdict(None if warm is None else warm < 10)})")
    lines.append(f"{'Kvasir-SEG test (120)':<24}{'epochs':>8}{'steps':>8}{'Dice':>8}{'IoU':>8}{'published':>16}"
                 f"  target / status")
    for model in ("unet", "unetpp"):
        k = record.get("kvasir", {}).get(model)
        if not k:
            lines.append(f"{NAMES[model]:<24}  not run")
            continue
        t, test = k.get("trainer", {}), k.get("test") or {}
        pub = PUBLISHED[model]
        need = TARGET_KVASIR_DICE.get(model)
        ok = None if need is None or test.get("dice") is None else test["dice"] >= need
        if need is not None:
            targets.append({"what": f"Kvasir-SEG {NAMES[model]} test Dice >= {need}", "value": test.get("dice"),
                            "met": ok, "epochs": t.get("epochs")})
        ckpt = f"checkpoint {(test.get('checkpoint') or {}).get('chosen_as', '?')}" if test else "no test score"
        status = f"{t.get('status')}, {ckpt}"
        lines.append(f"{NAMES[model]:<24}{_fmt(t.get('epochs')):>8}{_fmt(t.get('step'), 'd'):>8}"
                     f"{_fmt(test.get('dice'), '.4f'):>8}{_fmt(test.get('iou'), '.4f'):>8}"
                     f"{pub['dice']:>8.4f}/{pub['iou']:.4f}  "
                     + (f">={need}: {_verdict(ok)}; " if need else "") + status)
    met = [t for t in targets if t["met"] is not None]
    lines.append(f"targets met: {sum(t['met'] for t in met)} of {len(met)} measured"
                 + ("" if on_gpu else " (rehearsal: figures of tiny models on a CPU, not the method's)"))
    return targets, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    q = sub.add_parser("plan")
    q.add_argument("--model", required=True, choices=sorted(NAMES))
    q.add_argument("--left", type=float, required=True, help="seconds left for this run, scored, and the report")
    q.add_argument("--bench_dir", required=True, help="where bench_<model>.json are")
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--concurrent", type=int, default=2)
    q.add_argument("--rate_factor", type=float, default=0.35)
    q.add_argument("--eval_s", type=float, default=50.0)
    q.add_argument("--reserve_s", type=float, default=20.0)
    q.add_argument("--evals", type=int, default=10)
    q.add_argument("--steps", type=int, default=0, help="> 0: this many steps, whatever the time")
    q.add_argument("--out", required=True)
    st = sub.add_parser("stamp")
    st.add_argument("--out", default=str(STAMP))
    n = sub.add_parser("note")
    n.add_argument("file")
    n.add_argument("key")
    n.add_argument("argv", nargs=argparse.REMAINDER, help="the command to record")
    b = sub.add_parser("bundle")
    b.add_argument("--work", required=True)
    b.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--budget_s", type=float, required=True)
    r.add_argument("--wall_s", type=float, required=True)
    r.add_argument("--command", required=True)
    args = p.parse_args()

    if args.cmd == "env":
        env = environment()
        pathlib.Path(args.out).write_text(json.dumps(env, indent=2))
        print(json.dumps({k: env.get(k) for k in ("card", "platform", "versions", "import_errors",
                                                  "kvasir_prepared")}))
        if env["import_errors"]:
            print(f"sitting: import failures (the stages that need them will fail): {env['import_errors']}")
    elif args.cmd == "plan":
        plan = plan_kvasir(args.model, args.left, bench_rows(pathlib.Path(args.bench_dir), args.model),
                           batch=args.batch, concurrent=args.concurrent, rate_factor=args.rate_factor,
                           eval_s=args.eval_s, reserve_s=args.reserve_s, evals=args.evals, steps=args.steps)
        pathlib.Path(args.out).write_text(json.dumps(plan, indent=2))
        print(plan["steps"], plan["eval_every"], plan["train_deadline_s"])
    elif args.cmd == "stamp":
        record = stamp()
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"stamped commit {record['git_commit'][:10]} ({record['git_changed_paths_total']} uncommitted paths, "
              f"{len(record['files'])} files) into {args.out}")
    elif args.cmd == "note":
        path = pathlib.Path(args.file)
        notes = _read_json(path) or {}
        notes[args.key] = shlex.join(args.argv)
        path.write_text(json.dumps(notes, indent=2))
    elif args.cmd == "bundle":
        bundle(pathlib.Path(args.work), pathlib.Path(args.out))
    else:
        work, out = pathlib.Path(args.work), pathlib.Path(args.out)
        record: dict[str, Any] = {
            "what": "one-call GPU sitting (experiments/gpu/run_device.sh): benchmark beside the PyTorch peer, "
                    "then Kvasir-SEG U-Net and UNet++ at 256x256 scored on the 120 official test images",
            "command": args.command, "budget_s": args.budget_s, "wall_s": round(args.wall_s),
            "env": _read_json(work / "env.json") or {},
            "stages_s": stage_times(work / "stages.txt"),
            "benchmark": {m: bench_rows(out, m) for m in ("unetpp", "unet")},
            "bench_started": [m for m in ("unetpp", "unet") if f"bench_{m}" in stage_times(work / "stages.txt")],
            "kvasir": {m: kvasir_run(work, m) for m in ("unet", "unetpp") if (work / f"plan_{m}.json").exists()},
        }
        record["targets"], record["table"] = targets_and_table(record)
        (out / "sitting.json").write_text(json.dumps(record, indent=2, default=str))
        (out / "table.txt").write_text(record["table"] + "\n")
        print(record["table"])


if __name__ == "__main__":
    main()
