"""Command line entry point: ``python -m anemia_jax.main --config=configs/unetpp.py[:arg] [--workdir=DIR]``.

``--config`` is an `ml_collections` config file, parametrised after a colon (see configs/common.py) and locked, so
``--config.<key>=<value>`` can change any existing field but a mistyped key fails, naming the closest keys.
``--workdir`` defaults to ``runs/<config file stem>`` (plus the parametrisation, e.g. ``runs/unetpp_data-phantom``);
rerunning the same command resumes from the workdir's latest checkpoint.

Multi-host (Cloud TPU pod slices, GPU clusters): run the same command on every host with ``--distributed`` and a
``--workdir`` on storage every host can write (Orbax writes each host's checkpoint shards there). Where JAX detects
no cluster, also pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.

Exit status: 0 when training completed; 143 (128 + SIGTERM) after a preemption checkpoint (rerun to resume);
1 on a non-finite loss; 2 for an invalid config or command line, or missing dataset files.
"""

from __future__ import annotations

import logging as pylogging
import os
import pathlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from anemia_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally parametrised: configs/unetpp.py:data=phantom,size=256.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics.jsonl, panels, summary.json); default "
    "runs/<config name>[_<config argument>]. An existing one is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs; the cluster is detected from "
    "the environment: Cloud TPU, SLURM, Open MPI, Kubernetes; elsewhere give the three flags below).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed where no cluster is detected: host:port of process 0, "
    "e.g. 10.0.0.1:1234 (default: the JAX_COORDINATOR_ADDRESS environment variable).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes, if not "
                                      "detected.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index in "
                                   "[0, num_processes), if not detected.", lower_bound=0)
flags.mark_flag_as_required("config")

EXIT_PREEMPTED = 128 + 15


def _override_keys(argv: list[str]) -> list[str]:
    """The dotted keys of ``--config.<key>[=value]`` arguments."""
    keys = []
    for arg in argv[1:]:
        match = re.match(r"^--?config\.([^=]+)", arg)
        if match:
            keys.append(match.group(1))
    return keys


def _config_spec(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        match = re.match(r"^--?config(?:=(.*))?$", arg)
        if match:
            return match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a readable message (and close keys) for a ``--config.<key>`` the config lacks."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        # A bad config argument surfaces as a traceback inside config_flags' message; its last line says it all.
        marker = f"{config_lib.ConfigError.__name__}: "
        if marker in message:
            message = f"Invalid --config argument: {message.rsplit(marker, 1)[1].strip()}"
        print(f"{message}\nPass --helpfull to see every flag.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these (with at most one suggestion) for an override of a missing key.
        spec = _config_spec(argv)
        messages = []
        if spec:
            try:
                messages = config_lib.unknown_keys(config_lib.load_config_file(spec), _override_keys(argv))
            except Exception as load_error:  # noqa: BLE001 -- report the original problem below
                messages = [f"(could not reload {spec} to suggest keys: {load_error})"]
        print("Invalid --config override: " + ("\n  ".join(messages) or str(e)), file=sys.stderr)
        sys.exit(2)


class QuietLibraries(pylogging.Filter):
    """Drops INFO records logged through absl by Orbax (dozens per checkpoint), keeping warnings and errors."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_logger().addFilter(QuietLibraries())
    import jax  # Deferred: --help and flag errors stay fast.

    if _DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from anemia_jax import train

    config = _CONFIG.value
    # The file stem, not config.name: a copied config file gets its own default workdir.
    path, _, arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
    workdir = _WORKDIR.value or config_lib.default_workdir(pathlib.Path(path).stem, arg)
    try:
        summary = train.train_and_evaluate(config, workdir)
    except (config_lib.ConfigError, train.DataNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(2)
    except train.NonFiniteError as e:
        logging.error("%s", e)
        sys.exit(1)
    if summary["status"] == "preempted":
        sys.exit(EXIT_PREEMPTED)


def run() -> None:
    """Console entry point."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
