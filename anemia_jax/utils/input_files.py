"""Reading a user's input file safely: regular files only, and never more than a size cap.

``Path.is_file()`` is true for anything that is not a folder once opened, and reading a FIFO waits forever for a
writer, ``/dev/zero`` never ends and ``/dev/stdin`` may be a terminal. Every command that reads a file a user names
(photos in ``predict``, dataset source files, split files, weight files) goes through this module:

* `is_regular_file`: whether a path (local, after following symlinks; or a URL) is a regular file -- what a folder
  listing keeps.
* `check_regular_file`: the same as a failure: `NotARegularFileError` naming what the path is (a FIFO, a device, a
  socket, a folder), or `FileNotFoundError`.
* `read_file`: the bytes of a regular file, at most ``max_bytes`` of them (`FileTooLargeError` beyond). A local
  file is opened without blocking and checked on its descriptor, so a FIFO swapped in after the check cannot hang
  the read either.

Both errors are ``ValueError`` subclasses (an unusable input, not an I/O fault of this machine) whose message names
the path, what it is and what to do.
"""

from __future__ import annotations

import errno
import os
import stat

from anemia_jax.utils import paths

__all__ = ["FileTooLargeError", "NotARegularFileError", "check_regular_file", "describe_kind", "is_regular_file",
           "read_file"]


class NotARegularFileError(ValueError):
    """The path names a FIFO, a device, a socket or a folder, not a file that can be read to its end."""


class FileTooLargeError(ValueError):
    """The file is larger than the size cap of what reads it."""


def describe_kind(mode: int) -> str:
    """``'a named pipe (FIFO)'``-style name of a file type, from ``st_mode``."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (symlinks followed; a dangling or looping link is not). URLs (``gs://``)
    are objects, regular whenever they exist."""
    if paths.is_url(path):
        return paths.as_path(path).is_file()
    try:
        return stat.S_ISREG(os.stat(os.fspath(paths.as_path(path))).st_mode)
    except (OSError, ValueError):
        return False


def _not_regular(path: str, mode: int, what: str) -> NotARegularFileError:
    return NotARegularFileError(f"{what} {path} is {describe_kind(mode)}, not a regular file; only regular files are "
                                "read (a pipe or a device would never end). Name the file itself.")


def check_regular_file(path: str | os.PathLike, *, what: str = "Input") -> None:
    """Raises unless ``path`` is a regular file.

    Raises:
        FileNotFoundError: it does not exist (or is a dangling symlink).
        NotARegularFileError: it is a FIFO, a device, a socket or a folder; or a symlink loop.
    """
    if paths.is_url(path):
        if not paths.as_path(path).is_file():
            raise FileNotFoundError(errno.ENOENT, f"{what} {path} does not exist", os.fspath(path))
        return
    text = os.fspath(paths.as_path(path))
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{what} {text} does not exist (or is a symlink to nothing)",
                                text) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotARegularFileError(f"{what} {text} is a symlink loop; replace it with the file it should name.") \
                from None
        raise
    if not stat.S_ISREG(mode):
        raise _not_regular(text, mode, what)


def read_file(path: str | os.PathLike, *, max_bytes: int | None = None, what: str = "Input") -> bytes:
    """The bytes of the regular file ``path`` (local or a URL), refusing anything else or anything larger.

    Args:
        path: the file.
        max_bytes: the size cap (None: none); the message names it in MB.
        what: how messages name the file ('Photo', 'Split file', ...).

    Raises:
        FileNotFoundError, NotARegularFileError: as `check_regular_file`.
        FileTooLargeError: the file holds more than ``max_bytes`` bytes.
        OSError: the file cannot be read (permissions, I/O error).
    """
    if paths.is_url(path):
        check_regular_file(path, what=what)
        with paths.as_path(path).open("rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        return _capped(data, os.fspath(path), max_bytes, what)
    text = os.fspath(paths.as_path(path))
    check_regular_file(text, what=what)
    # O_NONBLOCK: a FIFO put in its place after the check opens at once instead of waiting for a writer.
    fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(text, info.st_mode, what)
        if max_bytes is not None and info.st_size > max_bytes:
            raise _too_large(text, info.st_size, max_bytes, what)
        chunks, total = [], 0
        limit = max_bytes + 1 if max_bytes is not None else None
        while limit is None or total < limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return _capped(b"".join(chunks), text, max_bytes, what)


def _too_large(path: str, size: int, max_bytes: int, what: str) -> FileTooLargeError:
    return FileTooLargeError(f"{what} {path} holds {size / 1e6:.1f} MB or more; the limit is {max_bytes / 1e6:g} MB. "
                             "Use a smaller file, or raise the limit if this one is genuine.")


def _capped(data: bytes, path: str, max_bytes: int | None, what: str) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:  # a file that grew while it was read
        raise _too_large(path, len(data), max_bytes, what)
    return data
