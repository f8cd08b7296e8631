"""Segmenting photographs of any size with restored runs: what ``predict``, the screening app and scripts share.

`Segmenter(runs, ...)` wraps one run or an ensemble of runs (their probabilities averaged, `probabilities.probability_of`);
`Segmenter.from_onnx(model)` an exported ONNX model run by ONNX Runtime (`anemia_jax.inference.onnx_engine`), the same
steps around it.
``segment(photos)`` takes upright uint8 RGB photos of any size (`image_io.load_photo`) and, per photo:

1. resizes it to the runs' training resolution exactly as training photos were (`image_io.resize_image`);
2. predicts probabilities, batched over the local devices (optionally with test-time augmentation or a pruned
   UNet++);
3. returns them at the training resolution and resized back to the photo's own size (bilinear per target), with
   the masks ``probability > threshold``;
4. with the per-pixel uncertainty (`anemia_jax.inference.uncertainty.uncertainty_maps`): the entropy of the mean probability
   (what the verdict and the app show; it also rises where ensemble members disagree) and the members' disagreement
   (mutual information; zero for a single run).

The quality verdict of a photo (usable / retake, with reasons) is `anemia_jax.screening.quality.verdict` of
`anemia_jax.screening.quality.measure` (photo, segmentation, target channel).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from anemia_jax.inference import onnx_engine, uncertainty
from anemia_jax.utils import image_io

if TYPE_CHECKING:  # annotations only: the ONNX engine imports neither JAX nor the runs (nor ml_collections)
    from anemia_jax.inference import tta
    from anemia_jax.runs import restore as runs_lib

__all__ = ["PhotoSegmentation", "Segmenter", "fraction_columns"]


@dataclasses.dataclass
class PhotoSegmentation:
    """The segmentation of one photo.

    Attributes:
        probs_model: float32 ``[h, w, C]`` probabilities at the training resolution ``(h, w)``.
        probs: float32 ``[H, W, C]`` probabilities at the photo's own size.
        masks: bool ``[H, W, C]``, ``probs > threshold``.
        members_model: float32 ``[M, h, w, C]`` each ensemble member's probabilities at the training resolution
            (M = 1 for a single run).
        threshold: the probability threshold of ``masks``.
        uncertainty_model: float32 ``[h, w, C]`` per-target entropy (bits, 0..1) of the mean probability
            (`uncertainty.uncertainty_maps`).
        disagreement_model: float32 ``[h, w, C]`` the members' mutual information (bits; 0 for a single run).

    ``uncertainty`` (float32 ``[H, W]``, photo size) is the map people look at: the largest per-target entropy of
    each pixel, resized bilinearly (computed on first use).
    """

    probs_model: np.ndarray
    probs: np.ndarray
    masks: np.ndarray
    members_model: np.ndarray
    threshold: float = 0.5
    uncertainty_model: np.ndarray | None = None
    disagreement_model: np.ndarray | None = None

    def __post_init__(self):
        if self.uncertainty_model is None or self.disagreement_model is None:
            self.uncertainty_model, self.disagreement_model = uncertainty.uncertainty_maps(self.members_model)

    @functools.cached_property
    def uncertainty(self) -> np.ndarray:
        """float32 ``[H, W]``: the per-pixel uncertainty at the photo's size (bits; 0 certain, 1 p = 0.5)."""
        worst = self.uncertainty_model.max(axis=-1, keepdims=True)
        return image_io.resize_probabilities(worst, self.probs.shape[:2])[..., 0]

    def fractions(self) -> np.ndarray:
        """float [C]: the fraction of the photo inside each mask."""
        return self.masks.reshape(-1, self.masks.shape[-1]).mean(axis=0)

    def overlay(self, photo: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]``: ``photo`` with each mask tinted and outlined (`image_io.overlay`), the outline
        about 1/300 of the photo's longest side so that it stays visible on a full-size photo."""
        return image_io.overlay(photo, self.masks, outline=max(1, round(max(photo.shape[:2]) / 300)))

    def display(self, photo: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(photo, overlay, uncertainty)`` drawn at most ``max_side`` pixels on a side, for a screen.

        The photo is shrunk first (bilinear) and the masks and the uncertainty map are resized from the training
        resolution straight to that size, so the cost does not grow with the photo: drawing a 12-megapixel photo's
        overlay and uncertainty map at full size and shrinking them took 4-5 s of the page's answer (load ~8, 2
        cores; experiments/results/photo_latency/). The same picture as `overlay` shrunk, up to resampling.

        Returns:
            uint8 ``[h, w, 3]`` the photo and its overlay (outline 1/300 of the longest side) and float32 ``[h, w]``
            the per-pixel uncertainty (`uncertainty`) at that size.
        """
        h, w = photo.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size == (h, w):
            small, masks = photo, self.masks
        else:
            small = np.asarray(PIL.Image.fromarray(photo).resize((size[1], size[0]), PIL.Image.Resampling.BILINEAR))
            masks = image_io.resize_probabilities(self.probs_model, size) > self.threshold
        worst = self.uncertainty_model.max(axis=-1, keepdims=True)
        uncertainty = image_io.resize_probabilities(worst, size)[..., 0]
        return small, image_io.overlay(small, masks, outline=max(1, round(max(size) / 300))), uncertainty


def fraction_columns(targets: Sequence[str]) -> list[str]:
    """The results-table columns of `PhotoSegmentation.fractions`: ``fraction/<target>`` per target."""
    return [f"fraction/{t}" for t in targets]


class Segmenter:
    """Photos in, probabilities and masks out, with one run or an ensemble of runs (same targets and resolution), or
    with an exported ONNX model (`from_onnx`).

    Args:
        runs: restored runs (`restore.load_runs`), on one mesh (for photos, normally this process's devices).
        threshold: probability above which a pixel is in a mask.
        transforms: TTA views (`probabilities.parse_tta`), or None.
        prune_level: UNet++ pruned network L^k, or None.
        batch_size: photos per device call (rounded up to a multiple of the mesh size; default the mesh size).
        temperature: one temperature per target (`anemia_jax.inference.temperature`), or None: the probabilities,
            and so the masks of an ensemble and the uncertainty, are the calibrated ones.

    ``engine`` says which runs the model: ``'jax'`` (the runs, compiled by XLA) or ``'onnxruntime'``. ``temperature``
    is the one applied (an exported model's, as its card records it), or None.
    """

    def __init__(self, runs: Sequence[runs_lib.Run], *, threshold: float = 0.5,
                 transforms: Sequence[tta.Transform] | None = None, prune_level: int | None = None,
                 batch_size: int | None = None, temperature: Sequence[float] | None = None):
        from anemia_jax.inference import probabilities  # noqa: PLC0415 -- JAX: not loaded by the ONNX engine

        self.threshold = _checked_threshold(threshold)
        self.runs = list(runs)
        if not self.runs:
            raise ValueError("A Segmenter needs at least one run.")
        self.temperature = None if temperature is None else [float(t) for t in temperature]
        self.engine = "jax"
        self.onnx_model: onnx_engine.OnnxModel | None = None
        self.mesh = self.runs[0].mesh
        self.batch_size = probabilities.mesh_batch_size(batch_size, self.mesh)
        members = [probabilities.probability_of(run, prune_level=prune_level, transforms=transforms,
                                                temperature=temperature) for run in self.runs]
        self._variables = tuple(v for _, v in members)
        self._members = probabilities.sharded(probabilities.members_fn([fn for fn, _ in members]), self.mesh,
                                              out_axis=1)
        self._image_size = tuple(self.runs[0].image_size)
        self._targets = tuple(self.runs[0].targets)

    @classmethod
    def from_onnx(cls, model: onnx_engine.OnnxModel, *, threshold: float | None = None,
                  batch_size: int | None = None) -> Segmenter:
        """A Segmenter running the exported ``model`` in ONNX Runtime (`onnx_engine.OnnxModel`): its ensemble, test-time
        augmentation and pruning were fixed at export; ``threshold`` defaults to the one its card records;
        ``batch_size`` photos per call (default 1)."""
        self = cls.__new__(cls)
        self.threshold = _checked_threshold(model.threshold if threshold is None else threshold)
        self.runs, self.engine, self.onnx_model, self.mesh = [], "onnxruntime", model, None
        recorded = (model.card.get("temperature") or {}).get("values")  # fixed inside the exported function
        self.temperature = None if not recorded else [float(recorded[t]) for t in model.targets]
        self.batch_size = max(1, int(batch_size or 1))
        self._image_size, self._targets = tuple(model.image_size), tuple(model.targets)
        return self

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) every photo is resized to before prediction."""
        return self._image_size

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    @property
    def workdirs(self) -> list[str]:
        """The run directories the model came from (an exported model's, as its card records them)."""
        if self.onnx_model is not None:
            return [str(r.get("workdir", "")) for r in self.onnx_model.runs]
        return [str(r.workdir) for r in self.runs]

    @property
    def steps(self) -> list[int | None]:
        """The checkpoint step of each run."""
        if self.onnx_model is not None:
            return [r.get("checkpoint", {}).get("step") for r in self.onnx_model.runs]
        return [r.step for r in self.runs]

    @property
    def recorded_quality(self):
        """The first run's recorded ``config.quality`` block (thresholds of older runs), or None."""
        if self.onnx_model is not None:
            runs = self.onnx_model.runs
            return (runs[0].get("config") or {}).get("quality") if runs else None
        return self.runs[0].config.get("quality")

    def warm_up(self) -> None:
        """Compiles the prediction program (or loads it from the persistent compilation cache) and runs it once, so
        that the first photo is answered at full speed: what the page does before it starts listening."""
        self.segment([np.zeros((*self.image_size, 3), np.uint8)])

    def _predict_members(self, inputs: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` at `image_size` -> float32 ``[M, N, H, W, C]``, in batches of `batch_size`."""
        if self.onnx_model is None:
            from anemia_jax.inference import probabilities  # noqa: PLC0415

            return probabilities.predict_images(self._members, self._variables, inputs, self.mesh,
                                                batch_size=self.batch_size, batch_axis=1)
        parts = [self.onnx_model.members(inputs[i:i + self.batch_size]) for i in range(0, len(inputs), self.batch_size)]
        return np.concatenate(parts, axis=1)

    def segment(self, photos: Sequence[np.ndarray]) -> list[PhotoSegmentation]:
        """Segments upright uint8 RGB photos ``[H_i, W_i, 3]`` (any sizes); one `PhotoSegmentation` each."""
        if not len(photos):
            return []
        inputs = np.stack([image_io.resize_image(np.asarray(p, np.uint8), self.image_size) for p in photos])
        members = self._predict_members(inputs)
        out = []
        for i, photo in enumerate(photos):
            probs_model = members[:, i].mean(axis=0)
            probs = image_io.resize_probabilities(probs_model, photo.shape[:2])
            out.append(PhotoSegmentation(probs_model=probs_model, probs=probs, masks=probs > self.threshold,
                                         members_model=members[:, i], threshold=self.threshold))
        return out


def _checked_threshold(threshold: float) -> float:
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1); got {threshold}.")
    return float(threshold)
