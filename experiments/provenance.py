"""Result records of the experiment scripts: provenance (command, git state, machine, wall time), the writer of
``<out>/<name>.md`` / ``<out>/<name>.json`` shared by protocols.py, pruning_table.py and screening_run.py, and the
reader of the JSON-lines records runs leave (``metrics.jsonl``, ``runs.jsonl``).

The git state is `anemia_jax.utils.provenance.git_state` (every change a rerun from the recorded commit would miss).
"""

from __future__ import annotations

import json
import pathlib
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from anemia_jax.utils import provenance
from anemia_jax.utils.provenance import MAX_CHANGED_PATHS, git_state  # noqa: F401 -- re-exported

REPO = pathlib.Path(__file__).resolve().parents[1]
_MARKDOWN_PATHS = 10


def record(argv: Sequence[str], wall_time_s: float, script: str) -> dict[str, Any]:
    """Command (``python <script> <argv>``; ``script`` may be ``'-m experiments.x'``), git state (`git_state`),
    machine, date and wall time of a run."""
    import jax  # noqa: PLC0415 -- initialised by the runs by now; aggregation alone never needs it

    devices = jax.devices()
    return {
        "command": shlex.join(["python", *script.split(), *argv]),
        **git_state(),
        "date_utc": provenance.date_utc(),
        "machine": {**provenance.machine(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "num_devices": len(devices), "device_kind": devices[0].device_kind},
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


def read_jsonl(path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a `pathlib.Path` or an `epath.Path`), in order; a line that does not parse
    -- the last one, cut short by a kill -- is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
