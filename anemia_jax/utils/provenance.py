"""Where a result came from: the git state of the checkout the package runs from, and the machine.

Models and files that people act on (a screening model, an exported model's card, an experiment's table) record the
commit they were made at and whether the working tree had changes a rerun from that commit would miss: modified or
staged tracked files AND untracked files that git does not ignore (a new module that a run imported but nobody has
committed yet is exactly what makes a result irreproducible). Ignored paths (virtual environments, run outputs,
prepared data) are not code and are not counted. Outside a source checkout (an installed wheel) the commit is
'unknown' and the record says why.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
from typing import Any

__all__ = ["CHECKOUT", "MAX_CHANGED_PATHS", "checkout_git_state", "date_utc", "git_state", "machine"]

# The repository root when the package runs from a source checkout (anemia_jax/utils/ -> the root).
CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
MAX_CHANGED_PATHS = 50


def _git(repo: pathlib.Path, *args: str) -> str | None:
    """``git <args>`` stdout in ``repo``, or None if git is missing or fails (e.g. not a repository)."""
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: str | pathlib.Path = CHECKOUT, *, max_paths: int = MAX_CHANGED_PATHS) -> dict[str, Any]:
    """The commit checked out in ``repo`` and what the working tree has that the commit does not.

    Returns:
        ``{'git_commit': sha or 'unknown', 'git_uncommitted_changes': bool, or None when git could not tell,
        'git_changed_paths': ['<XY> <path>', ...] (``git status --porcelain`` codes: ' M' modified, 'M ' staged,
        '??' untracked, ...; untracked folders collapsed to 'dir/'; at most ``max_paths``, sorted),
        'git_changed_paths_total': how many there were before the cap}``.
    """
    repo = pathlib.Path(repo)
    head = _git(repo, "rev-parse", "HEAD")
    # -z: paths verbatim (no quoting), NUL-separated; untracked=normal lists non-ignored untracked files and
    # folders; ignored files are left out by default.
    status = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=normal")
    if status is None:
        return {"git_commit": (head or "").strip() or "unknown", "git_uncommitted_changes": None,
                "git_changed_paths": [], "git_changed_paths_total": 0}
    entries, fields = [], iter(status.split("\0"))
    for field in fields:
        if not field:
            continue
        code, path = field[:2], field[3:]
        if code[0] in "RC":
            next(fields, None)  # a rename or copy is followed by its source path, which is not a second change
        entries.append(f"{code} {path}")
    entries.sort()
    return {"git_commit": (head or "").strip() or "unknown", "git_uncommitted_changes": bool(entries),
            "git_changed_paths": entries[:max_paths], "git_changed_paths_total": len(entries)}


def checkout_git_state() -> dict[str, Any]:
    """`git_state` of the checkout this package runs from, or ``{'git_commit': 'unknown', 'note': why}``."""
    if not (CHECKOUT / ".git").exists():
        return {"git_commit": "unknown", "note": "anemia_jax is not running from a source checkout"}
    return git_state(CHECKOUT)


def date_utc() -> str:
    """Now, as ``'2026-12-06 08:15 UTC'``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> dict[str, Any]:
    """Platform, Python, CPU count and load average of this machine (no JAX: callers add its devices)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_average_1_5_15min": [round(x, 2) for x in load] if load else None}
