"""How a photo and its segmentation become the screening model's colour features: one spec, one `compute`.

A `FeatureSpec` is the screening model's input contract, saved inside the model file (`screening_model`): which
mask the colour is read from (``target``), at what size (``feature_size``: the photo and the target's probability
map are both resized to it), where a probability becomes mask (``mask_threshold``), the colour constancy, the
high-hue-ratio threshold, the white-patch fraction and which features. `FeatureSpec.compute` is the only code that
turns photos and probabilities into features: fitting (`anemia_jax.screening.fit`, from out-of-fold predictions)
and serving (`photo_report.PhotoAssessor`: ``predict`` and the page) both call it, so the two cannot drift apart.

Sizes: photos of any size (uint8 RGB, as decoded) are resized to ``feature_size`` with Lanczos, exactly as the
input pipeline resizes training photos (`image_io.resize_image`; a photo already at that size is used as is);
probability maps of any size (normally the model's training resolution) are resized bilinearly
(`image_io.resize_probabilities`) and thresholded: ``mask = probability > mask_threshold``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.screening import colour
from anemia_jax.utils import image_io

__all__ = ["FeatureSpec"]


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What colour features a screening model reads, and how (module docstring).

    Attributes:
        feature_size: (H, W) the photo and the probability map are resized to before colour is read.
        target: the mask (a target of the segmentation runs) the colour is read from.
        mask_threshold: a pixel is in the mask where the target's probability exceeds this, in (0, 1).
        constancy: colour constancy applied first (`colour.CONSTANCY_METHODS`).
        hhr_threshold_deg: hue threshold of the high hue ratio feature (`colour.colour_features`).
        white_fraction: the brightest share of reference pixels taken as white by the white-patch constancy.
        names: the features, in the model's column order (a subset of `colour.FEATURE_NAMES`).
    """

    feature_size: tuple[int, int]
    target: str = "palpebral"
    mask_threshold: float = 0.5
    constancy: str = "none"
    hhr_threshold_deg: float = colour.DEFAULT_HHR_THRESHOLD_DEG
    white_fraction: float = colour.DEFAULT_WHITE_FRACTION
    names: tuple[str, ...] = colour.FEATURE_NAMES

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.feature_size)
        object.__setattr__(self, "feature_size", size)
        object.__setattr__(self, "names", tuple(self.names))
        problems = []
        if len(size) != 2 or min(size) < 1:
            problems.append(f"feature_size {self.feature_size} must be (height, width) >= 1")
        if not self.target:
            problems.append("target must name a mask (e.g. 'palpebral')")
        if not 0.0 < float(self.mask_threshold) < 1.0:
            problems.append(f"mask_threshold {self.mask_threshold} must lie in (0, 1)")
        if self.constancy not in colour.CONSTANCY_METHODS:
            problems.append(f"constancy {self.constancy!r} must be one of {colour.CONSTANCY_METHODS}")
        if not 0.0 < float(self.white_fraction) <= 1.0:
            problems.append(f"white_fraction {self.white_fraction} must lie in (0, 1]")
        unknown = [n for n in self.names if n not in colour.FEATURE_NAMES]
        if not self.names or unknown or len(set(self.names)) != len(self.names):
            problems.append(f"names must be distinct features of {colour.FEATURE_NAMES} (unknown: {unknown})")
        if problems:
            raise ValueError("Invalid feature spec: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------------------------------- computing

    def masks(self, probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
        """bool ``[H, W]`` masks at ``feature_size`` of the target's probability maps (float ``[h_i, w_i]``)."""
        out = []
        for p in probabilities:
            p = np.asarray(p, np.float32)
            if p.ndim != 2:
                raise ValueError(f"a probability map must be [h, w] (the target's channel); got shape {p.shape}.")
            out.append(image_io.resize_probabilities(p[..., None], self.feature_size)[..., 0] > self.mask_threshold)
        return out

    def compute(self, photos: Sequence[np.ndarray], probabilities: Sequence[np.ndarray]) -> colour.ColourFeatures:
        """The features of N photos (uint8 ``[H_i, W_i, 3]``, any size) from their target's probability maps
        (float ``[h_i, w_i]``, any size): both resized to ``feature_size``, the map thresholded."""
        if len(photos) != len(probabilities):
            raise ValueError(f"got {len(photos)} photos and {len(probabilities)} probability maps; pass one each.")
        return self.compute_from_masks(photos, self.masks(probabilities))

    def compute_from_masks(self, photos: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> colour.ColourFeatures:
        """The features of N photos inside given masks (bool ``[H, W]`` at ``feature_size``, e.g. reference masks
        read at that size): what the ground-truth rows of a screening table use."""
        images = [image_io.resize_image(np.asarray(p, np.uint8), self.feature_size) for p in photos]
        for m in masks:
            if np.shape(m)[:2] != self.feature_size:
                raise ValueError(f"masks must be at feature_size {self.feature_size}; got {np.shape(m)}.")
        features = colour.batch_colour_features(images, [np.asarray(m, bool) for m in masks],
                                                constancy=self.constancy, hhr_threshold_deg=self.hhr_threshold_deg,
                                                white_fraction=self.white_fraction)
        return features.select(self.names)

    # ---------------------------------------------------------------------------------------- serialising

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-ready Python (what the screening model file stores)."""
        return {"feature_size": list(self.feature_size), "target": self.target,
                "mask_threshold": float(self.mask_threshold), "constancy": self.constancy,
                "hhr_threshold_deg": float(self.hhr_threshold_deg), "white_fraction": float(self.white_fraction),
                "names": list(self.names)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, names: Sequence[str] | None = None) -> FeatureSpec:
        """The spec of `to_json`, or of a schema-1 model file's ``colour`` block (``names`` then come from the
        file's ``feature_names``; the missing fields take the values those files were computed with).

        Raises:
            ValueError: a missing or invalid field (the message names it).
        """
        if not isinstance(data, Mapping) or "feature_size" not in data:
            raise ValueError("the feature spec needs feature_size (H, W).")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"the feature spec has unknown field(s) {unknown}; known: {sorted(fields)}.")
        values = dict(data)
        if names is not None and "names" not in values:
            values["names"] = tuple(names)
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"the feature spec is malformed: {e}.") from None
