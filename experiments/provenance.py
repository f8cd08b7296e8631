"""Result records of the experiment scripts: provenance (command, git state, machine, wall time) and the writer of
``<out>/<name>.md`` / ``<out>/<name>.json`` shared by protocols.py, pruning_table.py and screening_run.py.

The git state counts every change a rerun from the recorded commit would miss: modified or staged tracked files
AND untracked files that git does not ignore (a new module that a run imported but nobody has committed yet is
exactly what makes a result irreproducible from its commit). Ignored paths (virtual environments, run outputs,
prepared data) are not code and are not counted.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_CHANGED_PATHS = 50  # kept in the JSON record; the markdown shows fewer
_MARKDOWN_PATHS = 10


def _git(repo: pathlib.Path, *args: str) -> str | None:
    """``git <args>`` stdout in ``repo``, or None if git is missing or fails (e.g. not a repository)."""
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: str | pathlib.Path = REPO, *, max_paths: int = MAX_CHANGED_PATHS) -> dict[str, Any]:
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


def record(argv: Sequence[str], wall_time_s: float, script: str) -> dict[str, Any]:
    """Command (``python <script> <argv>``; ``script`` may be ``'-m experiments.x'``), git state (`git_state`),
    machine, date and wall time of a run."""
    import jax  # noqa: PLC0415 -- initialised by the runs by now; aggregation alone never needs it

    devices = jax.devices()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": shlex.join(["python", *script.split(), *argv]),
        **git_state(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_1_5_15min": [round(x, 2) for x in load] if load else None,
                    "jax": jax.__version__, "backend": jax.default_backend(), "num_devices": len(devices),
                    "device_kind": devices[0].device_kind},
        "wall_time_s": round(wall_time_s, 1),
    }


def _commit_line(prov: Mapping[str, Any]) -> str:
    changed = prov.get("git_uncommitted_changes")
    if changed is None:
        return f"{prov['git_commit']} (working-tree state unknown: git status failed)"
    if not changed:
        return f"{prov['git_commit']} (clean working tree)"
    paths = list(prov.get("git_changed_paths", []))
    total = int(prov.get("git_changed_paths_total", len(paths)))
    shown = ", ".join(f"`{p}`" for p in paths[:_MARKDOWN_PATHS])
    more = f", and {total - min(len(paths), _MARKDOWN_PATHS)} more" if total > _MARKDOWN_PATHS else ""
    return f"{prov['git_commit']} plus uncommitted changes to {total} path(s): {shown}{more}"


def to_markdown(prov: Mapping[str, Any], note: str = "") -> str:
    """The record as a markdown bullet list."""
    m = prov["machine"]
    lines = [f"- command: `{prov['command']}`", f"- git commit: {_commit_line(prov)}", f"- date: {prov['date_utc']}",
             f"- machine: {m['platform']}, {m['cpu_count']} CPU(s), load average {m['load_average_1_5_15min']}; "
             f"JAX {m['jax']} on {m['num_devices']} {m['backend']} device(s) ({m['device_kind']})",
             f"- wall time: {prov['wall_time_s'] / 60:.1f} min"]
    if note:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def write_results(out: str | pathlib.Path, name: str, title: str, body_md: str, data: Mapping[str, Any],
                  prov: Mapping[str, Any], note: str = "") -> pathlib.Path:
    """Writes ``<out>/<name>.md`` (title, record, tables) and ``<out>/<name>.json`` (data + record), each atomically
    (`anemia_jax.utils.atomic`: complete or absent, even on a full disk); returns the markdown path."""
    from anemia_jax.utils import atomic  # noqa: PLC0415

    out = pathlib.Path(atomic.ensure_dir(out))
    atomic.write_text(out / f"{name}.md", f"# {title}\n\n" + to_markdown(prov, note) + "\n" + body_md)
    atomic.write_json(out / f"{name}.json", {"provenance": dict(prov), "note": note, **data})
    return out / f"{name}.md"
