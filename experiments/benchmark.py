"""Training-step throughput benchmark (not a test): images/s, time to first step, memory, FLOPs.

Measures the project's own jitted, data-parallel `train_step` (anemia_jax.steps) on whatever devices
exist, on a synthetic batch held in device memory (no input pipeline, no augmentation: the same work
as the PyTorch peer in ../shared/tools/peer_bench.py):

* images/s: median over ``--windows`` timed windows of ``--steps`` steps each, after ``--warmup``
  steps, every window closed with ``block_until_ready``;
* time to first step: from the start of this process (before ``import jax``) to the first finished
  step, measured in a child process twice -- once with an empty persistent compilation cache (cold)
  and once with the cache the first child filled (warm) -- with where it went: imports, making the
  batch, parameter initialisation (``create_train_state``), the wait for the train step's compilation,
  the first step's run; and, after it, the compilation of the eval step's forward program (what a
  trainer adds before its first evaluation). The train step compiles from the state's shapes alone
  (``jax.eval_shape``), in a background thread while the parameters initialise (``--no_overlap``:
  after them, as a trainer that compiles from the real state does);
* peak device memory (``memory_stats()['peak_bytes_in_use']``, where the backend reports it);
* FLOPs per step from the compiled program's ``cost_analysis()`` (summed over devices).

Usage::

    python experiments/benchmark.py --model=unetpp --batch=32 --size=256 --dtype=bfloat16 \
        --out=bench.json [--peer=../shared/tools/peer_bench.py --peer_runs=eager,compile]

Prints a table last and writes every figure as JSON to ``--out``.

``--model`` is a registered model or a preset of `PRESETS` (``unetpp_resnet34``: smp's UnetPlusPlus('resnet34'), run
beside ``peer_bench.py smp``; ``segformer_b0``, ``transunet``, ...); ``--model_kwargs=encoder=resnet50,...`` sets
further model fields.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# Preset name -> (registered model, its fields). Registered names are accepted as they are.
PRESETS = {
    "unet_resnet34": ("unet", {"encoder": "resnet34"}),
    "unetpp_resnet34": ("unetpp", {"encoder": "resnet34"}),
    "unetpp_resnet50": ("unetpp", {"encoder": "resnet50"}),
    "segformer_b0": ("segformer", {"variant": "b0"}),
    "segformer_b1": ("segformer", {"variant": "b1"}),
    "segformer_b2": ("segformer", {"variant": "b2"}),
}
MODELS = ["unet", "unetpp", "attention_unet", "segformer", "transunet", "transunet_vit", *PRESETS]


def model_and_kwargs(args: argparse.Namespace) -> tuple[str, dict]:
    """The registered model name and its fields for ``--model`` (a preset or a name) and ``--model_kwargs``."""
    import ast  # noqa: PLC0415

    name, kwargs = PRESETS.get(args.model, (args.model, {}))
    for item in filter(None, args.model_kwargs.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    if args.features:
        kwargs["features"] = args.features
    return name, kwargs


def _abstract_state(model, tx, image_shape: tuple[int, ...], mesh):
    """The train state's shapes, dtypes and (replicated) shardings, without computing a parameter."""
    import jax
    import jax.numpy as jnp

    from anemia_jax import parallel, steps

    def build(key):
        init_key, dropout_key, train_key = jax.random.split(key, 3)
        variables = model.init({"params": init_key, "dropout": dropout_key},
                               jnp.zeros((1,) + tuple(image_shape[1:]), jnp.float32), train=False)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}),
                                opt_state=tx.init(variables["params"]), rng=jax.random.key_data(train_key))

    replicated = parallel.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        jax.eval_shape(build, jax.random.key(0)))


def _measure(args: argparse.Namespace) -> dict:
    """Runs in the child: builds the step, times it (and each phase before the first step), returns the figures."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    from anemia_jax import losses, parallel, steps, xla_cpu
    from anemia_jax.models import get_model

    phases = {"imports": time.perf_counter() - _PROCESS_START}
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    mesh = parallel.make_mesh()
    if args.batch % mesh.size:
        raise SystemExit(f"--batch={args.batch} must be a multiple of the {mesh.size} devices.")
    dtype = jnp.dtype(args.dtype)
    name, kwargs = model_and_kwargs(args)
    model = get_model(name, num_classes=1, dtype=dtype, bn_axis_name=parallel.DATA_AXIS, **kwargs)
    tx = optax.adam(1e-3)
    loss = losses.get_loss("combo")
    train_step = steps.make_train_step(model, tx, lambda out, y, w: loss(out.logits, y, weights=w), mesh,
                                       compute_dtype=dtype)
    shape = (args.batch, args.size, args.size)
    specs = {"image": (shape + (3,), jnp.uint8), "masks": (shape + (1,), jnp.uint8),
             "mask_weights": ((args.batch, 1), jnp.float32), "valid": ((args.batch,), jnp.bool_)}
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=parallel.data_sharded(mesh)) for k, (s, d) in specs.items()}

    def compile_train():
        t = time.perf_counter()
        compiled = train_step.lower(_abstract_state(model, tx, shape + (3,), mesh), abstract_batch).compile()
        return compiled, time.perf_counter() - t

    # The train step compiles from shapes alone, so it need not wait for the parameters: with --overlap it
    # compiles in a background thread (XLA releases the GIL) while they are initialised and the batch is made.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(compile_train) if args.overlap else None
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.integers(0, 256, shape + (3,), dtype=np.uint8),
        "masks": (rng.random(shape + (1,)) > 0.7).astype(np.uint8),
        "mask_weights": np.ones((args.batch, 1), np.float32),
        "valid": np.ones((args.batch,), bool),
    }
    batch = parallel.host_local_to_global(host_batch, mesh)
    phases["data"] = time.perf_counter() - t
    t = time.perf_counter()
    state = jax.block_until_ready(steps.create_train_state(model, tx, jax.random.key(0), host_batch["image"], mesh))
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
    if args.windows:
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        for _ in range(args.windows):
            t = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            rates.append(args.steps * args.batch / (time.perf_counter() - t))
    stats = jax.local_devices()[0].memory_stats() or {}
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {
        "framework": "anemia_jax",
        "arch": args.model,
        "batch": args.batch,
        "size": args.size,
        "dtype": args.dtype,
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
        "overlap": args.overlap,
        "compile_s": compile_s,
        "step_flops": flops_per_device * mesh.size,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "finite": bool(metrics["finite"]),
    }


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


def _run_json(cmd: list[str]) -> dict:
    """Runs `cmd`, returns the JSON object on its last stdout line; its stderr is shown on failure."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr[-5000:])
        raise SystemExit(f"benchmark: {' '.join(cmd)} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(args: argparse.Namespace, cache_dir: str, windows: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--model={args.model}",
           f"--batch={args.batch}", f"--size={args.size}", f"--dtype={args.dtype}",
           f"--steps={args.steps}", f"--windows={windows}", f"--warmup={args.warmup}",
           f"--features={args.features}", f"--model_kwargs={args.model_kwargs}", f"--cache_dir={cache_dir}"]
    cmd += [] if args.overlap else ["--no_overlap"]
    return _run_json(cmd)


