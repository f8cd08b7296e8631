"""JAX's persistent compilation cache, pointed where a config or a command asks.

A rerun, a resumed run or a second command on the same model skips XLA compilation when the compiled program is in
the cache (on the CPU the train step of a full-width model takes tens of seconds to compile).
"""

from __future__ import annotations

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from anemia_jax.utils import paths

__all__ = ["enable"]


def enable(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path``, so that a rerun skips compilation.

    ``''`` leaves JAX's setting as it is. Otherwise ``path`` (local, created if missing, or a URL such as
    ``gs://bucket/jax_cache``) becomes the cache in effect even if another directory was set earlier in this process
    (another run, a library): JAX opens its cache once, at the first compilation, so it is reset to reopen here.
    """
    if not path:
        return
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
