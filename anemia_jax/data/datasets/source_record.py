"""Which source a prepared dataset was built from, so that it is never reused for another one.

TFDS keys a prepared dataset by builder, config and version only: preparing Kvasir-SEG from folder A and then asking
for folder B with the same ``data_dir`` would silently reuse A. Builders that read user-supplied files therefore
record, beside the prepared files, the source they read and the options that shaped the data
(``source_record.json``, written inside TFDS's temporary directory, so it appears atomically with the dataset):

* the source's **fingerprint** (`fingerprint`): for a folder, every file's relative path, size and modification
  time (a dangling symlink or a symlink loop, which the builders skip as unreadable, by the link's own); for a zip,
  every member's name, size and CRC-32 (read from the zip's central directory: a content checksum that costs no
  decompression); hashed with SHA-256. Beside it, a **content digest** (``content_sha256``): every file's relative
  path and the SHA-256 of its bytes (for a zip, the CRC-based fingerprint already is one). The quick fingerprint is
  compared first; only where it differs is the content digest computed, so that a copy that changed nothing but
  modification times (``cp -r``, a re-download, a restored backup, a checkout) is still recognised as the same
  source, the way git's index trusts a file's stat and falls back to its contents;
* the builder **options** that change the prepared examples (e.g. ``mask_threshold``, ``max_file_mb``).

`check` compares that record with what a run asks for before the prepared data are reused
(`anemia_jax.data.loading.prepare_builder` calls it) and raises `SourceMismatchError` naming both sources on any
difference; the remedies are a ``data_dir`` of the new source's own, or deleting the prepared directory to rebuild it. A
source found only by downloading (kagglehub) cannot be fingerprinted without downloading it, so it is not compared; a
dataset prepared before records existed is reused with a warning that it cannot be verified.

Builders opt in by deriving from `RecordsSource` and implementing `requested_source` and `source_options`, and by
setting ``self.used_source`` to the path they read while generating.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import stat
import zipfile
from typing import Any

from absl import logging

from anemia_jax.utils import errors

__all__ = ["RECORD_FILE", "RecordsSource", "SourceMismatchError", "check", "describe", "fingerprint", "read",
           "same_data", "same_source"]

RECORD_FILE = "source_record.json"


class SourceMismatchError(errors.DataError, ValueError):
    """The prepared dataset was built from another source (or with other options) than the run asks for."""


def fingerprint(path: str | os.PathLike, *, content: bool = False) -> dict[str, Any]:
    """``{'path', 'kind' ('folder'|'zip'|'file'), 'files', 'bytes', 'sha256'}`` of a source folder or file.

    Args:
        path: the source folder, zip or file.
        content: also add ``'content_sha256'``, a digest of every file's bytes (reads the whole source once: about a
            second per 500 MB; a zip's CRC-based ``sha256`` is already a content digest and is reused).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = pathlib.Path(path).expanduser().absolute()
    digest, contents = hashlib.sha256(), hashlib.sha256()
    files = total = 0
    if path.is_dir():
        kind = "folder"
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = pathlib.Path(root, name)
                info = _stat(full)
                rel = full.relative_to(path).as_posix()
                digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
                if content:
                    contents.update(f"{rel}\0{_file_sha256(full)}\n".encode())
                files, total = files + 1, total + info.st_size
    elif zipfile.is_zipfile(path):
        kind = "zip"
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
                files, total = files + 1, total + info.file_size
        contents = digest
    elif path.is_file():
        kind = "file"
        info = path.stat()
        digest.update(f"{path.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        if content:
            contents.update(f"{path.name}\0{_file_sha256(path)}\n".encode())
        files, total = 1, info.st_size
    else:
        raise FileNotFoundError(f"{path} does not exist.")
    record = {"path": str(path), "kind": kind, "files": files, "bytes": total, "sha256": digest.hexdigest()}
    if content:
        record["content_sha256"] = contents.hexdigest()
    return record


def _file_sha256(path: pathlib.Path) -> str:
    """SHA-256 of a regular file's bytes. Anything else (a pipe or a device, which would never end; a link that
    leads nowhere), which the builders skip unread, is not opened: its kind and link target stand in for it."""
    try:
        if stat.S_ISREG(path.stat().st_mode):
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        pass
    mode = _stat(path).st_mode
    target = os.readlink(path) if path.is_symlink() else ""
    return hashlib.sha256(f"{stat.S_IFMT(mode)}\0{target}".encode()).hexdigest()


def same_source(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether the source ``now`` (its quick `fingerprint`) holds what ``recorded`` (a `fingerprint` with content)
    was taken of: the quick fingerprints first, then, where only they differ and the record has one, the content
    digest of ``now['path']`` (read only then; logged: the files were copied or touched)."""
    if now["sha256"] == recorded.get("sha256"):
        return True
    if not recorded.get("content_sha256") or (now["files"], now["bytes"]) != (recorded.get("files"),
                                                                              recorded.get("bytes")):
        return False
    if fingerprint(now["path"], content=True)["content_sha256"] != recorded["content_sha256"]:
        return False
    logging.info("The source %s has other modification times than when it was prepared (copied or touched), but "
                 "the same %d files with the same contents: reusing the prepared data.", now["path"], now["files"])
    return True


def same_data(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recorded sources (`fingerprint`s) describe the same data: equal content digests where both have
    one, else equal quick fingerprints."""
    a, b = a or {}, b or {}
    if a.get("content_sha256") and b.get("content_sha256"):
        return a["content_sha256"] == b["content_sha256"]
    return bool(a.get("sha256")) and a.get("sha256") == b.get("sha256")


def _stat(path: pathlib.Path) -> os.stat_result:
    """The file's stat, or the link's own where the link leads nowhere (dangling, or a loop)."""
    try:
        return path.stat()
    except OSError:
        return path.lstat()


def describe(record: dict[str, Any] | None) -> str:
    """``'/data/kvasir (folder of 2000 files, 46.2 MB, fingerprint 1a2b3c4d)'`` for messages."""
    if not record:
        return "an unknown source"
    return (f"{record['path']} ({record['kind']} of {record['files']} files, {record['bytes'] / 1e6:.1f} MB, "
            f"fingerprint {record['sha256'][:8]})")


def read(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a prepared dataset's directory, or None if it has none (prepared before records existed)."""
    path = pathlib.Path(os.fspath(directory)) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class RecordsSource:
    """Mix-in for TFDS builders that read user-supplied files: writes ``source_record.json`` with the prepared data.

    Subclasses implement `requested_source` and `source_options` and set ``self.used_source`` to the path they read.
    """

    used_source: str | os.PathLike | None = None

    def requested_source(self, manual_dir: str | os.PathLike | None) -> pathlib.Path | None:
        """The source this builder would read now, found without downloading anything (None if it cannot tell)."""
        raise NotImplementedError

    def source_options(self) -> dict[str, Any]:
        """The builder options that change the prepared examples (JSON-serialisable)."""
        raise NotImplementedError

    def _download_and_prepare(self, dl_manager, download_config):  # pytype: disable=signature-mismatch
        self.used_source = None
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        used = self.used_source
        record = {"source": fingerprint(used, content=True) if used is not None else None,
                  "options": self.source_options(),
                  "prepared_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        # TFDS points data_dir at its temporary directory here and renames it once everything is written.
        (pathlib.Path(os.fspath(self.data_dir)) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def check(builder, manual_dir: str | os.PathLike | None, *, flag_prefix: str = "--config.dataset.") -> None:
    """Raises `SourceMismatchError` if ``builder``'s prepared data came from another source or other options than
    it would use now. Does nothing for builders without external sources or datasets not prepared yet.

    Args:
        builder: a TFDS builder (a `RecordsSource` to be checked).
        manual_dir: TFDS's manual directory the run would search (None: the builder's default).
        flag_prefix: how the config fields are spelled in the message's advice.
    """
    if not isinstance(builder, RecordsSource) or not builder.is_prepared():
        return
    directory = builder.data_path
    recorded = read(directory)
    requested_path = builder.requested_source(manual_dir)
    if recorded is None:
        logging.warning("The prepared dataset %s records no source (it was prepared before sources were recorded), "
                        "so it cannot be checked against %s; delete that directory to rebuild it if in doubt.",
                        directory, requested_path or "the source this run would use")
        return
    problems = []
    old = recorded.get("source") or {}
    if requested_path is not None and not pathlib.Path(requested_path).expanduser().exists():
        absolute = str(pathlib.Path(requested_path).expanduser().absolute())
        if absolute != old.get("path"):
            problems.append(f"it was built from {describe(old)}, but this run asks for {absolute}, which does not "
                            "exist")
        else:
            logging.info("The source %s of the prepared dataset %s is gone; using the prepared copy.", absolute,
                         directory)
    elif requested_path is not None:
        requested = fingerprint(requested_path)
        if same_source(old, requested):
            pass  # the same files, perhaps with other modification times
        elif requested["path"] == old.get("path"):
            problems.append(f"its source {requested['path']} has changed since it was prepared (then: "
                            f"{describe(old)}; now: {describe(requested)})")
        else:
            problems.append(f"it was built from {describe(old)}, but this run asks for {describe(requested)}")
    options = builder.source_options()
    for key in sorted(set(options) | set(recorded.get("options", {}))):
        then, now = recorded.get("options", {}).get(key), options.get(key)
        if then != now:
            problems.append(f"it was prepared with {key}={then!r}, but this run asks for {key}={now!r}")
    if problems:
        raise SourceMismatchError(
            f"The prepared dataset in {directory} does not match this run: {'; '.join(problems)}. Using it would "
            f"train or evaluate on other data than the config records. Either give the new source a data directory "
            f"of its own ({flag_prefix}data_dir=DIR), or delete {directory} to rebuild it from the new source.")
