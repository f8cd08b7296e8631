"""Runs one command and appends what it cost to a JSON-lines record: command, git state, machine, load, wall and CPU
time, exit status. The long experiment scripts (`results/*/run.sh`) wrap each training and evaluation in it:

    python -m experiments.run_record --out=experiments/results/x/unet/runs.jsonl --label=train -- \\
        python -m anemia_jax.main --config=configs/unet.py:data=kvasir --workdir=runs/x/unet

One line per invocation (a run resumed three times has three ``train`` lines), each with: ``label``, ``command``
(as given), ``cwd``, ``git`` (`experiments.provenance.git_state` of this checkout), ``machine`` (platform, CPU model,
cores, Python), ``nice`` (this process's niceness, which the child inherits), ``start_utc`` / ``end_utc``,
``wall_s``, ``cpu_user_s`` / ``cpu_sys_s`` / ``cpu_s`` (the child's and its waited-for descendants' CPU time,
``getrusage(RUSAGE_CHILDREN)``), ``max_rss_mib``, ``load_start`` / ``load_end`` (1/5/15-min load averages),
``load_1min_mean`` (the 1-min load average sampled every ``--sample_s`` seconds while the command ran) and
``exit_status`` (the child's; minus the signal number if a signal ended it).

SIGINT and SIGTERM are passed on to the command (the trainer then saves a checkpoint and stops; rerunning resumes),
and the record is still written. The command's output goes to this process's stdout and stderr unchanged. No JAX is
imported here.

Exit status: the command's (128 + N if signal N ended it); 2 no command or a bad flag; 5 the command ran but its
record could not be written (the record is then printed on stderr, so that it is not lost).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from anemia_jax import cli
from anemia_jax.utils import errors
from experiments import provenance

# The environment this process started with, before `cli.Command` appends anemia_jax's XLA CPU flag: the command
# gets it unchanged, so that it applies (and records) its own flags.
_ENVIRON = dict(os.environ)


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _LoadSampler:
    """Samples the 1-min load average every ``period_s`` seconds in a daemon thread until `stop`."""

    def __init__(self, period_s: float):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> float:
        """Stops sampling; returns the mean of the samples (the last one taken now)."""
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        return sum(self.samples) / len(self.samples)


def run(command: Sequence[str], *, label: str = "", sample_s: float = 60.0) -> dict[str, Any]:
    """Runs ``command`` (SIGINT/SIGTERM passed on to it) and returns its record (see the module docstring)."""
    record: dict[str, Any] = {
        "label": label, "command": list(command), "cwd": os.getcwd(), "git": provenance.git_state(),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "nice": os.getpriority(os.PRIO_PROCESS, 0), "start_utc": _utc(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = _LoadSampler(sample_s)
    t0 = time.perf_counter()
    child = subprocess.Popen(list(command), env=_ENVIRON)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    record.update({
        "end_utc": _utc(), "wall_s": round(wall, 1), "cpu_user_s": round(user, 1), "cpu_sys_s": round(system, 1),
        "cpu_s": round(user + system, 1), "max_rss_mib": round(after.ru_maxrss / 1024, 1),
        "load_end": [round(x, 2) for x in os.getloadavg()], "load_1min_mean": round(sampler.stop(), 2),
        "exit_status": status,
    })
    return record


def append(path: str, record: dict[str, Any]) -> None:
    """Appends ``record`` as one JSON line to ``path`` (its folder made if missing), in one write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: Sequence[str]) -> int:
    """The command (see the module docstring); ``argv`` has the program name first. Returns the exit status."""
    cmd = cli.Command("python -m experiments.run_record", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("out", None, "JSON-lines file the record is appended to.", flag_values=fv)
    flags.DEFINE_string("label", "", "What the command is (e.g. train, evaluate), stored in the record.",
                        flag_values=fv)
    flags.DEFINE_float("sample_s", 60.0, "Seconds between samples of the load average.", lower_bound=0.01,
                       flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)
    try:
        command = cmd.parse(argv)
        if command is None:
            return cli.EXIT_OK
        if not command:
            raise cli.CommandLineError("No command to run: put it after the flags and a --, e.g. "
                                       "python -m experiments.run_record --out=runs.jsonl -- python -m anemia_jax.main ...")
    except Exception as e:  # noqa: BLE001 -- cmd.fail re-raises anything that is not a known failure
        return cmd.fail(e)
    try:
        record = run(command, label=cmd.label, sample_s=cmd.sample_s)
    except OSError as e:  # the command could not be started (not found, not executable)
        print(f"run_record: could not start {command[0]!r}: {errors.describe_os_error(e)}.", file=sys.stderr)
        return cli.EXIT_CONFIG
    try:
        append(cmd.out, record)
    except OSError as e:
        print(f"run_record: could not write the record to {cmd.out}: {errors.describe_os_error(e)}. "
              f"{errors.output_advice(e)} The record: {json.dumps(record)}", file=sys.stderr)
        return cli.EXIT_IO
    status = record["exit_status"]
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