def _peer(args: argparse.Namespace, run: str) -> dict:
    name, kwargs = model_and_kwargs(args)
    # smp's Unet/UnetPlusPlus('resnet34') is the peer of our ResNet-34 decoders, the plain PyTorch models otherwise.
    framework = "smp" if kwargs.get("encoder") == "resnet34" else "torch"
    if name not in ("unet", "unetpp") or kwargs.get("encoder") not in (None, "resnet34"):
        raise SystemExit(f"benchmark: no PyTorch peer for --model={args.model} {kwargs}; drop --peer.")
    cmd = [sys.executable, args.peer, framework, "--arch", name, "--batch", str(args.batch),
           "--size", str(args.size), "--steps", str(args.steps), "--windows", str(args.windows),
           "--warmup", str(args.warmup)]
    cmd += ["--compile"] if run == "compile" else []
    cmd += [] if args.dtype == "bfloat16" else ["--fp32"]
    t = time.perf_counter()
    result = _run_json(cmd)
    result["wall_s"] = time.perf_counter() - t
    return result


def _table(rows: list[dict]) -> str:
    head = f"{'implementation':<28}{'arch':<16}{'img/s':>9}{'ratio':>8}{'first step s':>14}" \
           f"{'GFLOP/img':>11}{'peak GiB':>10}{'params M':>10}"
    lines = [head, "-" * len(head)]
    ours = rows[0].get("images_per_s") or float("nan")
    for r in rows:
        rate = r.get("images_per_s") or float("nan")
        flops = (r.get("step_flops") or float("nan")) / r["batch"] / 1e9
        peak = (r.get("peak_bytes") or float("nan")) / 2**30
        first = r.get("first_step_s", r.get("compile_s", float("nan")))
        lines.append(f"{r['framework']:<28}{r['arch']:<16}{rate:>9.1f}{ours / rate:>8.2f}{first:>14.1f}"
                     f"{flops:>11.1f}{peak:>10.2f}{r['params'] / 1e6:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unetpp", choices=MODELS, help="a registered model or a preset")
    p.add_argument("--model_kwargs", default="", help="extra model fields, e.g. encoder=resnet50,variant=b1")
    p.add_argument("--features", type=int, default=0, help="first-level width; 0 keeps the model's default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for every figure")
    p.add_argument("--peer", default=None, help="path to peer_bench.py, run beside ours")
    p.add_argument("--peer_runs", default="eager,compile", help="comma list of eager, compile")
    p.add_argument("--no_warm", action="store_true", help="skip the warm-cache first-step run")
    p.add_argument("--no_overlap", dest="overlap", action="store_false",
                   help="compile the train step after initialising the parameters, not during it")
    p.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(args)), flush=True)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anemia_jax_bench_cache_") as cache:
        ours = _child(args, cache, args.windows)
        ours["first_step_cold_s"] = ours["first_step_s"]
        ours["first_step_cold_phases_s"] = ours.pop("first_step_phases_s")
        if not args.no_warm:
            warm = _child(args, cache, 0)
            ours["first_step_warm_s"] = warm["first_step_s"]
            ours["first_step_warm_phases_s"] = warm["first_step_phases_s"]
    import provenance  # experiments/provenance.py: this script's own folder is on sys.path

    ours["command"] = " ".join(["python", *sys.argv])
    ours["git"] = provenance.git_state()
    ours["machine"] = _machine()
    ours["load_average_before_after"] = [list(load_before)]
    rows = [ours]
    if args.peer:
        for run in filter(None, args.peer_runs.split(",")):
            peer = _peer(args, run)
            peer.setdefault("framework", f"torch-{run}")
            rows.append(peer)
    ours["load_average_before_after"].append(list(os.getloadavg()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    for kind in ("cold", "warm"):
        if f"first_step_{kind}_s" in ours:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in ours[f"first_step_{kind}_phases_s"].items())
            print(f"time to first step, {kind} cache: {ours[f'first_step_{kind}_s']:.1f} s ({parts} s; "
                  f"train step compiled {'while initialising' if args.overlap else 'after initialising'})")
    print(f"load average (1/5/15 min) before {ours['load_average_before_after'][0]}, "
          f"after {ours['load_average_before_after'][1]}")
    print(_table(rows))


if __name__ == "__main__":
    main()
