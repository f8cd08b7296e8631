"""What the train step's compile time is made of: one step program lowered and compiled, no persistent cache.

    PYTHONPATH=. [NDEV=1] [NOAUG=1] python experiments/results/first_step/compile_breakdown.py ARCH SIZE OPTIMIZER [CONFIG_ARGS]

OPTIMIZER: ``trainer`` (the trainer's clip + masked AdamW), ``adam`` (the benchmark's), ``sgd``, ``flat_trainer`` /
``flat_adam`` (the same under ``optax.flatten``: one vector instead of one update per parameter leaf). ``NDEV``
devices of the mesh (the fake CPU devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``); ``NOAUG=1``
leaves augmentation out of the step, as the benchmark does. Prints lowering and compile seconds and the number of
fusions in the optimised program. Figures: README.md here ("A second look at the compile").
"""
import collections
import os
import re
import sys
import time

from anemia_jax.utils import xla_cpu

xla_cpu.apply()

import jax  # noqa: E402
import optax  # noqa: E402

from anemia_jax.runs import config_lib, model_factory  # noqa: E402
from anemia_jax.training import experiment, optim, steps  # noqa: E402
from anemia_jax.utils import parallel  # noqa: E402
from experiments import benchmark  # noqa: E402

arch, size, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
extra = sys.argv[4] if len(sys.argv) > 4 else ""
cfg = benchmark.benchmark_config(
    config_lib.load_config_file(f"configs/{arch}.py:size={size},batch=8,dtype=float32{extra}"), {})
mesh = parallel.make_mesh(jax.devices()[:int(os.environ.get("NDEV", "1"))])
model = model_factory.build_model(cfg)
trainer_tx = optim.make_optimizer(cfg.optimizer, total_steps=100, warmup_steps=10)[0]
tx = {"adam": lambda: optax.adam(1e-3), "sgd": lambda: optax.sgd(1e-3), "trainer": lambda: trainer_tx,
      "flat_trainer": lambda: optax.flatten(trainer_tx), "flat_adam": lambda: optax.flatten(optax.adam(1e-3))}[variant]()
augment = None if os.environ.get("NOAUG") else config_lib.load_config_file(f"configs/{arch}.py:size={size}{extra}").augment
step = steps.make_train_step(model, tx, experiment.build_loss(cfg), mesh, augment_config=augment)
abstract_batch = benchmark.make_step(cfg, mesh)[3]
abstract_state = experiment.abstract_train_state(model, tx, tuple(cfg.image_size), mesh)
start = time.perf_counter()
lowered = step.lower(abstract_state, abstract_batch)
lower_s = time.perf_counter() - start
start = time.perf_counter()
compiled = lowered.compile()
compile_s = time.perf_counter() - start
hlo = compiled.as_text()
kinds = collections.Counter(re.findall(r"kind=(k\w+)", hlo))
print(f"{arch} {size} {variant} devices={mesh.size} augment={augment is not None}: "
      f"{len(jax.tree.leaves(abstract_state.params))} parameter leaves, lower {lower_s:.2f} s, compile {compile_s:.2f} s, "
      f"{hlo.count(' fusion(')} fusions {dict(kinds)}")
