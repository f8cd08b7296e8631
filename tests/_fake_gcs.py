"""An in-memory stand-in for Google Cloud Storage, so that ``gs://`` workdirs can be tested without a network.

`etils.epath` serves ``gs://`` paths through fsspec (TensorFlow is not installed). The `fake_gcs` fixture registers
`FakeGCS` (fsspec's memory filesystem) as fsspec's ``gs``/``gcs`` implementation for one test, so that
``epath.Path('gs://bucket/x')`` reads and writes a dict. Like real object storage it cannot append to a file (gcsfs
would silently overwrite instead): opening in mode 'a' raises, so code that appends on a bucket fails here.

Use: ``from _fake_gcs import fake_gcs  # noqa: F401 -- pytest fixture``; the fixture yields the class, whose
``store`` maps ``/bucket/path`` to file objects.
"""

from __future__ import annotations

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry


class FakeGCS(MemoryFileSystem):
    """fsspec's memory filesystem under the ``gs://`` protocol, without append."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to ({path}, mode {mode!r}).")
        return super()._open(path, mode, **kwargs)


def _clear_epath_cache() -> None:
    # epath caches one fsspec filesystem per protocol; a test must not see another test's (or the real) one.
    type(epath_backend.fsspec_backend)._get_filesystem.cache_clear()


@pytest.fixture
def fake_gcs(monkeypatch):
    """`FakeGCS` registered for ``gs://`` during one test (empty at the start)."""
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(_registry, protocol, FakeGCS)
    _clear_epath_cache()
    yield FakeGCS
    _clear_epath_cache()
    FakeGCS.store.clear()
