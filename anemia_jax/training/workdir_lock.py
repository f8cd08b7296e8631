"""One writer per run directory: an exclusive lock a trainer holds for as long as it runs.

Two trainers on one workdir would interleave ``metrics.jsonl``, race on checkpoints and leave Orbax temporary
directories behind. The trainer therefore takes `WorkdirLock` before it writes anything there; a second trainer stops
at once with `errors.WorkdirBusyError` naming the holder (process id, host, start time, command).

* Local (and NFS) workdirs: ``<workdir>/.lock`` locked with ``fcntl.flock``. The kernel drops the lock when its process
  dies, however it dies (kill -9 included), so a lock of a dead process is never in the way: the next trainer takes it
  and logs whose it was. The file holds the holder's details as JSON and is deleted on release.
* Object stores (``gs://...``), which have no locks: a lease, the same JSON file with a ``renewed`` time that a
  background thread refreshes every `LEASE_SECONDS` / 4. A lease is stale, and taken over, when it was not renewed
  for `LEASE_SECONDS`, or when its holder ran on this host and that process is gone. Object stores offer no atomic
  create here, so two trainers starting within the same second can both win; the lease catches every later start.

Only the process that writes the run's files (process 0) takes the lock; the trainer tells the others.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath

from anemia_jax.utils import atomic, errors, paths

__all__ = ["LEASE_SECONDS", "LOCK_FILE", "WorkdirLock"]

LOCK_FILE = ".lock"
LEASE_SECONDS = 600.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(holder: dict[str, Any]) -> str:
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started_utc', '?')}{command}")


class WorkdirLock:
    """The exclusive lock of one run directory (see the module docstring).

    Args:
        workdir: the run directory (local or a URL); created by `acquire` if missing.
        enabled: False makes every call a no-op (processes other than the writer).
        lease_seconds: lease length on object stores.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, lease_seconds: float = LEASE_SECONDS):
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.enabled = enabled
        self.lease_seconds = lease_seconds
        self.held = False
        self._fd: int | None = None
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _busy(self, holder: dict[str, Any]) -> errors.WorkdirBusyError:
        return errors.WorkdirBusyError(
            f"The run directory {self.workdir} is in use by another trainer: {_describe(holder)}. Two trainers on one "
            "workdir would mix their metrics and checkpoints. Wait for it to finish (or stop it), or pass another "
            f"--workdir. If that process is gone, delete {self.path}.")

    def acquire(self) -> None:
        """Takes the lock (creating the workdir if needed); idempotent.

        Raises:
            errors.WorkdirBusyError: another live trainer holds it.
            errors.OutputError: the workdir cannot be written.
        """
        if not self.enabled or self.held:
            return
        atomic.ensure_dir(self.workdir)
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "started_utc": _now(),
                        "command": " ".join(sys.argv)[:300]}
        if paths.is_url(self.workdir):
            self._acquire_lease()
        else:
            self._acquire_flock()
        self.held = True

    # ---------------------------------------------------------------------------------------- local files

    def _acquire_flock(self) -> None:
        import fcntl  # noqa: PLC0415 -- POSIX only; object-store workdirs never need it

        path = os.fspath(self.path)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise atomic.output_error(path, e, "create the lock file") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._read_local(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(holder) from None
                raise atomic.output_error(path, e, "lock") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder deleted the file as we locked it: lock the new one
        previous = self._read_local(fd)
        if previous:
            logging.info("Took over the lock of %s from %s, which no longer holds it.", self.workdir,
                         _describe(previous))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self._record) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise atomic.output_error(path, e, "write the lock file") from None
        self._fd = fd

    @staticmethod
    def _read_local(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    # --------------------------------------------------------------------------------------- object stores

    def _read_lease(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _acquire_lease(self) -> None:
        holder = self._read_lease()
        if holder:
            age = time.time() - float(holder.get("renewed", 0))
            same_host_dead = holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))
            if age < self.lease_seconds and not same_host_dead:
                raise self._busy(holder)
            logging.info("Took over the stale lease of %s from %s.", self.workdir, _describe(holder))
        self._write_lease()
        self._renewer = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
        self._renewer.start()

    def _write_lease(self) -> None:
        try:
            self.path.write_text(json.dumps({**self._record, "renewed": time.time()}) + "\n")
        except OSError as e:
            raise atomic.output_error(self.path, e, "write the lease file") from None

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self._write_lease()
            except OSError as e:  # a transient store error: the next renewal retries
                logging.warning("Could not renew the lease of %s: %s", self.workdir, e)

    # ------------------------------------------------------------------------------------------- release

    def release(self) -> None:
        """Releases the lock and deletes the lock file (idempotent; never raises)."""
        if not self.held:
            return
        self.held = False
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still locked, so that nobody locks the file being deleted
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            if self._read_lease().get("pid") == self._record["pid"]:
                epath.Path(self.path).unlink()
        except OSError as e:
            logging.warning("Could not delete the lease %s: %s", self.path, e)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
