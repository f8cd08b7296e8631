"""Atomic output files: a file appears under its final name complete, or not at all.

Every output people read (predicted masks and overlays, ``predictions.csv``, evaluation CSV/JSON/markdown, the run's
JSON files and panels, ``metrics.jsonl`` rewrites, experiment tables) goes through this module:

* local paths: the bytes go to a hidden temporary file in the same folder (``.<name>.tmp-<pid>-<random>``), which
  is then renamed over the final name (`os.replace`, atomic on one filesystem). A kill, a full disk or a failing
  encoder leaves at most the temporary file, never a truncated file under the final name; on a failure the
  temporary file is removed.
* URLs (``gs://...``): the object is uploaded whole; object stores publish an object only once its upload completes,
  which is atomic already.

Failures of the place itself (no space, read-only, no permission, a file where a folder belongs) raise
`errors.OutputError`, whose message names the path, the cause and what to do; other exceptions (e.g. an encoder's)
propagate unchanged after the clean-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from anemia_jax.utils import conversions, errors, paths

__all__ = ["ensure_dir", "open_atomic", "output_error", "write_bytes", "write_json", "write_text"]


def output_error(path: str | os.PathLike, error: OSError, what: str = "write") -> errors.OutputError:
    """An `errors.OutputError` for failing to ``what`` ``path`` because of ``error`` (kept as its cause)."""
    if isinstance(error, errors.OutputError):
        return error
    message = (f"Could not {what} {os.fspath(path)}: {errors.describe_os_error(error)}. "
               f"{errors.output_advice(error)}")
    out = errors.OutputError(message)
    out.errno, out.__cause__ = error.errno, error
    return out


def ensure_dir(path: str | os.PathLike) -> epath.Path:
    """Creates folder ``path`` (and its parents) if missing and returns it as an `epath.Path`.

    Raises:
        errors.OutputError: it cannot be created (a file in the way, read-only place, no permission).
    """
    folder = paths.as_path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file under that name: mkdir(exist_ok=True) still raises
        raise output_error(folder, e, "create the folder") from None
    except OSError as e:
        raise output_error(folder, e, "create the folder") from None
    if not paths.is_url(folder) and not folder.is_dir():
        raise output_error(folder, NotADirectoryError(20, "Not a directory"), "use the folder")
    return folder


def _temporary(path: epath.Path) -> epath.Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file to write ``path`` through; it replaces ``path`` only when the ``with`` block ends without an error.

    Args:
        path: the final file (local or a URL); its folder must exist.
        mode: ``'wb'`` or ``'w'`` (text, UTF-8).

    Raises:
        errors.OutputError: writing or renaming failed for a reason of the place (see the module docstring).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w'; got {mode!r}.")
    final = paths.as_path(path)
    kwargs = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    if paths.is_url(final):
        try:
            with final.open(mode, **kwargs) as f:
                yield f
        except OSError as e:
            if errors.is_output_failure(e):
                raise output_error(final, e) from None
            raise
        return
    tmp = _temporary(final)
    try:
        with open(tmp, mode, **kwargs) as f:  # noqa: PTH123 -- a local path by now
            yield f
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if errors.is_output_failure(e):
            raise output_error(final, e) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (`open_atomic`)."""
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8, newlines as given) to ``path`` atomically (`open_atomic`)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` as indented, key-sorted strict JSON (`conversions.jsonable`) to ``path`` atomically."""
    write_text(path, json.dumps(conversions.jsonable(value), indent=2, sort_keys=True) + "\n")
