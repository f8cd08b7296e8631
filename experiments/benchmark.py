"""Training-step throughput benchmark (not a test): images/s, time to first step, memory, FLOPs.

Measures the project's own jitted, data-parallel `train_step` (anemia_jax.training.steps, under shard_map on every
device) of a config's model on a synthetic batch held in device memory (no input pipeline). From the repository root::

    python -m experiments.benchmark --config=configs/unetpp.py:size=256,batch=32,dtype=bfloat16 \
        [--config.model.features=16] [--steps=10 --windows=5 --warmup=3] [--no_warm] [--no_overlap] \
        [--peer=../shared/tools/peer_bench.py --peer_runs=eager,compile [--peer_python=PYTHON]] --out=bench.json

Model (`model_factory.build_model`, as the trainer builds it), image size, global batch (split over the devices) and
compute dtype come from the config; ``--config.<key>=<value>`` changes any field (``--config.model.encoder=resnet50``
with configs/unetpp_resnet34.py, ``--config.model.variant=b2`` with configs/segformer.py).

The work measured is the PyTorch peer's (../shared/tools/peer_bench.py), so that the two compare, and so that every
record compares with those made before configs (``--model=unetpp``): one head of one output channel -- the config's
first target only and no deep supervision, unless ``--config.targets`` / ``--config.model.deep_supervision`` are
given (configs/unetpp.py trains UNet++ deeply supervised on two targets) -- with the config's loss (cross-entropy +
soft Dice) on that head and Adam at a fixed 1e-3 as the peer uses, NOT the trainer's AdamW schedule and clipping;
no augmentation; parameters from ``config.seed`` (and ``config.model.pretrained`` if set). The figures:

* images/s: median over ``--windows`` timed windows of ``--steps`` steps each, after ``--warmup`` steps, every
  window closed with ``block_until_ready``;
* time to first step: from the start of a process (before ``import jax``) to the first finished step, measured in a
  child process twice -- with an empty persistent compilation cache (cold), then with the cache the first child
  filled (warm) -- with where it went: imports (with the command line and config), making the batch, parameter
  initialisation, the wait for the train step's compilation, the first step's run; and, after it, the compilation of
  the eval step's forward program (what a trainer adds before its first evaluation). The train step compiles from
  the state's shapes alone, in a background thread while the parameters initialise (``--no_overlap``: after them);
* peak device memory (``memory_stats()['peak_bytes_in_use']``, where the backend reports it; on the CPU, which does
  not, the process's peak resident memory instead, ``peak_host_rss_bytes``, marked ``*`` in the table);
* FLOPs per step from the compiled program's ``cost_analysis()`` (summed over devices).

Prints a table last; writes every figure as JSON to ``--out`` after each row (a failed or killed peer run keeps
ours). A row's ``arch`` is the model and the fields in which it differs from the model's defaults
(`experiments.model_table.model_label`: ``unetpp``, ``unetpp encoder=resnet34``), ``config`` the config as given.
``--peer`` runs peer_bench.py's plain U-Net/UNet++ (``torch``) or, for ``encoder=resnet34``, smp's
``Unet``/``UnetPlusPlus`` (``smp``) (`experiments.peer`); other models have no peer, said before anything runs.

Exit statuses: 0 done; 1 a measurement failed (the child's or peer's error is shown); 2 invalid command line or
config (also a batch the devices do not divide); 5 ``--out`` cannot be written.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import os  # noqa: E402

# The environment this process started with, before its command line appends anemia_jax's XLA CPU flags to XLA_FLAGS:
# the child processes start from it, so that each records the flags anemia_jax added in it (`xla_cpu_flags_added`).
_ENVIRON = dict(os.environ)

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402

from anemia_jax import cli  # noqa: E402
from experiments import peer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAM = "python -m experiments.benchmark"
# Flags of the benchmark before it took configs (they are config fields now): named in the message if given.
_OLD_FLAGS = ("--model", "--model_kwargs", "--features", "--batch", "--size", "--dtype")


class MeasurementError(RuntimeError):
    """A child or peer process failed; the message says which and how (exit status 1)."""

    exit_code = cli.EXIT_FAILED


# -------------------------------------------------------------------------------------------------- config


def benchmark_config(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` (the parsed ``--config``) with the peer's one head of one channel: ``targets`` cut to
    the first and ``model.deep_supervision`` (where the model has it) off, unless ``overrides`` (the command line's
    ``{dotted key: value}``, `cli.Command.config_overrides`) set them."""
    c = ml_collections.ConfigDict(config.to_dict())
    if "targets" not in overrides:
        c.targets = tuple(config.targets)[:1]
    if "deep_supervision" in c.model and "model.deep_supervision" not in overrides:
        c.model.deep_supervision = False
    return c


