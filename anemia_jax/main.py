"""Command line entry point: ``python -m anemia_jax.main --config=configs/unetpp.py[:arg] [--workdir=DIR]``.

``--config`` is an `ml_collections` config file, parametrised after a colon (see configs/common.py) and locked, so
``--config.<key>=<value>`` can change any existing field but a mistyped key fails, naming the closest keys
(`anemia_jax.cli`). ``--workdir`` defaults to ``runs/<config file stem>`` (plus the parametrisation, e.g.
``runs/unetpp_data-phantom``); rerunning the same command resumes from the workdir's latest checkpoint.

Multi-host (Cloud TPU pod slices, GPU clusters): run the same command on every host with ``--distributed`` and a
``--workdir`` on storage every host can write (Orbax writes each host's checkpoint shards there). Where JAX detects
no cluster, also pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.

Failures end with a one-paragraph message (what, where, what to do) and no traceback unless ``--verbose``.

Exit status:

| status | meaning |
|---:|---|
| 0 | training completed |
| 1 | a non-finite loss or gradient stopped training (the last good checkpoint is kept) |
| 2 | invalid command line, config file or config value |
| 3 | missing or unusable data, or a prepared dataset built from another source than the one asked for |
| 4 | no usable checkpoint to resume from (all damaged), or the workdir's checkpoints belong to another model |
| 5 | the workdir cannot be written (read-only, full disk) |
| 6 | another trainer holds the workdir (its process id, host and start time are named) |
| 143 | (128 + SIGTERM) stopped by SIGTERM after saving a checkpoint: rerun to resume |
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import flags, logging

from anemia_jax import cli
from anemia_jax.runs import config_lib

EXIT_PREEMPTED = 128 + 15


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.main", __doc__)
    cmd.config_flag()
    fv = cmd.flags
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, TensorBoard events, panels, "
                        "summary.json); default runs/<config name>[_<config argument>]. An existing one is resumed.",
                        flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs; the cluster is "
                      "detected from the environment: Cloud TPU, SLURM, Open MPI, Kubernetes; elsewhere give the "
                      "three flags below).", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "With --distributed where no cluster is detected: host:port of "
                        "process 0, e.g. 10.0.0.1:1234 (default: the JAX_COORDINATOR_ADDRESS environment variable).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes, if not detected.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index in [0, num_processes), if "
                         "not detected.", lower_bound=0, flag_values=fv)
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Trains the config of ``argv`` (program name first; default ``sys.argv``); returns the exit status."""
    cmd = _command()
    try:
        rest = cmd.parse(sys.argv if argv is None else argv)
        if rest is None:
            return cli.EXIT_OK  # --help
        if rest:
            raise cli.CommandLineError(f"Unexpected arguments: {' '.join(rest)}")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    import jax  # noqa: PLC0415 -- deferred: --help and flag errors stay fast

    if cmd.distributed:
        jax.distributed.initialize(coordinator_address=cmd.coordinator_address, num_processes=cmd.num_processes,
                                   process_id=cmd.process_id)
    from anemia_jax.training import train  # noqa: PLC0415

    config = cmd.config
    # The file stem, not config.name: a copied config file gets its own default workdir.
    path, _, arg = cmd.config_file_name().partition(":")
    workdir = cmd.workdir or config_lib.default_workdir(pathlib.Path(path).stem, arg)
    try:
        summary = train.train_and_evaluate(config, workdir)
    except train.NonFiniteError as e:
        logging.error("%s", e)
        return cli.EXIT_FAILED
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail(e)
    return EXIT_PREEMPTED if summary["status"] == "preempted" else cli.EXIT_OK


def run() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
