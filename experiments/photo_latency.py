"""Photo to answer: ``predict`` and the screening page with JAX (the runs) against ONNX Runtime (their export), side by
side on the same photos and the same CPU, first call and steady state (not a test).

    python -m experiments.photo_latency --out=experiments/results/photo_latency --onnx_python=.onnx-venv/bin/python \
        [--config=configs/unetpp.py:data=phantom,size=256,dtype=float32] [--folds=3] [--photos=20] [--megapixels=12] \
        [--repeats=3] [--rounds=2] [--parts=first,steady]

The process needs ONNX Runtime (``pip install onnxruntime``; the export needs the ONNX environment, README: Export a
model). Set-up, in a temporary folder: ``--folds`` runs of the config (initial weights, seeds 0, 1, ...: what they
predict does not change how long it takes), their persistent compilation cache in that folder, the first run and
the ensemble of all exported with ``python -m anemia_jax.export --format=onnx``, and ``--photos`` synthetic phone
photos (JPEG, ``--megapixels``, 4:3, an eye-like scene).

Every figure comes from a fresh process (``python -m ...``), and the two engines alternate within every round (the
first engine of a round alternates too), so that the machine's load hits both alike; the load average is recorded
beside each figure.

* **first call** -- ``predict`` on one photo, the whole command from its start to its exit; the page
  (``python -m anemia_jax.app --port=0``): from its start to the moment it listens (``ready``; it compiles before it
  listens), then the answer to the first photo posted. JAX with an empty compilation cache (``cold``) and with the
  cache its cold run filled (``warm``); ONNX Runtime has nothing to compile.
* **steady state** -- in a process that has served the same photo before: the model alone (resized photo in,
  members' probabilities out; wall and CPU time), the page's answer (`ScreeningService.analyse`: decode, segment,
  verdict, overlay and uncertainty images) and ``predict`` (`photo_folder.predict_photos`: the same plus its PNG
  files and CSV) on one photo (median of ``--repeats``), and on the folder of ``--photos`` (once: the page answers
  them one by one, predict takes the folder).

Results: ``<out>/photo_latency.md`` and ``.json`` (`experiments.provenance`: command, commit, machine, versions, load).
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from absl import flags  # noqa: E402

from anemia_jax import cli  # noqa: E402
from experiments import provenance  # noqa: E402

ENGINES = ("jax", "onnxruntime")
REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ set-up


def _write_runs(root: pathlib.Path, config_spec: str, folds: int) -> list[str]:
    """``folds`` runs of the config (initial weights, seed = fold), their compilation cache in ``root/jax_cache``."""
    from anemia_jax.runs import checkpointing, config_lib, model_factory  # noqa: PLC0415
    from anemia_jax.training import experiment, reporting
    from anemia_jax.utils import parallel

    mesh = parallel.make_mesh()
    workdirs = []
    for fold in range(folds):
        config = config_lib.load_config_file(config_spec)
        config.seed = fold
        config.compilation_cache_dir = str(root / "jax_cache")
        model = model_factory.build_model(config)
        tx, _ = experiment.build_optimizer(config, total_steps=10, warmup_steps=1)
        state = experiment.init_train_state(config, model, tx, mesh)
        workdir = root / f"fold{fold}"
        reporting.Reporter(workdir, is_main=True, tensorboard=False).write_config(config.to_dict())
        with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=1) as manager:
            manager.save(1, state, metrics={"dice/mean": 0.0})
        workdirs.append(str(workdir))
    return workdirs


def _write_photos(folder: pathlib.Path, count: int, megapixels: float) -> list[str]:
    import PIL.Image  # noqa: PLC0415

    from experiments import predict_timing  # noqa: PLC0415 -- its eye-like scene

    folder.mkdir(parents=True, exist_ok=True)
    w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    h = int(round(w * 3 / 4))
    names = []
    for i in range(count):
        path = folder / f"eye_{i:02d}.jpg"
        PIL.Image.fromarray(predict_timing._photo(h, w, seed=i)).save(path, quality=92)
        names.append(str(path))
    return names


def _export(workdirs: Sequence[str], out: pathlib.Path, onnx_python: str) -> str:
    argv = [sys.executable, "-m", "anemia_jax.export", *(f"--workdir={w}" for w in workdirs), "--format=onnx",
            f"--out={out}", f"--onnx_python={onnx_python}", "--checkpoint=latest"]
    subprocess.run(argv, check=True, env=_env(), capture_output=True, timeout=3600)
    return str(out)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _model_args(engine: str, setup: dict, members: int) -> list[str]:
    if engine == "jax":
        return [f"--workdir={w}" for w in setup["workdirs"][:members]] + ["--checkpoint=latest"]
    return [f"--onnx={setup['onnx'][str(members)]}"]


# -------------------------------------------------------------------------------------------- first call


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def first_predict(engine: str, setup: dict, members: int, out: pathlib.Path) -> dict:
    """``predict`` on one photo in a fresh process: seconds from its start to its exit."""
    argv = [sys.executable, "-m", "anemia_jax.predict", *_model_args(engine, setup, members), setup["photos"][0],
            f"--out={out}"]
    load, t = _load(), time.perf_counter()
    subprocess.run(argv, check=True, env=_env(), capture_output=True, timeout=1800)
    return {"total_s": time.perf_counter() - t, "load": load}


def first_page(engine: str, setup: dict, members: int) -> dict:
    """The page in a fresh process: seconds until it listens, then until its answer to the first photo."""
    argv = [sys.executable, "-u", "-m", "anemia_jax.app", *_model_args(engine, setup, members), "--port=0"]
    load, t = _load(), time.perf_counter()
    server = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while "Screening page on" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise RuntimeError(f"the page exited with status {server.returncode}: {argv}")
        ready = time.perf_counter() - t
        url = line.split("Screening page on ", 1)[1].split()[0].rstrip("/")
        data = pathlib.Path(setup["photos"][0]).read_bytes()
        request = urllib.request.Request(f"{url}/api/photo?name=eye.jpg", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        total = time.perf_counter() - t
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {"ready_s": ready, "answer_s": total - ready, "total_s": total, "server_seconds": answer["seconds"],
            "load": load}


# ------------------------------------------------------------------------------------------- steady state


def _median_times(fn: Callable[[], Any], repeats: int) -> dict:
    wall, cpu = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "walls_s": wall}


def steady(engine: str, setup: dict, members: int, repeats: int, work: pathlib.Path) -> dict:
    """Runs in the child: the engine's segmenter, warmed up, timed on one photo and on the folder."""
    import numpy as np  # noqa: PLC0415

    from anemia_jax.inference import onnx_engine, segmenter  # noqa: PLC0415
    from anemia_jax.screening import app_server, photo_folder, photo_report, quality
    from anemia_jax.utils import image_io

    t = time.perf_counter()
    if engine == "jax":
        import jax  # noqa: PLC0415

        from anemia_jax.runs import restore  # noqa: PLC0415
        from anemia_jax.utils import compilation_cache, parallel

        compilation_cache.enable_for_serving(str(pathlib.Path(setup["workdirs"][0]).parent / "jax_cache"))
        runs = restore.load_runs(setup["workdirs"][:members], checkpoint="latest",
                                 mesh=parallel.make_mesh(jax.local_devices()[:1]))
        seg = segmenter.Segmenter(runs, batch_size=1)
    else:
        seg = segmenter.Segmenter.from_onnx(onnx_engine.OnnxModel(setup["onnx"][str(members)]))
    seg.warm_up()
    started = time.perf_counter() - t
    service = app_server.ScreeningService(seg, photo_report.PhotoAssessor(seg.targets, quality.DEFAULTS, None))
    photo_path = setup["photos"][0]
    data = pathlib.Path(photo_path).read_bytes()
    inputs = image_io.resize_image(image_io.decode_photo(data), seg.image_size)[None]
    service.analyse(data, "warm.jpg")
    result = {"load_before": _load(), "start_s": started,
              "model": _median_times(lambda: seg._predict_members(inputs), repeats),
              "page_one": _median_times(lambda: service.analyse(data, "eye.jpg"), repeats),
              "predict_one": _median_times(lambda: photo_folder.predict_photos(seg, [photo_path], work / "one"),
                                           repeats)}
    if len(setup["photos"]) > 1:
        folder = pathlib.Path(photo_path).parent
        photos = [pathlib.Path(p).read_bytes() for p in setup["photos"]]
        result["page_folder"] = _median_times(lambda: [service.analyse(p, "eye.jpg") for p in photos], 1)
        result["predict_folder"] = _median_times(lambda: photo_folder.predict_photos(seg, [folder], work / "all"), 1)
    result["load_after"] = _load()
    result["masks_fraction"] = float(np.mean(seg.segment([image_io.decode_photo(data)])[0].fractions()))
    return result


