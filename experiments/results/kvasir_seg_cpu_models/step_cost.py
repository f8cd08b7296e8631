"""The planning measurement behind run.sh's widths: CPU time (process_time) and wall time of one train step per
model, batch 8, 128x128, float32, deep supervision kept (UNet++), on a synthetic batch (experiments.benchmark's
make_step: the config's loss, Adam; no input pipeline, no augmentation). One process, models in turn: 2 warm-up
steps, then 8 timed steps. Run from the repository root (it was run niced, beside other work; step_cost.jsonl holds
its output, with the load average at each row):

    PYTHONPATH=$PWD nice -n 19 python experiments/results/kvasir_seg_cpu_models/step_cost.py [case ...]
"""
import importlib
import json
import os
import sys
import time

from anemia_jax.utils import xla_cpu

xla_cpu.apply()  # the commands' CPU flag, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from anemia_jax.training import experiment  # noqa: E402
from anemia_jax.utils import parallel  # noqa: E402
from experiments import benchmark  # noqa: E402

TRANS = dict(hidden_size=192, num_layers=4, num_heads=3, mlp_dim=768, resnet_layers=(2, 2, 2), resnet_width=32,
             decoder_channels=(128, 64, 32, 16), head_channels=256)
CASES = {
    "unet16": ("unet", dict(features=16)),
    "unet20": ("unet", dict(features=20)),
    "unet24": ("unet", dict(features=24)),
    "unet32": ("unet", dict(features=32)),
    "unetpp12": ("unetpp", dict(features=12)),
    "unetpp14": ("unetpp", dict(features=14)),
    "unetpp16": ("unetpp", dict(features=16)),
    "attunet16": ("attention_unet", dict(features=16)),
    "attunet20": ("attention_unet", dict(features=20)),
    "attunet24": ("attention_unet", dict(features=24)),
    "r34": ("unet_resnet34", {}),
    "segformer": ("segformer", {}),
    "transunet_red": ("transunet", TRANS),
}
ORDER = ["unet16", "unet24", "unet32", "unetpp16", "attunet16", "attunet24", "r34", "segformer", "transunet_red"]


def main(names):
    mesh = parallel.make_mesh()
    for name in names:
        config_name, fields = CASES[name]
        config = importlib.import_module(f"configs.{config_name}").get_config(
            "data=kvasir,size=128,batch=8,dtype=float32")
        for k, v in fields.items():
            config.model[k] = v
        model, tx, step, abstract = benchmark.make_step(config, mesh)
        state = experiment.init_train_state(config, model, tx, mesh)
        batch = parallel.host_local_to_global(benchmark.synthetic_batch(config), mesh)
        t0 = time.perf_counter()
        compiled = step.lower(experiment.abstract_train_state(model, tx, (128, 128), mesh), abstract).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        n = 8
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        c1, w1 = time.process_time(), time.perf_counter()
        params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        print(json.dumps(dict(name=name, params=params, cpu_s_per_step=(c1 - c0) / n, wall_s_per_step=(w1 - w0) / n,
                              compile_s=compile_s, gflop_step=float(cost.get("flops", 0)) / 1e9,
                              load=os.getloadavg())), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ORDER)
