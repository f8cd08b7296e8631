"""Exporting trained runs for use outside this package: a StableHLO program, or the bundle ONNX is converted from.

`export_stablehlo` serialises ``images_u8 [N, H, W, 3] -> probabilities`` (N symbolic) with `jax.export`, the
variables embedded as constants; `load` reads it back. `onnx_bundle` writes what the ONNX environment converts
(`anemia_jax.inference.export_onnx`). The command is ``python -m anemia_jax.export``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

__all__ = ["export_stablehlo", "load", "onnx_bundle"]


def export_stablehlo(fn, variables: Any, image_size: Sequence[int], *, platforms: Sequence[str] | None = None):
    """``jax.export.Exported`` of ``images_u8 [N, H, W, 3] -> fn(variables, images_u8)``, N symbolic.

    Args:
        fn: a per-device inference function ``probs(variables, images_u8)`` (`anemia_jax.inference.probabilities`).
        variables: its variables; they are copied to the host and embedded in the program as constants.
        image_size: (H, W) of the input.
        platforms: lowering platforms (e.g. ``('cpu', 'cuda', 'tpu')``); None: this machine's.

    Returns:
        The `jax.export.Exported`; ``.serialize()`` gives the bytes to save.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    host = jax.tree.map(np.asarray, jax.device_get(variables))

    def probabilities(images):
        return fn(host, images)

    (n,) = jax.export.symbolic_shape("N")
    h, w = (int(s) for s in image_size)
    spec = jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8)
    return jax.export.export(jax.jit(probabilities), platforms=platforms)(spec)


def load(path: str | os.PathLike):
    """A StableHLO export written by this command, ready to call: ``load(path).call(images_u8)``."""
    import jax  # noqa: PLC0415

    return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))


def onnx_bundle(runs, out: str | os.PathLike, *, card: dict, prune_level: int | None = None,
                transforms=None, temperature=None) -> pathlib.Path:
    """Writes the ONNX conversion bundle of ``runs`` to ``out`` (`anemia_jax.inference.export_onnx.write_bundle`)."""
    from anemia_jax.inference import export_onnx  # noqa: PLC0415

    members = [export_onnx.member_spec(run.config.model.name, run.model, prune_level=prune_level,
                                       transforms=transforms, temperature=temperature) for run in runs]
    return export_onnx.write_bundle(out, members=members, variables=[run.variables for run in runs],
                                    image_size=runs[0].image_size, targets=runs[0].targets, card=card)