def _steady_child(engine: str, setup_path: pathlib.Path, members: int, repeats: int) -> dict:
    argv = [sys.executable, "-m", "experiments.photo_latency", f"--child={engine}", f"--setup={setup_path}",
            f"--members={members}", f"--repeats={repeats}", "--out=-"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"steady-state child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the run


def _clear_cache(setup: dict) -> None:
    cache = pathlib.Path(setup["workdirs"][0]).parent / "jax_cache"
    shutil.rmtree(cache, ignore_errors=True)


def measure(setup: dict, setup_path: pathlib.Path, *, rounds: int, repeats: int, parts: Sequence[str],
            work: pathlib.Path) -> list[dict]:
    """Every figure, one row each: ``{part, engine, members, round, ...}``; engines alternate within each round."""
    rows = []
    sizes = sorted({1, len(setup["workdirs"])})

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for r in range(rounds):
        order = ENGINES if r % 2 == 0 else ENGINES[::-1]
        for members in sizes:
            base = {"members": members, "round": r}
            if "first" in parts:
                for engine in order:
                    if engine == "jax":
                        for cache in ("cold", "warm"):
                            if cache == "cold":
                                _clear_cache(setup)
                            add({"part": "first_predict", "engine": engine, "cache": cache, **base,
                                 **first_predict(engine, setup, members, work / f"p{r}{members}{engine}{cache}")})
                        for cache in ("cold", "warm"):
                            if cache == "cold":
                                _clear_cache(setup)
                            add({"part": "first_page", "engine": engine, "cache": cache, **base,
                                 **first_page(engine, setup, members)})
                    else:
                        add({"part": "first_predict", "engine": engine, "cache": "-", **base,
                             **first_predict(engine, setup, members, work / f"p{r}{members}{engine}")})
                        add({"part": "first_page", "engine": engine, "cache": "-", **base,
                             **first_page(engine, setup, members)})
            if "steady" in parts:
                for engine in order:
                    add({"part": "steady", "engine": engine, **base,
                         **_steady_child(engine, setup_path, members, repeats)})
    return rows


def _median(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{statistics.median(values):.2f}" if values else "-"


def _loads(rows: list[dict]) -> str:
    loads = [r.get("load", r.get("load_before")) for r in rows]
    loads = [x for x in loads if x is not None]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def tables(rows: list[dict]) -> str:
    """Markdown tables of the medians over rounds (every round's figure is in the JSON)."""
    out = ["## First call (fresh process; seconds; median over rounds)", "",
           "| members | engine | compilation cache | predict, 1 photo: start to exit | page: start to listening | "
           "page: first answer | page: start to first answer | load (1 min) |", "|---|---|---|---:|---:|---:|---:|---|"]
    keys = sorted({(r["members"], r["engine"], r["cache"]) for r in rows if r["part"].startswith("first")})
    for members, engine, cache in keys:
        sel = [r for r in rows if r["part"].startswith("first") and (r["members"], r["engine"], r["cache"]) ==
               (members, engine, cache)]
        pred = [r for r in sel if r["part"] == "first_predict"]
        page = [r for r in sel if r["part"] == "first_page"]
        out.append(f"| {members} | {engine} | {cache} | {_median(pred, 'total_s')} | {_median(page, 'ready_s')} | "
                   f"{_median(page, 'answer_s')} | {_median(page, 'total_s')} | {_loads(sel)} |")
    out += ["", "## Steady state (seconds; wall, with the process's CPU time of all threads in brackets; median over "
            "rounds of the medians of repeats)", "",
            "| members | engine | model alone | page, 1 photo | predict, 1 photo | page, folder | predict, folder | "
            "start-up (restore/open + compile or cache + first run) | load (1 min) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for members, engine in sorted({(r["members"], r["engine"]) for r in rows if r["part"] == "steady"}):
        sel = [r for r in rows if r["part"] == "steady" and (r["members"], r["engine"]) == (members, engine)]

        def cell(key: str) -> str:
            parts = [r[key] for r in sel if key in r]
            if not parts:
                return "-"
            return (f"{statistics.median(p['wall_s'] for p in parts):.2f} "
                    f"({statistics.median(p['cpu_s'] for p in parts):.2f})")

        out.append(f"| {members} | {engine} | {cell('model')} | {cell('page_one')} | {cell('predict_one')} | "
                   f"{cell('page_folder')} | {cell('predict_folder')} | {_median(sel, 'start_s')} | {_loads(sel)} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ command line


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.photo_latency", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Folder for photo_latency.md and .json.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("config", "configs/unetpp.py:data=phantom,size=256,dtype=float32", "The runs' config.",
                        flag_values=fv)
    flags.DEFINE_integer("folds", 3, "Runs in the ensemble.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("photos", 20, "Photos in the folder.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("megapixels", 12.0, "Size of each photo (4:3).", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Timed calls per steady-state figure (median).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("rounds", 2, "Rounds; the engines alternate within each.", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("parts", ["first", "steady"], "first and/or steady.", flag_values=fv)
    flags.DEFINE_string("onnx_python", os.environ.get("ANEMIA_JAX_ONNX_PYTHON", ""), "The ONNX environment's "
                        "Python, which converts the exports.", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    flags.DEFINE_string("child", None, "Internal: measure the steady state of this engine.", flag_values=fv)
    flags.DEFINE_string("setup", None, "Internal: the set-up's JSON.", flag_values=fv)
    flags.DEFINE_integer("members", 1, "Internal: ensemble size of the child.", flag_values=fv)
    return cmd


def _versions() -> dict[str, str]:
    import importlib.metadata  # noqa: PLC0415

    out = {}
    for package in ("jax", "jaxlib", "flax", "onnxruntime", "numpy", "pillow"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def main(argv: Sequence[str]) -> int:
    cmd = _command()
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
        if not cmd.child and not cmd.onnx_python:
            raise cli.CommandLineError("Pass --onnx_python=PYTHON (the ONNX environment's, README: Export a model).")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    if cmd.child:
        setup = json.loads(pathlib.Path(cmd.setup).read_text())
        with tempfile.TemporaryDirectory(prefix="photo_latency_child_") as work:
            print(json.dumps(steady(cmd.child, setup, cmd.members, cmd.repeats, pathlib.Path(work))), flush=True)
        return cli.EXIT_OK
    from anemia_jax.inference import onnx_engine  # noqa: PLC0415

    onnx_engine.onnxruntime_module()  # before minutes of set-up: this process's children need it
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="photo_latency_") as root_name:
        root = pathlib.Path(root_name)
        workdirs = _write_runs(root / "runs", cmd.config, cmd.folds)
        setup = {"workdirs": workdirs, "photos": _write_photos(root / "photos", cmd.photos, cmd.megapixels),
                 "onnx": {str(m): _export(workdirs[:m], root / f"export{m}" / "model.onnx", cmd.onnx_python)
                          for m in sorted({1, cmd.folds})}}
        setup_path = root / "setup.json"
        setup_path.write_text(json.dumps(setup))
        print(f"set-up done in {time.time() - started:.0f} s", flush=True)
        rows = measure(setup, setup_path, rounds=cmd.rounds, repeats=cmd.repeats, parts=cmd.parts, work=root / "out")
    body = (f"`{cmd.config}` ({cmd.folds} run(s), initial weights; the ensemble is all of them), exported to ONNX; "
            f"{cmd.photos} synthetic {cmd.megapixels:g}-megapixel JPEG photos; {cmd.rounds} round(s), engines "
            f"alternating; load average (1, 5, 15 min) at the start {[round(x, 2) for x in load_before]}, at the end "
            f"{[round(x, 2) for x in os.getloadavg()]}. CPU-scale figures of this machine only.\n\n" + tables(rows))
    prov = provenance.record(argv[1:], time.time() - started, "-m experiments.photo_latency")
    prov["versions"] = _versions()
    prov["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    path = provenance.write_results(cmd.out, "photo_latency", "Photo to answer: JAX against ONNX Runtime", body,
                                    {"rows": rows}, prov, cmd.note)
    print(body)
    print(f"Wrote {path}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
