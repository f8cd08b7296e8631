"""Places that refuse writes, for tests of output failures: a full filesystem and a read-only folder.

* `full_filesystem(path, size)`: a small tmpfs mounted at ``path`` (needs the right to mount: root in a container);
  writes beyond ``size`` fail with ENOSPC, exactly as on a full disk.
* `read_only_folder(path)`: a folder that cannot be written: ``chmod 555`` for a normal user, a read-only tmpfs for
  root (whom permissions do not stop).

Both are context managers and skip the calling test (``pytest.skip``) when the machine offers neither.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess

import _children
import pytest


def _mount(path: pathlib.Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = _children.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], budget_s=30)
    except (OSError, subprocess.SubprocessError, _children.ChildTimeout):
        return False
    return result.returncode == 0


def _unmount(path: pathlib.Path) -> None:
    _children.run(["umount", "-l", str(path)], budget_s=30)


@contextlib.contextmanager
def full_filesystem(path: pathlib.Path, size: str = "256k"):
    """A tmpfs of ``size`` at ``path`` for the ``with`` block (the test skips if mounting is not allowed)."""
    if not _mount(path, f"size={size}"):
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN) to fill a filesystem")
    try:
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def read_only_folder(path: pathlib.Path):
    """``path`` as a folder nobody here can write into, for the ``with`` block."""
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if not _mount(path, "size=64k,ro"):
        pytest.skip("root ignores permissions and cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        _unmount(path)
