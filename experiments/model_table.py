"""Parameters and forward GFLOPs per image of every registered model (and encoder variant), as a markdown table.

    python experiments/model_table.py [--size=256]

FLOPs are XLA's count for one 1x3xSxS forward pass in evaluation mode (float32, one output channel), read from
``jax.jit(apply).lower(...).cost_analysis()`` on abstract variables: nothing is compiled or run, so the table costs
seconds on a CPU. A multiply-add counts as 2 FLOPs (papers quoting "GFLOPs" as multiply-adds give half).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from anemia_jax.models import MODELS, get_model

VARIANTS = {
    "unet": [{}, {"encoder": "resnet18"}, {"encoder": "resnet34"}, {"encoder": "resnet50"}],
    "unetpp": [{}, {"encoder": "resnet18"}, {"encoder": "resnet34"}, {"encoder": "resnet50"}],
    "segformer": [{"variant": "b0"}, {"variant": "b1"}, {"variant": "b2"}],
}


def measure(name: str, kwargs: dict, size: int) -> tuple[int, float]:
    """``(parameters, forward GFLOPs per image)`` of ``get_model(name, **kwargs)`` at ``size``x``size``."""
    model = get_model(name, num_classes=1, **kwargs)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False).logits).lower(variables, images)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return params, float(cost["flops"]) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    print(f"| model | fields | parameters | GFLOPs/image at {args.size}² (forward) |")
    print("|---|---|---:|---:|")
    for name in MODELS.names():
        for kwargs in VARIANTS.get(name, [{}]):
            params, gflops = measure(name, kwargs, args.size)
            fields = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
            print(f"| `{name}` | {fields} | {params:,} | {gflops:.1f} |", flush=True)


if __name__ == "__main__":
    main()
