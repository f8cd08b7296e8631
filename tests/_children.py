"""Child processes of tests: they die with their test, and their time limits stretch with the machine's load.

A test that starts a trainer or a worker must not leave it running when the test fails, is interrupted (Ctrl-C), or
its pytest worker is killed; and a limit that a child meets in 3 minutes on an idle machine must not fail it when the
cores are shared with other suites (load 5-13 on 2 cores made a 300 s limit fail a test that takes 170 s alone).

* `Child` starts a process in a process group of its own (`os.killpg` reaches whatever it started too) that the
  kernel kills if the process that started it dies (Linux ``PR_SET_PDEATHSIG``: a pytest worker killed by xdist or
  by a signal takes its children along), and kills the group when the ``with`` block ends, however it ends.
* Its ``budget_s`` is **unloaded** seconds: a watchdog counts wall time divided by the load per core
  (`load_factor`, the 1-minute load average over the core count, at least 1), and kills the group only once that
  count passes the budget. At a load of 4 per core a 300 s budget lasts about 20 minutes; on an idle machine, 5.
* `run` is ``subprocess.run`` with both: output captured, `ChildTimeout` when the budget is spent.
* `Deadline` is the same clock for a test that polls for something (a file a browser downloads).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

__all__ = ["Child", "ChildTimeout", "Deadline", "load_factor", "run"]

_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the child calls it between fork and exec, where loading anything is unsafe
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the process group and the finaliser still apply
    _prctl = None


class ChildTimeout(AssertionError):
    """A child used up its budget of unloaded seconds and was killed."""


def load_factor() -> float:
    """How many times slower than an idle machine work runs now: the 1-minute load average per core, at least 1."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


class Deadline:
    """``budget_s`` unloaded seconds from now (see the module docstring); ``passed()`` says whether they are spent."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self._used = 0.0
        self._last = time.monotonic()

    def passed(self) -> bool:
        now = time.monotonic()
        self._used += (now - self._last) / load_factor()
        self._last = now
        return self._used > self.budget_s


def _die_with_parent(parent: int) -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


class Child:
    """A child process that dies with its test (see the module docstring); use it as a context manager.

    Args:
        args: the command.
        budget_s: unloaded seconds it may run before the watchdog kills it (``timed_out`` is then True).
        **popen_kwargs: passed to `subprocess.Popen` (stdout, stderr, env, cwd, text...).
    """

    def __init__(self, args: Sequence[str], *, budget_s: float, **popen_kwargs):
        parent = os.getpid()
        self.args = list(args)
        self.budget_s = budget_s
        self.timed_out = False
        self.process = subprocess.Popen(self.args, start_new_session=True,
                                        preexec_fn=lambda: _die_with_parent(parent), **popen_kwargs)
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        deadline = Deadline(self.budget_s)
        while not self._done.wait(1.0):
            if self.process.poll() is not None:
                return
            if deadline.passed():
                self.timed_out = True
                self.kill()
                return

    def kill(self) -> None:
        """Kills the child's process group (the child and anything it started), if the child still runs."""
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self) -> int:
        """Waits for the child (the watchdog bounds the wait) and returns its exit status."""
        code = self.process.wait()
        self._done.set()
        return code

    def check_budget(self, log: str = "") -> None:
        """Raises `ChildTimeout` if the watchdog killed the child, with the end of ``log``."""
        if self.timed_out:
            raise ChildTimeout(f"{' '.join(self.args[:4])} ... ran past its budget of {self.budget_s:.0f} unloaded "
                               f"seconds (load factor now {load_factor():.1f}) and was killed.\n{log[-3000:]}")

    def close(self) -> None:
        self._done.set()
        self.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(args: Sequence[str], *, budget_s: float, input: str | bytes | None = None,  # noqa: A002 -- as subprocess
        **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, ...)`` as a `Child`: raises `ChildTimeout` past ``budget_s``
    unloaded seconds; the child's process group is killed on any way out."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    with Child(args, budget_s=budget_s, **popen_kwargs) as child:
        out, err = child.process.communicate(input)
        child.wait()
        child.check_budget(err if isinstance(err, str) else (err or b"").decode(errors="replace"))
        return subprocess.CompletedProcess(child.args, child.process.returncode, out, err)
