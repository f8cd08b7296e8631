"""Procedural phantom of an everted-lower-eyelid photograph, in pure NumPy.

A stand-in for the Eyes-defy-anemia photos (Dimauro et al.) that needs no download: each example is a
portrait close-up of an eye whose lower lid is pulled down by a finger, showing, from top to bottom,
upper-lid skin and lashes, the globe (sclera, iris, pupil, caruncle at the inner corner), the forniceal
conjunctiva (the deep fold against the globe), the palpebral conjunctiva (on the lid, next to the margin),
the lid margin with lashes, and cheek skin. The three masks are exact: they are the sets where the
conjunctival regions are drawn, thresholded at the middle of their anti-aliased edges.

The palpebral and forniceal colour moves from pale pink to deep red with a sampled haemoglobin (Hgb), so
anemia is visible in colour. Red distractors (caruncle, lid margin, erythematous skin, the fingertip, vessels
on the sclera), pale conjunctivas in anemic subjects, lighting gradients, vignetting, specular highlights, site
colour casts, blur and noise keep any colour threshold from recovering the masks.

Everything is a deterministic function of ``(seed, index)``: metadata and scene geometry are drawn in
resolution-free units (fractions of the image height) from their own random streams, so an example rendered at
64 and at 512 pixels shows the same eye with the same masks (up to sampling) and the same Hgb.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anemia_jax.data.datasets.conjunctiva_phantom import scene as scene_lib

ASPECT = scene_lib.ASPECT
"""Width / height of every phantom image (portrait, like the EXIF-rotated Eyes-defy-anemia photos)."""

SITES = ("PhantomA", "PhantomB")
"""The two acquisition sites; they play the part of countries (different skin tones and camera casts)."""

MASK_NAMES = ("palpebral", "forniceal", "forniceal_palpebral")

# WHO adult anemia thresholds in g/dL (non-pregnant women, men).
WHO_HGB_THRESHOLD = {"F": 12.0, "M": 13.0}

# Independent random streams per example, so that adding a feature to one part of the scene does not reshuffle
# the others and metadata does not depend on the rendering resolution.
_META_STREAM, _SCENE_STREAM, _FIELD_STREAM, _PIXEL_STREAM = range(4)


@dataclasses.dataclass(frozen=True)
class PhantomExample:
    """One phantom photo with its masks and metadata.

    Attributes:
      image: uint8 ``[H, W, 3]`` RGB photo, ``W = round(ASPECT * H)``.
      palpebral, forniceal, forniceal_palpebral: uint8 ``[H, W]`` masks with values in {0, 1};
        palpebral and forniceal are disjoint and their union is forniceal_palpebral.
      patient_id: ``'<site>/<index + 1>'``, e.g. ``'PhantomA/17'``.
      country: the site, one of `SITES`.
      hgb: haemoglobin in g/dL (one decimal).
      gender: 'F' or 'M'.
      age: years.
      anemic: 1 if Hgb is below the WHO threshold for the gender, else 0.
    """

    image: np.ndarray
    palpebral: np.ndarray
    forniceal: np.ndarray
    forniceal_palpebral: np.ndarray
    patient_id: str
    country: str
    hgb: float
    gender: str
    age: float
    anemic: int


def image_shape(long_side: int) -> tuple[int, int]:
    """``(H, W)`` of a phantom image whose long (vertical) side is ``long_side`` pixels."""
    if long_side < 16:
        raise ValueError(f"long_side must be at least 16 pixels to draw an eye; got {long_side}.")
    return long_side, int(round(ASPECT * long_side))


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative integers; got seed={seed}, index={index}.")
    return np.random.default_rng([seed, index, stream])


def sample_metadata(seed: int, index: int) -> dict[str, object]:
    """Patient metadata of example ``index``: site, gender, age, Hgb and WHO anemia status.

    Hgb is gender-dependent (women N(12.0, 1.9), men N(13.1, 1.9), clipped to [6, 18] g/dL), which gives an
    overall distribution close to N(12.5, 2) and roughly 40 % anemic subjects, as in anemia-screening cohorts.
    """
    rng = _rng(seed, index, _META_STREAM)
    country = SITES[int(rng.random() < 0.55)]
    gender = "F" if rng.random() < 0.55 else "M"
    age = float(np.round(np.clip(rng.normal(45.0, 17.0), 18.0, 90.0)))
    mean = 12.0 if gender == "F" else 13.1
    hgb = float(np.round(np.clip(rng.normal(mean, 1.9), 6.0, 18.0), 1))
    return dict(
        patient_id=f"{country}/{index + 1}",
        country=country,
        hgb=hgb,
        gender=gender,
        age=age,
        anemic=int(hgb < WHO_HGB_THRESHOLD[gender]),
    )


def generate_example(seed: int, index: int, *, long_side: int = 256) -> PhantomExample:
    """Renders example ``index`` of the phantom set ``seed`` at ``long_side`` pixels (see `image_shape`)."""
    meta = sample_metadata(seed, index)
    scene = scene_lib.sample_scene(_rng(seed, index, _SCENE_STREAM), meta)
    height, width = image_shape(long_side)
    image, masks = scene_lib.render(
        scene,
        height,
        width,
        field_rng=_rng(seed, index, _FIELD_STREAM),
        pixel_rng=_rng(seed, index, _PIXEL_STREAM),
    )
    return PhantomExample(image=image, **masks, **meta)


def generate(seed: int, num_examples: int, *, long_side: int = 256, start: int = 0):
    """Yields examples ``start, ..., start + num_examples - 1`` of phantom set ``seed`` (`PhantomExample`)."""
    for index in range(start, start + num_examples):
        yield generate_example(seed, index, long_side=long_side)

