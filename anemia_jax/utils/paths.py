"""Paths that may be local files or remote storage (``gs://``, ``s3://``...), as `etils.epath.Path`.

Run directories, checkpoints, prepared data and outputs may live on shared or cloud storage; every module that opens
them goes through `as_path`, which keeps URLs exactly as given (``pathlib.Path`` would collapse ``gs://`` to
``gs:/``) and makes local paths absolute.
"""

from __future__ import annotations

import os
import re

from etils import epath

__all__ = ["as_path", "is_url"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What `pathlib.Path('gs://b/x')` turns a URL into ('gs:/b/x'); a one-letter scheme would be a Windows drive.
_COLLAPSED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names remote storage (``gs://``, ``s3://``...) rather than a local file."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """A workdir (or a file in one) as an `etils.epath.Path`: local paths ``~``-expanded and made absolute; URLs
    such as ``gs://bucket/runs/x`` kept exactly as they are (Orbax, TFDS and JAX's cache read epath paths too).

    Raises:
        ValueError: ``path`` is a URL whose ``//`` was collapsed (``gs:/bucket/x``), as `pathlib.Path` does; pass
            the URL as a string or an `epath.Path` instead.
    """
    text = os.fspath(path)
    if _URL.match(text):
        return epath.Path(text)
    if _COLLAPSED_URL.match(text):
        raise ValueError(f"{text!r} looks like a URL whose '//' was lost (pathlib.Path does that to 'gs://...'); "
                         "pass it as a plain string or an etils.epath.Path.")
    return epath.Path(text).expanduser().absolute()
