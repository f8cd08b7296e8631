"""UNet++ pruning: Dice and inference speed of the full network and of its pruned networks L1..L(depth).

    python -m experiments.pruning_table --workdir=<deep-supervised UNet++ run> --out=experiments/results/x \
        [--split=val] [--checkpoint=latest] [--batch=32] [--repeats=5] [--config.<key>=<value>]

One deep-supervised UNet++ (Zhou et al. 2018) is evaluated without retraining as

* the full network (every node; its deepest head X^{0,depth} is the prediction), and
* UNet++ L^k for k = 1..depth: only the nodes X^{i,j} with i + j <= k and the head on X^{0,k}
  (`probabilities.probability_fn(model, prune_level=k)`); L^depth computes every node but one head.

Per row: parameters the row's forward pass uses (counted from the parameter scopes ``X_i_j``, ``up_i_j``,
``head_j``), XLA's FLOP count per image of the compiled inference function, per-image Dice per target on
``--split`` (`anemia_jax.evaluation.evaluator.evaluate_runs`, threshold 0.5), and inference images/s: the median over
``--repeats`` timed calls of a batch of ``--batch`` images at the training resolution held on the devices (after
compilation and one warm-up call; each call ends with ``block_until_ready``).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from anemia_jax import cli
from anemia_jax.evaluation import finished_runs
from anemia_jax.inference import probabilities
from anemia_jax.runs import restore
from anemia_jax.utils import parallel
from experiments import provenance


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


def time_inference(run: restore.Run, probability, *, batch: int, repeats: int) -> tuple[float, float]:
    """(images/s median over ``repeats`` calls, FLOPs per image) of the sharded ``probability`` on a resident
    batch."""
    batch = probabilities.mesh_batch_size(batch, run.mesh)
    rng = np.random.default_rng(0)
    images = parallel.host_local_to_global(
        rng.integers(0, 256, (batch, *run.image_size, 3), dtype=np.uint8), run.mesh)
    compiled = probability.lower(run.variables, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) / batch if cost else float("nan")
    jax.block_until_ready(compiled(run.variables, images))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(run.variables, images))
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times), flops


def pruning_rows(run: restore.Run, *, split: str, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One row per network: 'full', then L1..L(depth)."""
    if run.config.model.name != "unetpp" or not run.config.model.get("deep_supervision", False):
        raise ValueError(f"{run.workdir} is not a deep-supervised UNet++ run (model {run.config.model.name!r}); "
                         "pruned heads are only trained with deep supervision (configs/unetpp.py has it on).")
    depth = int(run.config.model.get("depth", 4))
    params = jax.tree.map(np.asarray, parallel.fetch(run.variables["params"]))
    rows = []
    for level in (None, *range(1, depth + 1)):
        summary = finished_runs.evaluate_runs([run], split=split, prune_level=level, distances=False).summary
        probability = probabilities.sharded(probabilities.probability_fn(run.model, prune_level=level), run.mesh)
        rate, flops = time_inference(run, probability, batch=batch, repeats=repeats)
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


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.pruning_table", __doc__)
    cmd.run_flags(verb="prune", checkpoint_default="latest", tta=False,
                  checkpoint_help="'latest' (default: in K-fold runs 'best' was chosen on the fold it is scored on), "
                                  "'best' or a step.")
    fv = cmd.flags
    flags.DEFINE_enum("split", "val", ["val", "test", "train"], "Split the Dice is measured on.", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "Images per timed call.", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "Timed calls per network.", flag_values=fv)
    flags.DEFINE_string("out", None, "Folder for <name>.md and <name>.json.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("name", "pruning", "Result file name.", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    return cmd


def main(argv: Sequence[str]) -> int:
    start = time.time()
    cmd = _command()
    try:
        if cmd.parse_runs(argv) is None:
            return 0  # --help
        if len(cmd.workdir) != 1:
            raise cli.CommandLineError("Pass exactly one --workdir (a deep-supervised UNet++ run).")
    except cli.CommandLineError as e:
        print(f"pruning_table: {e}", file=sys.stderr)
        return cli.EXIT_CONFIG
    cli.setup_logging()
    run = restore.load_run(cmd.workdir[0], checkpoint=cmd.checkpoint, config=cmd.run_configs()[0])
    rows = pruning_rows(run, split=cmd.split, batch=cmd.batch, repeats=cmd.repeats)
    h, w = run.image_size
    body = (f"One deep-supervised UNet++ ({run.workdir}, checkpoint step {run.step}, {cmd.checkpoint}) at {h}x{w}; "
            f"Dice: mean ± std over the {rows[0]['num_images']} images of its {cmd.split} split; images/s: median of "
            f"{cmd.repeats} calls on a batch of {cmd.batch} on {run.mesh.size} {jax.default_backend()} device(s).\n\n"
            + format_rows(rows))
    data = {"rows": rows, "workdir": str(run.workdir), "step": run.step}
    path = provenance.write_results(cmd.out, cmd.name, "UNet++ pruning", body, data,
                                    provenance.record(argv[1:], time.time() - start, "-m experiments.pruning_table"),
                                    cmd.note)
    print(body)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
