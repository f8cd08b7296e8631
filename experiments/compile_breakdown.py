"""What the train step's compile time is made of (issue 21, time to first step): one step program, lowered and
compiled cold (no persistent cache), each variant in a fresh process of its own, all in one run.

    python -m experiments.compile_breakdown --out=experiments/results/first_step [--repeats=2] [--only=NAME,...]

Variants (`VARIANTS`): U-Net at 128 px, batch 8, float32, 1 device, no augmentation (the benchmark's step) with the
trainer's optimizer (global-norm clipping + masked AdamW), the benchmark's ``optax.adam``, ``optax.sgd`` (no
optimizer state), both optimizers under ``optax.flatten`` (one vector update instead of one per parameter leaf),
and ``optax.adam`` with ``--xla_cpu_use_fusion_emitters=false``; the tiny UNet++ of the tests
(``configs/unetpp.py:data=phantom,test``, 32 px, 4 devices) with and without the config's augmentation. Each row: the
lowering and compile seconds, the process CPU seconds of the compile (above the wall time when XLA compiles on several
cores), the number of fusions in the optimised program, the parameter leaves. Writes ``compile_breakdown.md`` /
``.json`` with the run's provenance (`experiments.provenance`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from experiments import provenance

UNET = {"arch": "unet", "size": 128, "extra": "", "devices": 1, "augment": False, "xla_flags": ""}
TINY = {"arch": "unetpp", "size": 32, "extra": ",data=phantom,test", "devices": 4, "xla_flags": ""}
VARIANTS: dict[str, dict[str, Any]] = {
    "unet_trainer_optimizer": {**UNET, "optimizer": "trainer"},
    "unet_adam": {**UNET, "optimizer": "adam"},
    "unet_sgd": {**UNET, "optimizer": "sgd"},
    "unet_flat_trainer_optimizer": {**UNET, "optimizer": "flat_trainer"},
    "unet_flat_adam": {**UNET, "optimizer": "flat_adam"},
    "unet_adam_no_fusion_emitters": {**UNET, "optimizer": "adam",
                                     "xla_flags": "--xla_cpu_use_fusion_emitters=false"},
    "tiny_unetpp_augment": {**TINY, "optimizer": "trainer", "augment": True},
    "tiny_unetpp_no_augment": {**TINY, "optimizer": "trainer", "augment": False},
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(variant: Mapping[str, Any]) -> dict[str, Any]:
    """Lowers and compiles ``variant``'s train step in this process (whose XLA flags the parent set)."""
    from anemia_jax.utils import xla_cpu  # noqa: PLC0415 -- before JAX starts, as the commands do

    xla_cpu.apply()
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from anemia_jax.runs import config_lib, model_factory  # noqa: PLC0415
    from anemia_jax.training import experiment, optim, steps  # noqa: PLC0415
    from anemia_jax.utils import parallel  # noqa: PLC0415
    from experiments import benchmark  # noqa: PLC0415

    config_arg = f"configs/{variant['arch']}.py:size={variant['size']},batch=8,dtype=float32{variant['extra']}"
    source = config_lib.load_config_file(config_arg)
    config = benchmark.benchmark_config(config_lib.load_config_file(config_arg), {})
    mesh = parallel.make_mesh(jax.devices()[:variant["devices"]])
    model = model_factory.build_model(config)
    trainer_tx = optim.make_optimizer(config.optimizer, total_steps=100, warmup_steps=10)[0]
    tx = {"trainer": trainer_tx, "adam": optax.adam(1e-3), "sgd": optax.sgd(1e-3),
          "flat_trainer": optax.flatten(trainer_tx), "flat_adam": optax.flatten(optax.adam(1e-3))}[variant["optimizer"]]
    step = steps.make_train_step(model, tx, experiment.build_loss(config), mesh,
                                 augment_config=source.augment if variant["augment"] else None)
    abstract_batch = benchmark.make_step(config, mesh)[3]
    abstract_state = experiment.abstract_train_state(model, tx, tuple(config.image_size), mesh)
    start = time.perf_counter()
    lowered = step.lower(abstract_state, abstract_batch)
    lower_s = time.perf_counter() - start
    cpu, start = _cpu_seconds(), time.perf_counter()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu
    hlo = compiled.as_text()
    return {"config": config_arg, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
            "compile_cpu_s": round(compile_cpu_s, 2), "fusions": hlo.count(" fusion("),
            "parameter_leaves": len(jax.tree.leaves(abstract_state.params))}


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table, one line per measurement."""
    lines = ["| variant | optimizer | devices | augmentation | XLA flag | lower s | compile s | compile CPU s "
             "| fusions |", "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        v = VARIANTS[r["variant"]]
        lines.append(f"| {r['variant']} | {v['optimizer']} | {v['devices']} | {'yes' if v['augment'] else 'no'} | "
                     f"{v['xla_flags'] or '-'} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['compile_cpu_s']:.2f} "
                     f"| {r['fusions']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    if flags.FLAGS.child:
        print("ROW " + json.dumps(measure(VARIANTS[flags.FLAGS.child])))
        return 0
    names = flags.FLAGS.only.split(",") if flags.FLAGS.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"Unknown variant(s) {unknown}; the variants are {list(VARIANTS)}.", file=sys.stderr)
        return 2
    start, load_before, rows = time.perf_counter(), os.getloadavg(), []
    for repeat in range(flags.FLAGS.repeats):
        for name in names:  # interleaved, so that a change of load touches every variant alike
            variant = VARIANTS[name]
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={variant['devices']} {variant['xla_flags']}")
            done = subprocess.run([sys.executable, "-m", "experiments.compile_breakdown", f"--child={name}"],
                                  capture_output=True, text=True, env=env, cwd=provenance.REPO, timeout=900)
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode or not found:
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append({"variant": name, "repeat": repeat, **variant, **json.loads(found[0])})
            print(f"{name}: lower {rows[-1]['lower_s']} s, compile {rows[-1]['compile_s']} s "
                  f"(CPU {rows[-1]['compile_cpu_s']} s), {rows[-1]['fusions']} fusions", flush=True)
    prov = {**provenance.record(argv[1:], time.perf_counter() - start, "-m experiments.compile_breakdown"),
            "load_average_before_after": [load_before, os.getloadavg()]}
    path = provenance.write_results(flags.FLAGS.out, "compile_breakdown",
                                    "The train step's compile, variant by variant", table(rows), {"rows": rows}, prov)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("out", "experiments/results/first_step", "Folder of compile_breakdown.md / .json.")
    flags.DEFINE_integer("repeats", 2, "Rounds over the variants.")
    flags.DEFINE_string("only", "", "Comma-separated variant names (default: all).")
    flags.DEFINE_string("child", "", "Internal: measure this variant in this process and print its row.")
    app.run(lambda argv: sys.exit(main(argv)))
