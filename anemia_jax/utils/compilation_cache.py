"""JAX's persistent compilation cache, pointed where a config or a command asks.

A rerun, a resumed run or a second command on the same model skips XLA compilation when the compiled program is in
the cache (on the CPU the train step of a full-width model takes tens of seconds to compile, the prediction program of
a 3-fold ensemble several seconds: `predict` and the page read the runs' cache too, `enable_for_serving`).

JAX stores only programs that took at least ``jax_persistent_cache_min_compile_time_secs`` to compile (1 s by
default), which leaves out the evaluation programs of small models (0.5-0.9 s each on the CPU), so every resumed or
rerun training compiled them again. `enable` lowers it to `MIN_COMPILE_TIME_S` (0.1 s: the eager ops' programs, tens
of milliseconds, stay out), unless it is already lower or ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set. A
finished tiny run's rerun: 4.8-5.0 s to 4.4 s on the development CPU.
"""

from __future__ import annotations

import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from anemia_jax.utils import paths

__all__ = ["MIN_COMPILE_TIME_S", "enable", "enable_for_serving"]

MIN_COMPILE_TIME_S = 0.1


def enable(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path``, so that a rerun skips compilation.

    ``''`` leaves JAX's setting as it is. Otherwise ``path`` (local, created if missing, or a URL such as
    ``gs://bucket/jax_cache``) becomes the cache in effect even if another directory was set earlier in this process
    (another run, a library): JAX opens its cache once, at the first compilation, so it is reset to reopen here.
    """
    if not path:
        return
    if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ
            and jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_TIME_S):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    target = paths.as_path(path)
    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if current and str(paths.as_path(current)) == str(target):
        return
    if current:
        logging.info("Switching the persistent compilation cache from %s to %s (config.compilation_cache_dir).",
                     current, target)
    if not paths.is_url(target):
        target.mkdir(parents=True, exist_ok=True)
    compilation_cache.set_cache_dir(str(target))
    compilation_cache.reset_cache()


def enable_for_serving(path: str) -> bool:
    """`enable` for commands that only read runs (``predict``, the page): a cache that cannot be opened (a training
    machine's path, a read-only home) is a warning, not a failure -- it only saves time. Returns whether it is on."""
    if not path:
        return False
    try:
        enable(path)
    except OSError as e:
        logging.warning("Persistent compilation cache %s unavailable (%s): compiling without it. Set "
                        "--config.compilation_cache_dir to a writable folder (or '' to turn it off).", path, e)
        return False
    return True
