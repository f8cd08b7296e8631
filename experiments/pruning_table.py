"""UNet++ pruning: Dice and inference speed of the full network and of its pruned networks L1..L(depth).

    python experiments/pruning_table.py --workdir=<deep-supervised UNet++ run> --out=experiments/results/x \
        [--split=val] [--checkpoint=latest] [--batch=32] [--repeats=5]

One deep-supervised UNet++ (Zhou et al. 2018) is evaluated without retraining as

* the full network (every node; its deepest head X^{0,depth} is the prediction), and
* UNet++ L^k for k = 1..depth: only the nodes X^{i,j} with i + j <= k and the head on X^{0,k}
  (`steps.make_predict_fn(prune_level=k)`); L^depth computes every node but one head.

Per row: parameters the row's forward pass uses (counted from the parameter scopes ``X_i_j``, ``up_i_j``,
``head_j``), XLA's FLOP count per image of the compiled inference function, per-image Dice per target on
``--split`` (`anemia_jax.evaluate.evaluate_run`, threshold 0.5), and inference images/s: the median over
``--repeats`` timed calls of a batch of ``--batch`` images at the training resolution held on the devices (after
compilation and one warm-up call; each call ends with ``block_until_ready``).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from anemia_jax import evaluate, parallel, run_lib  # noqa: E402
from experiments import provenance  # noqa: E402


def parameter_count(params: Any, level: int | None) -> int:
    """Parameters used by UNet++ L^level (None: the full network with every head)."""
    total = 0
    for scope, tree in params.items():
        size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        if level is None:
            total += size
            continue
        node = re.fullmatch(r"(?:X|up)_(\d+)_(\d+)", scope)
        head = re.fullmatch(r"head_(\d+)", scope)
        if node:
            total += size if int(node.group(1)) + int(node.group(2)) <= level else 0
        elif head:
            total += size if int(head.group(1)) == level else 0
        else:
            raise ValueError(f"Unexpected UNet++ parameter scope {scope!r}; cannot attribute it to a pruning level.")
    return total


def time_inference(run: run_lib.Run, probability, *, batch: int, repeats: int) -> tuple[float, float]:
    """(images/s median over ``repeats`` calls, FLOPs per image) of ``probability`` on a resident batch."""
    batch = run_lib.mesh_batch_size(batch, run.mesh)
    rng = np.random.default_rng(0)
    images = parallel.host_local_to_global(
        rng.integers(0, 256, (batch, *run.image_size, 3), dtype=np.uint8), run.mesh)
    compiled = probability.lower(run.state, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) / batch if cost else float("nan")
    jax.block_until_ready(compiled(run.state, images))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(run.state, images))
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times), flops


def pruning_rows(run: run_lib.Run, *, split: str, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One row per network: 'full', then L1..L(depth)."""
    if run.config.model.name != "unetpp" or not run.config.model.get("deep_supervision", False):
        raise ValueError(f"{run.workdir} is not a deep-supervised UNet++ run (model {run.config.model.name!r}); "
                         "pruned heads are only trained with deep supervision (configs/unetpp.py has it on).")
    depth = int(run.config.model.get("depth", 4))
    params = jax.tree.map(np.asarray, parallel.fetch(run.state.params))
    rows = []
    for level in (None, *range(1, depth + 1)):
        _, summary = evaluate.evaluate_run(run, split=split, prune_level=level, distances=False)
        rate, flops = time_inference(run, run_lib.make_probability_fn(run, prune_level=level), batch=batch,
                                     repeats=repeats)
        rows.append({"network": "full" if level is None else f"L{level}", "prune_level": level,
                     "parameters": parameter_count(params, level), "gflops_per_image": flops / 1e9,
                     "images_per_s": rate, "num_images": summary["num_images"],
                     "dice": {t: s["dice"] for t, s in summary["targets"].items()}})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    targets = list(rows[0]["dice"])
    lines = ["| network | parameters | GFLOPs / image | images/s | " + " | ".join(f"Dice {t}" for t in targets) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(targets)]
    for r in rows:
        dice = " | ".join(f"{r['dice'][t]['mean']:.4f} ± {r['dice'][t]['std']:.4f}" for t in targets)
        lines.append(f"| {r['network']} | {r['parameters']:,} | {r['gflops_per_image']:.3f} | "
                     f"{r['images_per_s']:.1f} | {dice} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    start = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="A deep-supervised UNet++ training run.")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--checkpoint", default="latest", help="'latest' (default), 'best' or a step.")
    p.add_argument("--batch", type=int, default=32, help="Images per timed call.")
    p.add_argument("--repeats", type=int, default=5, help="Timed calls per network.")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="pruning")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    run = run_lib.load_run(args.workdir, checkpoint=args.checkpoint)
    rows = pruning_rows(run, split=args.split, batch=args.batch, repeats=args.repeats)
    h, w = run.image_size
    body = (f"One deep-supervised UNet++ ({run.workdir}, checkpoint step {run.step}, {args.checkpoint}) at {h}x{w}; "
            f"Dice: mean ± std over the {rows[0]['num_images']} images of its {args.split} split; images/s: median of "
            f"{args.repeats} calls on a batch of {args.batch} on {run.mesh.size} {jax.default_backend()} device(s).\n\n"
            + format_rows(rows))
    data = {"rows": rows, "workdir": str(run.workdir), "step": run.step}
    path = provenance.write_results(args.out, args.name, "UNet++ pruning", body, data,
                                    provenance.record(argv, time.time() - start, "experiments/pruning_table.py"),
                                    args.note)
    print(body)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
