"""The failures a command reports as a message rather than a traceback, each with its exit status.

Every command (`anemia_jax.cli`) ends a failure of one of these kinds with a one-paragraph message (what went wrong,
where, what to do) and the kind's exit status; a traceback is printed only with ``--verbose``. The classes carry
their status (``exit_code``), so `cli.exit_status` needs no list of every module's exceptions, and this module
imports nothing heavy (the commands read it before JAX loads).

| status | kind | raised for |
|---:|---|---|
| 2 | `ConfigError`, `anemia_jax.cli.CommandLineError` | bad flags, config values, config files |
| 3 | `DataError` | missing or unusable source data, a prepared dataset built from another source |
| 4 | `CheckpointError` | no checkpoint, a damaged one, or one written by another model configuration |
| 5 | `OutputError` | an output that cannot be written (read-only place, a file where a folder belongs, full disk) |
| 6 | `WorkdirBusyError` | the run directory is held by another trainer |
"""

from __future__ import annotations

import errno

__all__ = ["CheckpointError", "ConfigError", "DataError", "OutputError", "UnusableSourceError", "WorkdirBusyError", "describe_os_error",
           "is_output_failure", "output_advice"]

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_IO = 5
EXIT_BUSY = 6


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found and how to fix it."""

    exit_code = EXIT_CONFIG


class DataError(Exception):
    """The dataset's source is missing or unusable, or the prepared data came from another source."""

    exit_code = EXIT_DATA


class CheckpointError(Exception):
    """A checkpoint is missing, damaged, or was written by a different model configuration."""

    exit_code = EXIT_CHECKPOINT


class OutputError(OSError):
    """An output file or folder could not be written; the message names it, the cause and what to do."""

    exit_code = EXIT_IO


class WorkdirBusyError(Exception):
    """Another trainer holds the run directory; the message names it (process id, host, start time)."""

    exit_code = EXIT_BUSY


# errno values that mean "this place cannot take the output", whichever code path met them.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.EEXIST}


def is_output_failure(error: BaseException) -> bool:
    """Whether ``error`` is an OS error of writing (no space, read-only, permission, a file in the way)."""
    return isinstance(error, OSError) and error.errno in _OUTPUT_ERRNOS


def describe_os_error(error: OSError) -> str:
    """``'No space left on device'``-style text of an OS error, without Python's ``[Errno 28]`` prefix."""
    return error.strerror or str(error)


def output_advice(error: OSError) -> str:
    """What to do about an output failure of this kind."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "Free some space there (or choose another place) and run the command again."
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "Make it writable, or choose a place you can write to, and run the command again."
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "A file stands where a folder is needed (or the reverse): choose another path or move the file."
    return "Check the place is writable and has space, then run the command again."


class UnusableSourceError(DataError, ValueError):
    """A dataset's source exists but cannot be used (not the dataset, empty, truncated, nothing readable in it)."""
