"""experiments.run_record: the record of a wrapped command (CPU time, status, commit) and SIGTERM passed on to it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import _children

from experiments import run_record

REPO = pathlib.Path(__file__).resolve().parents[1]
BURN = "import sys; x = sum(i * i for i in range(3_000_000)); sys.exit(3)"


def test_record_of_a_command_that_fails(tmp_path, capsys):
    out = tmp_path / "deep" / "runs.jsonl"
    argv = ["run_record", f"--out={out}", "--label=train", "--sample_s=0.05", "--", sys.executable, "-c", BURN]
    assert run_record.main(argv) == 3  # the command's own status
    assert run_record.main(argv) == 3  # a second invocation appends
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    r = records[0]
    assert r["label"] == "train" and r["exit_status"] == 3 and r["command"] == [sys.executable, "-c", BURN]
    assert r["cpu_s"] > 0.05 and abs(r["cpu_s"] - (r["cpu_user_s"] + r["cpu_sys_s"])) < 0.11
    assert r["wall_s"] > 0 and len(r["load_start"]) == 3 and r["load_1min_mean"] >= 0
    assert len(r["git"]["git_commit"]) == 40 and r["machine"]["cpu_count"] == os.cpu_count()


def test_no_command_or_a_missing_program_is_a_message(tmp_path, capsys):
    assert run_record.main(["run_record", f"--out={tmp_path / 'r.jsonl'}"]) == 2
    assert "No command to run" in capsys.readouterr().err
    assert run_record.main(["run_record", f"--out={tmp_path / 'r.jsonl'}", "--", "/nonexistent/program"]) == 2
    assert "could not start" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_sigterm_reaches_the_command_and_the_record_is_kept(tmp_path):
    """A trainer stopped by SIGTERM saves a checkpoint and exits: the wrapper must pass the signal on and record it."""
    out = tmp_path / "runs.jsonl"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-m", "experiments.run_record", f"--out={out}", "--label=train", "--",
            sys.executable, "-u", "-c", child]
    with _children.Child(args, budget_s=120, stdout=subprocess.PIPE, text=True, env=env) as proc:
        # Its own process group, killed whole when the block ends, the wrapper and its command, whatever happened.
        assert proc.process.stdout.readline().strip() == "ready"
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait() == 7
    record = json.loads(out.read_text())
    assert record["exit_status"] == 7 and record["wall_s"] < 60
