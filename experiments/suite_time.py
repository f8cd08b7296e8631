"""Where the test suite's time goes (issue 21): runs the README's test command with ``--durations=0`` and writes
per-file and per-test totals with the run's provenance (not a test; a measurement for whoever shortens the suite).

    python -m experiments.suite_time --out=experiments/results/suite_time/<name>.json [-- extra pytest arguments]

The JSON holds the wall time, the exit status, the pytest summary line, the load average before and after, the sum
of the per-test times (setup + call + teardown; with 2 workers, about twice the wall time when both stay busy), each
test file's total and the 40 longest phases. ``--log`` parses an existing ``--durations=0`` log instead of running.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from experiments import provenance

_DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+?)::(\S+)")
_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed).* in [\d.]+s.*?)\s*=*$")


def parse(log: str) -> dict:
    """Per-file totals, the longest phases and the summary line of a ``pytest --durations=0`` log."""
    by_file: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    phases = []
    summary = ""
    for line in log.splitlines():
        if m := _DURATION.match(line):
            seconds, phase, path, test = float(m.group(1)), m.group(2), m.group(3), m.group(4)
            by_file[path] += seconds
            count[path] += phase == "call"
            phases.append({"seconds": seconds, "phase": phase, "test": f"{path}::{test}"})
        elif m := _SUMMARY.match(line.strip()):
            summary = m.group(1)
    phases.sort(key=lambda p: -p["seconds"])
    return {
        "summary": summary,
        "sum_of_test_seconds": round(sum(by_file.values()), 1),
        "files": [{"file": f, "seconds": round(s, 1), "tests": count[f]} for f, s in by_file.most_common()],
        "longest": phases[:40],
    }


def main(argv: Sequence[str]) -> int:
    out = pathlib.Path(flags.FLAGS.out)
    start = time.perf_counter()
    load_before = os.getloadavg()
    if flags.FLAGS.log:
        log, code = pathlib.Path(flags.FLAGS.log).read_text(), None
        command = None
    else:
        command = [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "--durations=0",
                   "tests", *argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=provenance.REPO)
        log, code = done.stdout + done.stderr, done.returncode
        out.with_suffix(".log").write_text(log)
    wall = time.perf_counter() - start
    result = {
        **provenance.record(sys.argv[1:], wall, "-m experiments.suite_time"),
        "pytest_command": command,
        "exit_status": code,
        "load_average_before_after": [load_before, os.getloadavg()],
        **parse(log),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['summary']}; sum of test times {result['sum_of_test_seconds']} s")
    for row in result["files"][:15]:
        print(f"{row['seconds']:8.1f} s {row['tests']:4d} tests  {row['file']}")
    return 0 if code in (0, None) else 1


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "JSON file to write (the log beside it, .log).", required=True)
    flags.DEFINE_string("log", None, "Parse this --durations=0 log instead of running the suite.")
    app.run(lambda argv: sys.exit(main(argv)))
