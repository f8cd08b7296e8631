"""Training curves of finished (or running) runs as one PNG: training loss and validation Dice against the step.

    python -m experiments.training_curves --workdir=runs/unet --workdir=runs/unetpp \
        [--labels=U-Net,UNet++] [--metric=dice/mean] [--title=...] --out=curves.png

Reads each run's ``metrics.jsonl`` (a last line cut short by a kill is skipped) and draws it with
`anemia_jax.evaluation.plots.training_curves` (needs matplotlib: ``pip install -e '.[report]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from etils import epath

from anemia_jax import cli
from anemia_jax.evaluation import plots
from experiments import provenance


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``; raises `cli.CommandLineError` if the run has none."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise cli.CommandLineError(f"{workdir} has no metrics.jsonl: pass the directory of a training run.")
    return provenance.read_jsonl(path)


def main(argv: Sequence[str]) -> int:
    cmd = cli.Command("python -m experiments.training_curves", __doc__)
    fv = cmd.flags
    flags.DEFINE_multi_string("workdir", [], "A training run directory (repeat for several runs).", flag_values=fv)
    flags.DEFINE_list("labels", [], "One legend label per --workdir (default: the directory names).", flag_values=fv)
    flags.DEFINE_string("metric", "dice/mean", "Validation metric drawn.", flag_values=fv)
    flags.DEFINE_string("title", "", "Figure title.", flag_values=fv)
    flags.DEFINE_string("out", None, "PNG file to write.", flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
        if not cmd.workdir:
            raise cli.CommandLineError("Pass at least one --workdir=RUN.")
        labels = cmd.labels or [epath.Path(w).name for w in cmd.workdir]
        if len(labels) != len(cmd.workdir):
            raise cli.CommandLineError(f"--labels has {len(labels)} entries for {len(cmd.workdir)} --workdir.")
        runs = {label: read_metrics(w) for label, w in zip(labels, cmd.workdir)}
        path = plots.training_curves(runs, cmd.out, metric=cmd.metric, title=cmd.title)
    except Exception as e:  # noqa: BLE001 -- cmd.fail re-raises anything that is not a known failure
        return cmd.fail(e)
    print(f"Wrote {path}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
