"""`anemia_jax.utils.compilation_cache.enable`: the minimum compile time of the programs it stores."""

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from anemia_jax.utils import compilation_cache

_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def test_enable_stores_programs_of_a_tenth_of_a_second(tmp_path, monkeypatch):
    before_time = jax.config.jax_persistent_cache_min_compile_time_secs
    before_dir = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv(_ENV, raising=False)
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
        compilation_cache.enable(str(tmp_path / "a"))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation_cache.MIN_COMPILE_TIME_S == 0.1
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # already lower: kept
        compilation_cache.enable(str(tmp_path / "b"))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv(_ENV, "2.0")  # the user's explicit setting: kept
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
        compilation_cache.enable(str(tmp_path / "c"))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
        compilation_cache.enable("")  # off: nothing changes
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before_time)
        jax.config.update("jax_compilation_cache_dir", before_dir)
        jax_cache.reset_cache()