def _check(cmd: cli.Command, config: ml_collections.ConfigDict) -> None:
    """Everything the parent can check before minutes of measuring: the model builds, the peer exists."""
    from anemia_jax.runs import model_factory

    try:
        model_factory.build_model(config)
    except (TypeError, ValueError) as e:
        raise cli.CommandLineError(f"config.model ({cmd.config_file_name()}): {e}") from None
    if cmd.peer:
        peer.check(cmd.peer, cmd.peer_runs, config)


# ----------------------------------------------------------------------------------------------- measuring


def make_step(config: ml_collections.ConfigDict, mesh) -> tuple[Any, Any, Any, dict]:
    """``(model, tx, train_step, abstract_batch)``: the benchmarked train step of ``config`` (`benchmark_config`)
    over ``mesh`` -- the project's own `steps.make_train_step` with the config's model and loss and the peer's
    optimizer -- and the sharded shapes of its batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from anemia_jax.runs import model_factory
    from anemia_jax.training import experiment, steps
    from anemia_jax.utils import parallel

    model = model_factory.build_model(config)
    tx = optax.adam(peer.LEARNING_RATE)  # the peer's optimizer, not the config's (see the module docstring)
    train_step = steps.make_train_step(model, tx, experiment.build_loss(config), mesh,
                                       compute_dtype=jnp.dtype(config.compute_dtype))
    batch_size, channels = config.batch_size, len(config.targets)
    shape = (batch_size, *tuple(config.image_size))
    specs = {"image": (shape + (3,), jnp.uint8), "masks": (shape + (channels,), jnp.uint8),
             "mask_weights": ((batch_size, channels), jnp.float32), "valid": ((batch_size,), jnp.bool_)}
    sharding = parallel.data_sharded(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in specs.items()}
    return model, tx, train_step, abstract_batch


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fixed host batch the step is timed on (seeded random uint8 images, masks 30% foreground)."""
    import numpy as np

    batch_size, channels = config.batch_size, len(config.targets)
    shape = (batch_size, *tuple(config.image_size))
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, shape + (3,), dtype=np.uint8),
        "masks": (rng.random(shape + (channels,)) > 0.7).astype(np.uint8),
        "mask_weights": np.ones((batch_size, channels), np.float32),
        "valid": np.ones((batch_size,), bool),
    }


