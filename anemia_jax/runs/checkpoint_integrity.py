"""Checkpoint integrity: a manifest of every file's size and SHA-256, checked before anything is restored; and the
comparison of a checkpoint's tree with the model it is restored into.

A checkpoint written by `checkpointing.CheckpointManager` holds ``checksums.json`` beside its items::

    {"format": 1, "files": {"state/_METADATA": {"size": 472, "sha256": "..."}, "meta/metadata": {...}, ...}}

covering every file under its items (``state/``, ``meta/``). Orbax's own bookkeeping beside them
(``_CHECKPOINT_METADATA``, ``commit_success.txt``) is left out: Orbax updates it when it commits the directory, after
the manifest is written. The manifest is written in Orbax's temporary directory once every process has finished
writing (Orbax's post-finalisation hook, primary process only), so it appears atomically with the checkpoint;
synchronous saves write it right after the save.

`verify` says what a checkpoint directory is: ``intact`` (every listed file present with its size and checksum),
``damaged`` (naming the first differences: a missing, truncated, altered or unexpected file, an unreadable manifest),
or ``unverified`` (no manifest: written before manifests existed, or the manifest was deleted, which this directory
alone cannot tell apart; `checkpointing.CheckpointManager.verify` tells them apart by the older checkpoints beside
it, and an unverified checkpoint is restored, but never claimed intact). `tree_mismatch` compares the array tree stored in a
checkpoint with the tree a model expects and describes the differences in words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from etils import epath

__all__ = ["MANIFEST", "Verdict", "manifest_of", "tree_mismatch", "verify", "write_manifest"]

MANIFEST = "checksums.json"
_FORMAT = 1
_CHUNK = 1 << 20
_MAX_LISTED = 3  # differences named in a message; the rest are counted


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` found: ``status`` is 'intact', 'damaged' or 'unverified'; ``reason`` says why (damaged)."""

    status: str
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.status != "damaged"


def _walk(folder: epath.Path, prefix: str) -> Iterator[tuple[str, epath.Path]]:
    # epath has no recursive glob on object stores; a checkpoint holds a few dozen files.
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            yield from _walk(path, f"{prefix}{path.name}/")
        else:
            yield f"{prefix}{path.name}", path


def _files(root: epath.Path, items: Sequence[str]) -> Iterator[tuple[str, epath.Path]]:
    for item in items:
        if (root / item).is_dir():
            yield from _walk(root / item, f"{item}/")


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_of(step_dir: epath.PathLike, items: Sequence[str]) -> dict[str, Any]:
    """The manifest of the files now under ``step_dir``'s ``items`` (see the module docstring)."""
    step_dir = epath.Path(step_dir)
    files = {rel: {"size": path.stat().length, "sha256": _sha256(path)} for rel, path in _files(step_dir, items)}
    return {"format": _FORMAT, "items": list(items), "files": files}


def write_manifest(step_dir: epath.PathLike, items: Sequence[str]) -> None:
    """Writes ``checksums.json`` into ``step_dir`` (through a temporary name, so it is whole or absent)."""
    step_dir = epath.Path(step_dir)
    text = json.dumps(manifest_of(step_dir, items), indent=1, sort_keys=True) + "\n"
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(text)
    tmp.rename(step_dir / MANIFEST)


def verify(step_dir: epath.PathLike) -> Verdict:
    """Checks ``step_dir`` against its manifest (sizes first, then checksums); see `Verdict`."""
    step_dir = epath.Path(step_dir)
    manifest_path = step_dir / MANIFEST
    if not manifest_path.exists():
        return Verdict("unverified", "it has no checksum manifest")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected: Mapping[str, Mapping[str, Any]] = manifest["files"]
        items = manifest.get("items", ["state", "meta"])
    except (ValueError, KeyError, TypeError) as e:
        return Verdict("damaged", f"its checksum manifest is unreadable ({e})")
    found = dict(_files(step_dir, items))
    problems = []
    for rel, want in sorted(expected.items()):
        path = found.pop(rel, None)
        if path is None:
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().length
        if size != want["size"]:
            problems.append(f"{rel} has {size} bytes instead of {want['size']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{rel} has other contents than were written (checksum mismatch)")
    problems += [f"{rel} was not part of it" for rel in sorted(found)]
    if not problems:
        return Verdict("intact")
    more = f" and {len(problems) - _MAX_LISTED} more difference(s)" if len(problems) > _MAX_LISTED else ""
    return Verdict("damaged", "; ".join(problems[:_MAX_LISTED]) + more)


# --------------------------------------------------------------------------------------------------- trees


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'params/conv/kernel': shape}`` of every array (or array metadata) leaf, whatever the containers."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def tree_mismatch(saved: Any, expected: Any) -> str | None:
    """How the arrays stored in a checkpoint (``saved``, e.g. Orbax's item metadata) differ from those a model
    expects (``expected``, e.g. its abstract state); None if every expected array is there with its shape.

    Dtypes are not compared (a restore casts them); arrays in ``saved`` that ``expected`` does not ask for count only
    when ``expected`` is the whole tree (the caller decides by what it passes).
    """
    have, want = flat_shapes(saved), flat_shapes(expected)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shapes = [f"{k}: {have[k]} in the checkpoint, {want[k]} in the model" for k in want
              if k in have and have[k] != want[k]]
    parts = []
    for what, names in (("arrays have another shape", shapes), ("of the model's arrays are not in it", missing),
                        ("arrays in it are not in the model", extra)):
        if names:
            more = ", ..." if len(names) > _MAX_LISTED else ""
            parts.append(f"{len(names)} {what} ({'; '.join(names[:_MAX_LISTED])}{more})")
    return "; ".join(parts) or None
