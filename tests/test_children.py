"""The suite's child processes die with their test, and their time limits stretch with the load (`_children`).

A trainer left running with parent PID 1 after Ctrl-C, and a 300 s limit failing a test that takes 170 s alone on a
machine at load 5-13 (issue 18), are what these tests rule out: a child's whole process group is killed when the
process that started it is killed, or when it passes its budget of unloaded seconds; and no test starts a child any
other way."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import _children
import pytest

TESTS = pathlib.Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which a container's init may never reap, counts as dead)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_until_dead(pid: int, budget_s: float = 60) -> bool:
    deadline = _children.Deadline(budget_s)
    while _alive(pid):
        if deadline.passed():
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_when_the_process_that_started_it_is_killed():
    # A stand-in for a pytest worker: it starts a long child the way the tests do, then is killed with SIGKILL.
    worker = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import _children, time\n"
              "child = _children.Child(['sleep', '300'], budget_s=600)\n"
              "print(child.process.pid, flush=True)\n"
              "time.sleep(300)\n")
    with _children.Child([sys.executable, "-c", worker], budget_s=120, stdout=subprocess.PIPE, text=True) as outer:
        grandchild = int(outer.process.stdout.readline())
        assert _alive(grandchild)
        os.kill(outer.process.pid, signal.SIGKILL)  # no finaliser runs: only the kernel can clean up
        outer.wait()
    assert _wait_until_dead(grandchild), f"the child {grandchild} outlived the process that started it"


def test_a_child_past_its_budget_is_killed_with_everything_it_started():
    with _children.Child(["sh", "-c", "sleep 300 & echo $!; wait"], budget_s=0.5, stdout=subprocess.PIPE,
                         text=True) as child:
        background = int(child.process.stdout.readline())
        assert child.wait() == -signal.SIGKILL and child.timed_out
        with pytest.raises(_children.ChildTimeout, match="budget of 0 unloaded seconds"):
            child.check_budget()
    assert _wait_until_dead(background)
    with pytest.raises(_children.ChildTimeout):
        _children.run(["sleep", "300"], budget_s=0.5)


def test_leaving_the_block_kills_the_child():
    with pytest.raises(RuntimeError):
        with _children.Child(["sleep", "300"], budget_s=600) as child:
            raise RuntimeError("the test failed")
    assert child.process.returncode == -signal.SIGKILL


def test_budgets_count_unloaded_seconds(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(_children.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(_children, "load_factor", lambda: 4.0)  # 4 runnable processes per core
    deadline = _children.Deadline(300)
    clock[0] += 1000  # 1000 s of wall time at load 4 are 250 unloaded seconds
    assert not deadline.passed()
    clock[0] += 300
    assert deadline.passed()
    monkeypatch.setattr(_children.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    monkeypatch.undo()
    assert _children.load_factor() >= 1.0


def test_no_test_starts_a_child_any_other_way():
    bare = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\(|\bos\.(system|popen|fork)\(")
    found = [f"{path.name}:{n}" for path in sorted(TESTS.rglob("*.py")) if path.name != "_children.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if bare.search(line)]
    assert not found, f"start children with _children.Child / _children.run: {found}"