def _measure(cmd: cli.Command, config: ml_collections.ConfigDict) -> dict:
    """Runs in the child: builds the step, times it (and each phase before the first step), returns the figures."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from anemia_jax.training import experiment
    from anemia_jax.utils import parallel, xla_cpu
    from experiments import model_table

    phases = {"imports": time.perf_counter() - _PROCESS_START}
    if cmd.cache_dir:
        jax.config.update("jax_compilation_cache_dir", cmd.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    mesh = parallel.make_mesh()
    batch_size = config.batch_size
    if batch_size % mesh.size:
        raise cli.CommandLineError(
            f"The global batch (config.batch_size={batch_size}) must be a multiple of the {mesh.size} devices: "
            f"pass --config=...:batch=N with N a multiple of {mesh.size}.")
    model, tx, train_step, abstract_batch = make_step(config, mesh)
    image_size = tuple(config.image_size)

    def compile_train():
        t = time.perf_counter()
        abstract_state = experiment.abstract_train_state(model, tx, image_size, mesh)
        compiled = train_step.lower(abstract_state, abstract_batch).compile()
        return compiled, time.perf_counter() - t

    # The train step compiles from shapes alone, so it need not wait for the parameters: with --overlap it
    # compiles in a background thread (XLA releases the GIL) while they are initialised and the batch is made.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = None if cmd.no_overlap else pool.submit(compile_train)
    t = time.perf_counter()
    host_batch = synthetic_batch(config)
    batch = parallel.host_local_to_global(host_batch, mesh)
    phases["data"] = time.perf_counter() - t
    t = time.perf_counter()
    state = jax.block_until_ready(experiment.init_train_state(config, model, tx, mesh))
    phases["init"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled, compile_s = (pending or pool.submit(compile_train)).result()
    phases["wait_compile_train"] = time.perf_counter() - t
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    phases["first_step_run"] = time.perf_counter() - t
    first_step_s = time.perf_counter() - _PROCESS_START

    # What evaluation adds (a trainer compiles it off the critical path): the forward program of the eval step.
    def forward(variables, images):
        return model.apply(variables, images.astype(jnp.float32) / 255.0, train=False).logits

    sharded_forward = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                                            out_specs=P(parallel.DATA_AXIS)))
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    t = time.perf_counter()
    sharded_forward.lower(variables, batch["image"]).compile()
    phases["compile_eval"] = time.perf_counter() - t

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_device = float(cost.get("flops", float("nan"))) if cost else float("nan")

    rates = []
    if cmd.windows:
        for _ in range(cmd.warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        for _ in range(cmd.windows):
            t = time.perf_counter()
            for _ in range(cmd.steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            rates.append(cmd.steps * batch_size / (time.perf_counter() - t))
    stats = jax.local_devices()[0].memory_stats() or {}
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {
        "framework": "anemia_jax",
        "arch": model_table.model_label(config),
        "config": _config_command(cmd),
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in config.model.to_dict().items()},
        "targets": list(config.targets),
        "loss": config.loss.name,
        "optimizer": f"adam({peer.LEARNING_RATE:g})",
        "batch": batch_size,
        "size": image_size[0] if image_size[0] == image_size[1] else list(image_size),
        "dtype": config.compute_dtype,
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_cpu_flags_added": list(xla_cpu.applied),
        "params": params,
        "images_per_s": statistics.median(rates) if rates else None,
        "window_rates": rates,
        "first_step_s": first_step_s,
        "first_step_phases_s": phases,
        "overlap": not cmd.no_overlap,
        "compile_s": compile_s,
        "step_flops": flops_per_device * mesh.size,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "peak_host_rss_bytes": _peak_rss_bytes(),
        "finite": bool(metrics["finite"]),
    }


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux reports kilobytes, macOS bytes); None where unknown."""
    try:
        import resource  # noqa: PLC0415 -- POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _machine() -> dict:
    """CPU model, cores, Python and library versions of this machine (not the device's)."""
    import platform

    info = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    for package in ("jax", "jaxlib", "flax", "torch"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


# ------------------------------------------------------------------------------------------- child processes


def _flag_text(value: Any) -> str:
    """A typed override value as ``--config.<key>=`` text that parses back to it (tuples as Python literals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def _config_args(cmd: cli.Command) -> list[str]:
    """``--config=<absolute path>[:arg]`` and every ``--config.<key>=<value>`` override given to this command."""
    path, colon, arg = cmd.config_file_name().partition(":")
    return [f"--config={os.path.abspath(os.path.expanduser(path))}{colon}{arg}",
            *(f"--config.{k}={_flag_text(v)}" for k, v in cmd.config_overrides().items())]


def _config_command(cmd: cli.Command) -> str:
    """The config as it was given: ``configs/x.py:arg --config.a=b ...`` (for the record)."""
    return shlex.join([cmd.config_file_name(), *_config_args(cmd)[1:]])


def _run_json(argv: list[str], what: str, env: Mapping[str, str] | None = None) -> dict:
    """Runs ``argv``, returns the JSON object on its last stdout line. Raises `cli.CommandLineError` if the child
    reported an invalid command line or config (exit status 2), else `MeasurementError` after its stderr tail."""
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode:
        try:
            reported = json.loads(last).get("error")
        except (ValueError, AttributeError):
            reported = None
        if out.returncode == cli.EXIT_CONFIG and reported:
            raise cli.CommandLineError(reported)
        sys.stderr.write(out.stderr[-5000:])
        raise MeasurementError(f"{what} failed with exit code {out.returncode}"
                               + (f": {reported}" if reported else " (its output is above)")
                               + f". Command: {shlex.join(argv)}")
    return json.loads(last)


def _child(cmd: cli.Command, cache_dir: str, windows: int) -> dict:
    """Measures in a fresh process (its time to first step is counted from its start) with the same config."""
    argv = [sys.executable, "-m", "experiments.benchmark", "--child", *_config_args(cmd),
            f"--steps={cmd.steps}", f"--windows={windows}", f"--warmup={cmd.warmup}", f"--cache_dir={cache_dir}",
            *(["--no_overlap"] if cmd.no_overlap else [])]
    env = dict(_ENVIRON)
    # `-m experiments.benchmark` must find this checkout whatever the working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return _run_json(argv, "the benchmark's child process", env)


def _peer(cmd: cli.Command, config: ml_collections.ConfigDict, run: str, saved: str = "") -> dict:
    argv = peer.command(cmd.peer, config, run, steps=cmd.steps, windows=cmd.windows, warmup=cmd.warmup,
                        python=cmd.peer_python)
    t = time.perf_counter()
    result = _run_json(argv, f"the PyTorch peer ({run}{saved})")
    result["wall_s"] = time.perf_counter() - t
    return result


def _table(rows: list[dict]) -> str:
    width = max(16, *(len(str(r.get("arch", ""))) + 2 for r in rows))
    head = f"{'implementation':<28}{'arch':<{width}}{'img/s':>9}{'ratio':>8}{'first step s':>14}" \
           f"{'GFLOP/img':>11}{'peak GiB':>10}{'params M':>10}"
    lines = [head, "-" * len(head)]
    ours = rows[0].get("images_per_s") or float("nan")
    for r in rows:
        rate = r.get("images_per_s") or float("nan")
        flops = (r.get("step_flops") or float("nan")) / r["batch"] / 1e9
        peak = (r.get("peak_bytes") or r.get("peak_host_rss_bytes") or float("nan")) / 2**30
        rss = not r.get("peak_bytes") and r.get("peak_host_rss_bytes")
        first = r.get("first_step_s", r.get("compile_s", float("nan")))
        lines.append(f"{r['framework']:<28}{r['arch']:<{width}}{rate:>9.1f}{ours / rate:>8.2f}{first:>14.1f}"
                     f"{flops:>11.1f}{peak:>9.2f}{'*' if rss else ' '}{r['params'] / 1e6:>10.2f}")
    if any(not r.get("peak_bytes") and r.get("peak_host_rss_bytes") for r in rows):
        lines.append("* the process's peak resident memory (this backend reports no device memory)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- command line


def _command() -> cli.Command:
    cmd = cli.Command(PROGRAM, __doc__)
    cmd.config_flag()
    fv = cmd.flags
    flags.DEFINE_integer("steps", 10, "Steps per timed window.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("windows", 5, "Timed windows (the figure is their median).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "Steps before the first window.", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON file for every figure (ours first, then the peer's rows).", flag_values=fv)
    flags.DEFINE_string("peer", None, "Path of peer_bench.py, run beside ours.", flag_values=fv)
    flags.DEFINE_list("peer_runs", list(peer.RUNS), "Peer runs: eager, compile.", flag_values=fv)
    flags.DEFINE_string("peer_python", "", "The Python that runs the peer (default this one; e.g. a separate "
                        "environment with PyTorch).", flag_values=fv)
    flags.DEFINE_bool("no_warm", False, "Skip the second child, which measures the first step with the "
                      "compilation cache the first (cold) one filled.", flag_values=fv)
    flags.DEFINE_bool("no_overlap", False, "Compile the train step after initialising the parameters, not while "
                      "they initialise.", flag_values=fv)
    flags.DEFINE_string("cache_dir", "", "Internal: the child's persistent compilation cache.", flag_values=fv)
    flags.DEFINE_bool("child", False, "Internal: measure in this process and print the JSON row.", flag_values=fv)
    return cmd


def _save(path: str | None, rows: list[dict] | None) -> None:
    """Writes ``rows`` to ``path`` atomically; ``rows=None`` only checks, before minutes of measuring, that its
    folder takes a file (an earlier result at ``path`` stays until this run's first row replaces it)."""
    from anemia_jax.utils import atomic  # noqa: PLC0415

    if path and rows is not None:
        atomic.write_text(path, json.dumps(rows, indent=2) + "\n")
    elif path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), prefix=".benchmark_").close()
        except OSError as e:
            raise atomic.output_error(path, e) from None


