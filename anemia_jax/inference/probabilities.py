"""Images -> per-pixel probabilities with trained models: the one inference path of evaluation, prediction and export.

Three layers, each pure and reusable:

* `probability_fn(model, prune_level=, transforms=)`: a per-device function ``probs(variables, images_u8)`` --
  uint8 RGB ``[B, H, W, 3]`` in, float32 sigmoid probabilities ``[B, H, W, C]`` out, the normalisation
  (`anemia_jax.data.normalization`) inside, optionally a pruned UNet++ (``prune_level``) and test-time augmentation
  (`anemia_jax.inference.tta`, averaging probabilities). No mesh, no jit: it runs under `shard_map` here, plainly under
  `jax.jit` for `anemia_jax.export`, and per member of an ensemble.
* `ensemble_fn(members)`: the mean probability of several such functions, ``probs(variables_tuple, images_u8)``,
  e.g. the K models of a K-fold cross-validation (nnU-Net's default way of predicting); `members_fn` keeps them
  apart (``[M, B, H, W, C]``) for uncertainty maps.
* `sharded(fn, mesh)`: ``fn`` data-parallel over the mesh (`jax.shard_map` under `jax.jit`; images split on
  'data', variables replicated), compiled with the forward-only programs' `compiler_options`.

`predict_images` batches host arrays through a sharded function (padding the last batch, so one compilation serves
any number of images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from anemia_jax import models
from anemia_jax.data.normalization import normalize, to_float
from anemia_jax.inference import tta
from anemia_jax.utils import parallel, xla_cpu

PyTree = Any
ProbabilityFn = Callable[[PyTree, jax.Array], jax.Array]

__all__ = ["ProbabilityFn", "compiler_options", "ensemble_fn", "members_fn", "mesh_batch_size", "model_multiple",
           "parse_tta", "predict_images", "probability_fn", "probability_of", "sharded"]


def model_multiple(model) -> int:
    """The size divisor ``model`` needs for its input: ``2**depth`` for the U-Net family (every level halves the
    resolution), or the model's own ``input_multiple`` where it declares one (patch-based transformers)."""
    multiple = getattr(model, "input_multiple", None)
    if multiple:
        return int(multiple)
    return 2 ** int(getattr(model, "depth", 0))


def probability_fn(model, *, prune_level: int | None = None, transforms: Sequence[tta.Transform] | None = None,
                   temperature: Sequence[float] | None = None) -> ProbabilityFn:
    """``probs(variables, images_u8) -> float32 [B, H, W, C]``: the sigmoid probabilities of ``model``.

    Args:
        model: a flax model of `anemia_jax.models` (BatchNorm uses its running statistics: ``train=False``).
        prune_level: UNet++ only: evaluate the pruned network L^k (the head on X^{0,k}); None: the full network.
        transforms: test-time augmentation views (`parse_tta` / `tta.tta_transforms`); None or a single identity
            view means plain prediction.
        temperature: one temperature per target (`anemia_jax.inference.temperature`): the logits are divided by it
            before the sigmoid (calibrated probabilities); None: the model's own.

    Returns:
        A pure per-device function of the model variables (``{'params', 'batch_stats'}``) and uint8 images
        ``[B, H, W, 3]`` (H, W multiples of `model_multiple`); jit it, shard it (`sharded`) or export it.
    """
    kwargs = {} if prune_level is None else {"prune_level": prune_level}
    plain = transforms is None or (len(transforms) == 1 and transforms[0] == tta.Transform())
    scale = None if temperature is None else np.asarray(temperature, np.float32)

    def probs(variables: PyTree, images_u8: jax.Array) -> jax.Array:
        def predict(images_01: jax.Array) -> jax.Array:
            output = model.apply(variables, normalize(images_01), train=False, **kwargs)
            logits = output.logits.astype(jnp.float32)
            return jax.nn.sigmoid(logits if scale is None else logits / scale)

        images = to_float(images_u8)
        if plain:
            return predict(images)
        return tta.predict_with_tta(predict, images, transforms=transforms, multiple=model_multiple(model))

    return probs


def members_fn(members: Sequence[ProbabilityFn]) -> ProbabilityFn:
    """``probs(variables_tuple, images_u8) -> float32 [M, B, H, W, C]``: each member's probabilities, stacked.

    ``variables_tuple[m]`` are member m's variables; the members may be different models (any mix of `probability_fn`
    results) as long as they predict the same targets at the same resolution.
    """
    members = tuple(members)
    if not members:
        raise ValueError("An ensemble needs at least one member.")

    def probs(variables: Sequence[PyTree], images_u8: jax.Array) -> jax.Array:
        if len(variables) != len(members):
            raise ValueError(f"{len(members)} ensemble members but {len(variables)} sets of variables.")
        return jnp.stack([fn(v, images_u8) for fn, v in zip(members, variables)])

    return probs


