"""XLA CPU-backend flags that anemia_jax's commands set before JAX starts its backends (`apply`).

One flag today, measured on the 2-core development machine (jaxlib 0.10.2, batch 8, 128², float32;
experiments/results/cpu_speed/): ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
takes convolutions away from YNNPACK and gives them back to XLA's Eigen/oneDNN path. YNNPACK's
forward and input-gradient convolutions are about as fast as Eigen's, but its weight gradients (a
convolution with a 128x128 "kernel") run at 8-18 GFLOP/s against Eigen's 40-100, which made the
UNet++ train step ~1.8x slower.

How it is applied, and when it is not:

* Who applies it: every command line (`anemia_jax.cli.Command`, which ``python -m anemia_jax.*`` and the
  experiment scripts build before JAX starts), never ``import anemia_jax``: a library has no business changing
  its importer's environment. Research code that imports the losses or models and wants the same CPU speed calls
  `apply()` itself, before its first JAX computation.
* It is appended to ``XLA_FLAGS`` (a user's own flags are kept, never replaced), so it also reaches programs
  the user jits around the models. XLA reads ``XLA_FLAGS`` once, when JAX initialises its backends; if the
  backends are already up, `apply` changes nothing.
* A flag already named in ``XLA_FLAGS`` (any value) is the user's explicit choice and is left alone;
  ``ANEMIA_JAX_XLA_CPU_FLAGS=0`` turns the whole module off.
* Only ``xla_cpu_*`` flags: GPU and TPU compilations ignore them. Only for jaxlib versions where they
  were measured (`TESTED_JAXLIB`): XLA aborts the process on a flag it does not know, and experimental
  flags come and go, so any other version is left untouched (and runs at its own defaults).

Forward-only programs (prediction, the page, evaluation) have no weight gradient, and there YNNPACK's
convolutions are the faster ones: `inference_options` gives them back per program (``jax.jit(...,
compiler_options=...)``), which overrides the process-wide flag for that program only. Probed on the
development machine (UNet++ at 256x256, batch 1, the two compilations alternating in one process, load 3-8): about
15% less CPU time per image (0.57-0.62 s against 0.69-0.72 s); U-Net at batch 1 and UNet++ at batch 8 at parity.
The photo-to-answer benchmark (experiments/results/photo_latency/) measures it end to end.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
# Per-program options of forward-only programs: XLA's own default list of YNNPACK fusions (full enum names: a
# per-program value replaces the whole list, and takes no '-' / short forms), convolutions included again.
INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE"}
TESTED_JAXLIB = ("0.10.",)
OPT_OUT = "ANEMIA_JAX_XLA_CPU_FLAGS"

# What `apply` added in this process (for benchmarks' records).
applied: list[str] = []


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _backends_initialised() -> bool:
    # Without importing JAX: if it has not been imported, nothing has started.
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    try:
        return bool(bridge.backends_are_initialized())
    except AttributeError:  # an older or newer JAX without this helper: assume the worst
        return True


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Appends the missing `FLAGS` to ``XLA_FLAGS`` where that is safe and still takes effect.

    Args:
        environ: the environment to edit (default ``os.environ``; tests pass a dict).

    Returns:
        The ``--flag=value`` strings added (empty when turned off, the jaxlib version is untested, the
        backends are already initialised, or every flag is already set).
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if not _jaxlib_version().startswith(TESTED_JAXLIB) or _backends_initialised():
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in FLAGS.items() if f"--{name}" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added


def inference_options(backend: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """``compiler_options`` for a forward-only program compiled for ``backend`` (``jax.default_backend()``).

    `INFERENCE_OPTIONS` on the CPU backend of a tested jaxlib, unless the module is turned off (`OPT_OUT`) or
    ``XLA_FLAGS`` sets one of their flags to a value other than `FLAGS`' (the user's own choice then holds for
    every program); otherwise ``{}``. Pass the result to ``jax.jit(fn, compiler_options=...)``.
    """
    environ = os.environ if environ is None else environ
    if backend != "cpu" or environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    if not _jaxlib_version().startswith(TESTED_JAXLIB):
        return {}
    current = environ.get("XLA_FLAGS", "")
    for name in INFERENCE_OPTIONS:
        if f"--{name}" in current and f"--{name}={FLAGS.get(name)}" not in current:
            return {}
    return dict(INFERENCE_OPTIONS)