def _run(cmd: cli.Command, config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """The parent: ours in child processes (cold, then warm cache), then the peer's runs; saves and prints."""
    from experiments import provenance  # noqa: PLC0415

    _save(cmd.out, None)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anemia_jax_bench_cache_") as cache:
        ours = _child(cmd, cache, cmd.windows)
        ours["config"] = _config_command(cmd)  # as given here (the child's has the absolute path)
        ours["first_step_cold_s"] = ours["first_step_s"]
        ours["first_step_cold_phases_s"] = ours.pop("first_step_phases_s")
        if not cmd.no_warm:
            warm = _child(cmd, cache, 0)
            ours["first_step_warm_s"] = warm["first_step_s"]
            ours["first_step_warm_phases_s"] = warm["first_step_phases_s"]
    ours["command"] = shlex.join(["python", "-m", "experiments.benchmark", *argv[1:]])
    ours["git"] = provenance.git_state()
    ours["machine"] = _machine()
    ours["load_average_before_after"] = [list(load_before)]
    rows = [ours]
    _save(cmd.out, rows)
    if cmd.peer:
        for run in cmd.peer_runs:
            row = _peer(cmd, config, run, saved=f"; the rows before it are in {cmd.out}" if cmd.out else "")
            row.setdefault("framework", f"torch-{run}")
            rows.append(row)
            _save(cmd.out, rows)
    ours["load_average_before_after"].append(list(os.getloadavg()))
    _save(cmd.out, rows)
    for kind in ("cold", "warm"):
        if f"first_step_{kind}_s" in ours:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in ours[f"first_step_{kind}_phases_s"].items())
            print(f"time to first step, {kind} cache: {ours[f'first_step_{kind}_s']:.1f} s ({parts} s; "
                  f"train step compiled {'after initialising' if cmd.no_overlap else 'while initialising'})")
    print(f"load average (1/5/15 min) before {ours['load_average_before_after'][0]}, "
          f"after {ours['load_average_before_after'][1]}")
    print(_table(rows))
    return cli.EXIT_OK