def ensemble_fn(members: Sequence[ProbabilityFn]) -> ProbabilityFn:
    """``probs(variables_tuple, images_u8) -> float32 [B, H, W, C]``: the mean of the members' probabilities (the
    arithmetic mean of their predictive distributions, as for test-time augmentation)."""
    stacked = members_fn(members)
    return lambda variables, images_u8: jnp.mean(stacked(variables, images_u8), axis=0)


def sharded(fn: ProbabilityFn, mesh: Mesh, *, out_axis: int = 0) -> ProbabilityFn:
    """``fn`` data-parallel over ``mesh`` and jitted: images (and the result) sharded on 'data' along their batch
    axis (``out_axis`` of the result: 1 for `members_fn`'s ``[M, B, ...]``), variables replicated."""
    out_spec = P(*([None] * out_axis), parallel.DATA_AXIS)
    shard = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)), out_specs=out_spec, check_vma=True)

    def run(variables: PyTree, images_u8: jax.Array) -> jax.Array:
        if images_u8.ndim != 4 or images_u8.shape[0] % mesh.size:
            raise ValueError(f"images must be [B, H, W, 3] with B divisible by the {mesh.size} mesh devices; got "
                             f"shape {images_u8.shape}.")
        return shard(variables, images_u8)

    return jax.jit(run, compiler_options=compiler_options())


def compiler_options() -> dict[str, str]:
    """The per-program compiler options of a forward-only program on this backend (`xla_cpu.inference_options`:
    on the CPU, YNNPACK's convolutions, faster than the training flag's choice when there is no weight gradient)."""
    return xla_cpu.inference_options(jax.default_backend())


def parse_tta(flips: str | Sequence[str] = tta.DEFAULT_FLIPS,
              scales: str | Sequence[float] = (1.0,)) -> tuple[tta.Transform, ...]:
    """TTA transforms from comma-separated text or sequences, e.g. ``parse_tta('none,h', '0.75,1,1.25')``."""
    if isinstance(flips, str):
        flips = [f.strip() for f in flips.split(",") if f.strip()]
    if isinstance(scales, str):
        try:
            scales = [float(s) for s in scales.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"TTA scales must be numbers separated by commas, e.g. '0.75,1,1.25'; got {scales!r}.")
    return tta.tta_transforms(tuple(flips), tuple(scales))


def mesh_batch_size(batch_size: int | None, mesh: Mesh) -> int:
    """``batch_size`` (default: the mesh size) rounded up to a positive multiple of the mesh size, as sharded
    functions need."""
    size = mesh.size
    return max(size, math.ceil((batch_size or size) / size) * size)


def predict_images(fn: ProbabilityFn, variables: PyTree, images_u8: np.ndarray, mesh: Mesh, *,
                   batch_size: int | None = None, batch_axis: int = 0) -> np.ndarray:
    """Host uint8 images ``[N, H, W, 3]`` -> host float32 probabilities, through the sharded ``fn`` (`sharded`).

    Images go through in batches of `mesh_batch_size` (``batch_size``) (the last batch is padded), so there is one
    compilation whatever N is. ``batch_axis`` is the result's batch axis (1 for `members_fn`). Single-process meshes
    only: each batch is this process's data.
    """
    images_u8 = np.asarray(images_u8, np.uint8)
    if images_u8.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, 3]; got shape {images_u8.shape}.")
    batch = mesh_batch_size(batch_size, mesh)
    out = []
    for start in range(0, len(images_u8), batch):
        part = images_u8[start:start + batch]
        padded = np.zeros((batch, *part.shape[1:]), np.uint8)
        padded[:len(part)] = part
        probs = parallel.fetch(fn(variables, parallel.host_local_to_global(padded, mesh)))
        out.append(np.take(probs, np.arange(len(part)), axis=batch_axis))
    if not out:
        raise ValueError("predict_images got no images.")
    return np.concatenate(out, axis=batch_axis).astype(np.float32)


def probability_of(runs, *, prune_level: int | None = None,
                   transforms: Sequence[tta.Transform] | None = None, temperature: Sequence[float] | None = None
                   ) -> tuple[ProbabilityFn, Any]:
    """``(probs, variables)`` of one run, or of the ensemble of several (their mean probability): the per-device
    inference function (`anemia_jax.inference.probabilities`) and the variables to call it with; ``temperature``
    (one per target) calibrates each member's probabilities (`probability_fn`).

    Raises:
        ValueError: a ``prune_level`` that a run's model does not support (`models.ModelCapabilities.prune_levels`).
    """
    runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    if prune_level is not None:
        for run in runs:
            levels = models.capabilities_of(run.model).prune_levels
            if prune_level not in levels:
                can = f"levels {', '.join(map(str, levels))}" if levels else "no pruning (UNet++ only)"
                raise ValueError(f"prune_level={prune_level} does not apply to {run.workdir}: its "
                                 f"{run.config.model.name!r} model supports {can}.")
    fns = [probability_fn(run.model, prune_level=prune_level, transforms=transforms, temperature=temperature)
           for run in runs]
    if len(runs) == 1:
        return fns[0], runs[0].variables
    return ensemble_fn(fns), tuple(run.variables for run in runs)
