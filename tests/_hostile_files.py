"""Files a hostile or careless user leaves where photos and data belong, for the input-handling tests.

* `watched_fifo(path)`: a named pipe at ``path`` for the ``with`` block, and whether anything opened it to read. A
  thread tries to open the pipe's writing end without blocking, which succeeds only while a reader is waiting on the
  other end; it then writes a few bytes and closes, so that code which wrongly opened the pipe is released (the test
  fails on ``opened_by_reader`` instead of hanging the suite). No clock decides anything: the thread polls until the
  block ends.
* `png_bomb(path, side)`: a valid 1-bit greyscale PNG of ``side`` x ``side`` pixels, a few kilobytes on disk, built
  row by row with zlib (the pixels are never held in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import struct
import threading
import zlib


@dataclasses.dataclass
class FifoWatch:
    path: pathlib.Path
    opened_by_reader: bool = False


@contextlib.contextmanager
def watched_fifo(path: pathlib.Path):
    """A FIFO at ``path``; yields a `FifoWatch` whose ``opened_by_reader`` says whether a reader ever waited on it."""
    os.mkfifo(path)
    watch = FifoWatch(path)
    done = threading.Event()

    def release_readers():
        while not done.wait(0.05):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno in (errno.ENXIO, errno.ENOENT):  # no reader waiting (or the pipe is gone)
                    continue
                raise
            watch.opened_by_reader = True
            try:
                os.write(fd, b"not a photo")
            finally:
                os.close(fd)

    thread = threading.Thread(target=release_readers, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join()


def png_bomb(path: pathlib.Path, side: int) -> pathlib.Path:
    """Writes a black 1-bit PNG of ``side`` x ``side`` pixels (about side**2 / 8000 bytes) to ``path``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path