def _with_old_flag_hint(error: cli.CommandLineError, argv: Sequence[str]) -> cli.CommandLineError:
    old = [a.split("=")[0] for a in argv[1:] if a.split("=")[0] in _OLD_FLAGS]
    return cli.CommandLineError(
        f"{error}\n{', '.join(old)}: the model, image size, batch and dtype come from the config now, e.g. "
        "--config=configs/unetpp.py:size=256,batch=32,dtype=bfloat16 (configs/unetpp_resnet34.py for the ResNet-34 "
        "UNet++), --config.model.features=16 for a model field.") if old else error


def main(argv: Sequence[str]) -> int:
    """The benchmark (see the module docstring); ``argv`` has the program name first. Returns the exit status."""
    cmd = _command()
    child = "--child" in argv[1:]
    try:
        try:
            if cmd.parse(argv) is None:
                return cli.EXIT_OK  # --help
        except cli.CommandLineError as e:
            raise _with_old_flag_hint(e, argv) from None
        config = benchmark_config(cmd.config, cmd.config_overrides())
        if cmd.child:
            print(json.dumps(_measure(cmd, config)), flush=True)
            return cli.EXIT_OK
        _check(cmd, config)
        return _run(cmd, config, argv)
    except Exception as e:  # noqa: BLE001 -- known failures become messages; cmd.fail re-raises the rest
        if child and cli.exit_status(e) is not None:
            print(json.dumps({"error": cli.failure_message(e)}), flush=True)  # for the parent to report
        return cmd.fail(e)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
