"""Colour science and conjunctival colour features for anemia screening (host-side NumPy).

Colour spaces (all float64, channel-last):

* sRGB (IEC 61966-2-1) encoded values in [0, 1] -> linear RGB by the piecewise transfer function
  ``C <= 0.04045: C / 12.92, else ((C + 0.055) / 1.055) ** 2.4``.
* linear RGB -> CIE XYZ (D65) by the sRGB primaries matrix `SRGB_TO_XYZ` (Lindbloom's 7-digit form), Y of white = 1.
* XYZ -> CIELAB (CIE 1976 L*a*b*) relative to the D65 white `D65_WHITE` (the matrix's row sums, so sRGB white maps to
  L* = 100, a* = b* = 0 exactly): ``f(t) = t ** (1/3) if t > (6/29) ** 3 else t / (3 (6/29) ** 2) + 4/29``,
  ``L* = 116 f(Y/Yn) - 16``, ``a* = 500 (f(X/Xn) - f(Y/Yn))``, ``b* = 200 (f(Y/Yn) - f(Z/Zn))``.
  Reference values: sRGB (255, 0, 0) -> (53.24, 80.09, 67.20); (128, 128, 128) -> (53.59, 0, 0).
* HSI hue (Gonzalez & Woods): ``theta = arccos(((R-G) + (R-B)) / 2 / sqrt((R-G)^2 + (R-B)(G-B)))`` in degrees,
  ``H = theta if B <= G else 360 - theta``; greys (R = G = B) get H = 0.

`colour_features(image, mask)` summarises the pixels of one photo inside one mask (bool, or numeric with > 0.5
inside). Every feature is computed on sRGB-encoded pixel values: as stored in the photo (``constancy='none'``), or
after a colour-constancy correction estimated from the same photo (no camera calibration is possible: Collings et
al. calibrate with an in-frame colour card, which the public archives do not provide). Features (`FEATURE_NAMES`):

* ``lab_l``, ``lab_a``, ``lab_b``: mean CIELAB L*, a*, b* over the mask's pixels (mean of per-pixel values). Dimauro
  et al. 2018 estimate Hgb from the a* (red-green) component of the palpebral conjunctiva.
* ``a_over_l``: mean a* / mean L* (ratio of the means), redness relative to lightness; 0 where L* = 0 (black
  pixels have a* = 0 too), so a black photo's features stay finite.
* ``mean_r``, ``mean_g``, ``mean_b``: mean sRGB-encoded channel values in [0, 1].
* ``chrom_r``, ``chrom_g``, ``chrom_b``: normalised chromaticities of the mean colour, ``r = R / (R + G + B)`` with
  R, G, B the channel means (ratio of means, so dark pixels do not make it undefined); 1/3 each (neutral) where all
  three means are 0 (a black photo).
* ``erythema_index``: Collings et al. 2016's erythema index ``EI = 100 (log10(1/G) - log10(1/R)) = 100 log10(R/G)``,
  computed per pixel on 8-bit-scale values with each channel clipped below at 1 (log of 0 is undefined) and
  averaged over the mask. (Collings et al. apply it to colour-calibrated images; ours are not calibrated.)
* ``hhr``: high hue ratio, the fraction of mask pixels whose HSI hue exceeds ``hhr_threshold_deg`` (default 342
  degrees, i.e. 0.95 of the hue circle), after Chen et al. 2016 (also used by Bevilacqua et al. 2016). Chen et al.
  set their threshold on their own images; ours is a documented parameter, not their value.

An empty mask yields NaN for every feature and ``num_pixels = 0`` (never a silent 0), so downstream statistics must
exclude it (`screening` does, and counts it).

Beside the features, `batch_colour_features` measures what says whether a photo was taken in light like the training
photos' (`anemia_jax.screening.colour_domain` compares them with the training distribution): ``brightness``, the mean
luma of the whole photo (Rec. 709 weights on the encoded values, 0..1), and ``light``, the log chromaticity
``(log(eR/eG), log(eB/eG))`` of the grey-world illuminant of the reference pixels (outside the mask; NaN without a
usable reference pixel), estimated whatever the ``constancy``: a colour cast of the light or the camera moves it.

Colour constancy (``constancy=``, `CONSTANCY_METHODS`). Photos come from different phones and light; both methods
estimate the colour of the light, an illuminant e = (eR, eG, eB) in LINEAR RGB, from reference pixels of the same
photo, and apply the von Kries diagonal correction ``c' = c * Y(e) / e_c`` per channel (Y(e) = the luminance of e,
the `SRGB_TO_XYZ` Y row), so the estimated light becomes a neutral grey of the same luminance: the correction
changes the light's colour, not its brightness (exposure differences remain). Corrected linear values are clipped
to [0, 1] and re-encoded to sRGB before the features. Reference pixels: ``reference_mask`` if given, else every
pixel OUTSIDE the feature mask (the conjunctiva whose colour carries Hgb must not set its own correction), minus
clipped pixels (any channel >= 250/255 or every channel <= 2/255), which say nothing about the light's colour.

* ``grey_world`` (Buchsbaum 1980): e = the mean linear colour of the reference pixels, i.e. the scene is assumed
  grey on average. Failure modes: scene content leaks into the correction -- a frame filled by skin (orange-red)
  is "corrected" towards cyan, darker skin or more skin in the frame shifts the estimate, a pale conjunctiva next to
  a red one reads differently depending on how much lid is in view. It needs no particular object in the photo and
  never fails when any unclipped pixel is outside the mask.
* ``white_patch`` (the robust max-RGB / white-patch Retinex of Land & McCann 1971; Funt & Shi 2010): e = the mean
  linear colour of the brightest ``white_fraction`` (default 5%) of the reference pixels by luminance. In an
  everted-lid photo the brightest unclipped pixels outside the conjunctiva are the sclera (the white of the eye)
  and specular highlights on wet tissue, both of which reflect the light's own colour (a specular reflection is the
  illuminant's colour under the dichromatic model), so no chart is needed. Failure modes: a photo cropped without
  sclera (the brightest pixels are then skin or lid, and a red reference makes the conjunctiva look pale); a
  discoloured sclera (jaundice, age-related yellowing, pinguecula, subconjunctival bleeding) biases the estimate
  blue or green; an over-exposed photo whose sclera is clipped leaves only dimmer pixels (clipped ones are dropped);
  flash glare on glasses or the lashes; a tight ``reference_mask`` with too few pixels. With no usable reference
  pixel the features are NaN (the photo is excluded and counted), never computed uncorrected.

References for colour constancy: Buchsbaum G. A spatial processor model for object colour perception. J. Franklin
Inst. 310(1):1-26, 1980. Land E.H., McCann J.J. Lightness and retinex theory. JOSA 61(1):1-11, 1971. Funt B.,
Shi L. The rehabilitation of MaxRGB. Color and Imaging Conference 18, 2010. Ebner M. Color Constancy. Wiley, 2007.

References:
    Collings S. et al. Non-invasive detection of anaemia using digital photographs of the conjunctiva. PLoS ONE
    11(4): e0153286, 2016. doi:10.1371/journal.pone.0153286.
    Dimauro G., Caivano D., Girardi F. A new method and a non-invasive device to estimate anemia based on digital
    images of the conjunctiva. IEEE Access 6, 2018. doi:10.1109/ACCESS.2018.2867110.
    Chen Y.-M., Miaou S.-G., Bian H. Examining palpebral conjunctiva for anemia assessment with image processing
    methods. Computer Methods and Programs in Biomedicine, 2016.
    Bevilacqua V. et al. A novel approach to evaluate blood parameters using computer vision techniques. IEEE
    International Symposium on Medical Measurements and Applications (MeMeA), 2016.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CONSTANCY_METHODS",
    "D65_WHITE",
    "FEATURE_NAMES",
    "SRGB_TO_XYZ",
    "ColourFeatures",
    "batch_colour_features",
    "colour_features",
    "correct_colour",
    "estimate_illuminant",
    "hsi_hue",
    "linear_to_srgb",
    "srgb_to_lab",
    "srgb_to_linear",
    "to_unit_rgb",
    "xyz_to_lab",
]

SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375],
     [0.2126729, 0.7151522, 0.0721750],
     [0.0193339, 0.1191920, 0.9503041]], np.float64)
D65_WHITE = SRGB_TO_XYZ.sum(axis=1)  # (0.95047, 1.0, 1.08883)

FEATURE_NAMES = (
    "lab_l", "lab_a", "lab_b", "a_over_l",
    "mean_r", "mean_g", "mean_b",
    "chrom_r", "chrom_g", "chrom_b",
    "erythema_index", "hhr",
)
DEFAULT_HHR_THRESHOLD_DEG = 342.0
CONSTANCY_METHODS = ("none", "grey_world", "white_patch")
DEFAULT_WHITE_FRACTION = 0.05
# Encoded values at or beyond these are clipped by the camera: they carry no information about the light's colour.
_CLIP_HIGH, _CLIP_LOW = 250.0 / 255.0, 2.0 / 255.0
# Luminance weights summing to exactly 1 (the matrix row sums to 1.0000001), so a neutral light gets gains of 1.
_LUMA = SRGB_TO_XYZ[1] / SRGB_TO_XYZ[1].sum()

_DELTA = 6.0 / 29.0


def to_unit_rgb(image: np.ndarray) -> np.ndarray:
    """Returns an sRGB-encoded photo as float64 in [0, 1].

    Args:
        image: [..., 3]; uint8 (0..255, divided by 255) or float already in [0, 1].
    """
    image = np.asarray(image)
    if image.shape[-1:] != (3,):
        raise ValueError(f"expected an RGB image with a trailing axis of 3 channels; got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"image must be uint8 (0..255) or float in [0, 1]; got dtype {image.dtype}.")
    out = image.astype(np.float64)
    if out.size and (np.nanmin(out) < 0.0 or np.nanmax(out) > 1.0):
        raise ValueError(f"float images must lie in [0, 1] (got range [{np.nanmin(out):.3g}, {np.nanmax(out):.3g}]); "
                         "divide 8-bit data by 255 or pass it as uint8.")
    return out


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB decoding: encoded [..., 3] in [0, 1] -> linear-light [..., 3] in [0, 1]."""
    rgb = np.asarray(rgb, np.float64)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Inverse of `srgb_to_linear`: linear [..., 3] in [0, 1] -> sRGB-encoded [..., 3] in [0, 1]."""
    linear = np.asarray(linear, np.float64)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.maximum(linear, 0.0) ** (1.0 / 2.4) - 0.055)


def xyz_to_lab(xyz: np.ndarray, white: np.ndarray = D65_WHITE) -> np.ndarray:
    """CIE XYZ [..., 3] -> CIELAB [..., 3] (L* in [0, 100]) relative to the reference ``white`` (Xn, Yn, Zn)."""
    t = np.asarray(xyz, np.float64) / np.asarray(white, np.float64)
    f = np.where(t > _DELTA ** 3, np.cbrt(t), t / (3.0 * _DELTA ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0,
                     500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded [..., 3] (uint8 or float in [0, 1]) -> CIELAB [..., 3] under D65."""
    xyz = srgb_to_linear(to_unit_rgb(rgb)) @ SRGB_TO_XYZ.T
    return xyz_to_lab(xyz)


def hsi_hue(rgb: np.ndarray) -> np.ndarray:
    """HSI hue in degrees [0, 360) of sRGB-encoded [..., 3] values (uint8 or float); greys get 0."""
    rgb = to_unit_rgb(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    num = 0.5 * ((r - g) + (r - b))
    den = np.sqrt((r - g) ** 2 + (r - b) * (g - b))
    grey = den <= 1e-12
    cos = np.clip(num / np.where(grey, 1.0, den), -1.0, 1.0)
    theta = np.degrees(np.arccos(cos))
    hue = np.where(b <= g, theta, 360.0 - theta)
    # 360 - 0 lands on 360 for pure reds with b > g by rounding; fold it into [0, 360).
    return np.where(grey, 0.0, np.mod(hue, 360.0))


def _mask_2d(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise ValueError(f"mask must be [H, W] (or [H, W, 1]) matching the image's {shape}; got {mask.shape}.")
    if mask.dtype != bool:
        # Same rule as anemia_jax.metrics: {0, 1} (or {0, 255}) masks and soft probability maps alike.
        mask = mask > 0.5
    return mask


def _check_constancy(constancy: str) -> None:
    if constancy not in CONSTANCY_METHODS:
        raise ValueError(f"unknown colour constancy {constancy!r}; choose one of {CONSTANCY_METHODS}.")


def estimate_illuminant(image: np.ndarray, reference_mask: np.ndarray, *, constancy: str,
                        white_fraction: float = DEFAULT_WHITE_FRACTION) -> np.ndarray:
    """The light's colour in linear RGB [3] estimated from a photo's reference pixels (module docstring).

    Args:
        image: [H, W, 3] sRGB-encoded photo, uint8 or float in [0, 1].
        reference_mask: [H, W] pixels the estimate may use (bool, or numeric > 0.5); clipped pixels are dropped.
        constancy: 'grey_world' or 'white_patch' ('none' returns (1, 1, 1): no correction).
        white_fraction: share of the brightest reference pixels averaged by 'white_patch', in (0, 1].

    Returns:
        float64 [3] with positive entries, or NaN [3] when no usable reference pixel exists (or the estimate has a
        zero channel, which no diagonal correction can undo).
    """
    _check_constancy(constancy)
    if constancy == "none":
        return np.ones(3)
    if not 0.0 < white_fraction <= 1.0:
        raise ValueError(f"white_fraction must be in (0, 1]; got {white_fraction}.")
    rgb = to_unit_rgb(image)
    if rgb.ndim != 3:
        raise ValueError(f"image must be a single [H, W, 3] photo; got shape {rgb.shape}.")
    pixels = rgb[_mask_2d(reference_mask, rgb.shape[:2])]
    pixels = pixels[(pixels.max(axis=1) < _CLIP_HIGH) & (pixels.max(axis=1) > _CLIP_LOW)]
    if pixels.shape[0] == 0:
        return np.full(3, np.nan)
    linear = srgb_to_linear(pixels)
    if constancy == "white_patch":
        luminance = linear @ _LUMA
        count = max(1, int(round(white_fraction * len(linear))))
        linear = linear[np.argsort(luminance, kind="stable")[-count:]]
    light = linear.mean(axis=0)
    return light if np.all(light > 0.0) else np.full(3, np.nan)


def correct_colour(image: np.ndarray, illuminant: np.ndarray) -> np.ndarray:
    """Von Kries correction of sRGB-encoded pixels [..., 3] for a linear illuminant [3]: light -> neutral grey of
    the same luminance; returns sRGB-encoded float64 [..., 3] in [0, 1] (NaN if the illuminant is NaN)."""
    illuminant = np.asarray(illuminant, np.float64)
    gains = (illuminant @ _LUMA) / illuminant
    # The outer clip absorbs the last-ulp overshoot of the transfer function at 1.
    return np.clip(linear_to_srgb(np.clip(srgb_to_linear(to_unit_rgb(image)) * gains, 0.0, 1.0)), 0.0, 1.0)


def colour_features(image: np.ndarray, mask: np.ndarray, *,
                    hhr_threshold_deg: float = DEFAULT_HHR_THRESHOLD_DEG, constancy: str = "none",
                    reference_mask: np.ndarray | None = None,
                    white_fraction: float = DEFAULT_WHITE_FRACTION) -> dict[str, float]:
    """Colour features of the pixels of one photo inside one mask.

    Args:
        image: [H, W, 3] sRGB-encoded photo, uint8 or float in [0, 1].
        mask: [H, W] (or [H, W, 1]) bool, or numeric with values > 0.5 inside (so {0, 1} masks and
            probability maps both work).
        hhr_threshold_deg: HSI hue threshold (degrees) of the high hue ratio.
        constancy: one of `CONSTANCY_METHODS` (module docstring): 'none' (the photo's own values), 'grey_world' or
            'white_patch'.
        reference_mask: [H, W] pixels the illuminant is estimated from (default: every pixel outside ``mask``).
        white_fraction: share of the brightest reference pixels used by 'white_patch'.

    Returns:
        ``{name: float}`` for every name in `FEATURE_NAMES` (see the module docstring for definitions) plus
        ``num_pixels`` (the mask's pixel count; not a model feature). An empty mask gives NaN for every feature and
        ``num_pixels = 0.0``; a photo without usable reference pixels gives NaN features with its pixel count.
    """
    _check_constancy(constancy)
    rgb = to_unit_rgb(image)
    if rgb.ndim != 3:
        raise ValueError(f"image must be a single [H, W, 3] photo; got shape {rgb.shape}.")
    inside = _mask_2d(mask, rgb.shape[:2])
    pixels = rgb[inside]  # [P, 3]
    count = pixels.shape[0]
    if constancy != "none" and count:
        reference = ~inside if reference_mask is None else _mask_2d(reference_mask, rgb.shape[:2])
        light = estimate_illuminant(rgb, reference, constancy=constancy, white_fraction=white_fraction)
        if not np.all(np.isfinite(light)):
            return {**{name: float("nan") for name in FEATURE_NAMES}, "num_pixels": float(count)}
        pixels = correct_colour(pixels, light)
    if count == 0:
        return {**{name: float("nan") for name in FEATURE_NAMES}, "num_pixels": 0.0}
    lab = srgb_to_lab(pixels).mean(axis=0)
    mean_rgb = pixels.mean(axis=0)
    total = mean_rgb.sum()
    chrom = mean_rgb / total if total > 0 else np.full(3, 1.0 / 3.0)
    # The 8-bit scale with a floor of 1 keeps log10(R/G) finite for black pixels, whatever the input dtype.
    r8 = np.maximum(pixels[:, 0] * 255.0, 1.0)
    g8 = np.maximum(pixels[:, 1] * 255.0, 1.0)
    erythema = 100.0 * np.mean(np.log10(r8) - np.log10(g8))
    hhr = np.mean(hsi_hue(pixels) > hhr_threshold_deg)
    values = {
        "lab_l": lab[0], "lab_a": lab[1], "lab_b": lab[2],
        "a_over_l": lab[1] / lab[0] if lab[0] > 0 else 0.0,
        "mean_r": mean_rgb[0], "mean_g": mean_rgb[1], "mean_b": mean_rgb[2],
        "chrom_r": chrom[0], "chrom_g": chrom[1], "chrom_b": chrom[2],
        "erythema_index": erythema, "hhr": hhr,
    }
    return {**{k: float(v) for k, v in values.items()}, "num_pixels": float(count)}


@dataclasses.dataclass(frozen=True)
class ColourFeatures:
    """Colour features of N (photo, mask) pairs.

    Attributes:
        values: float64 [N, F], column j is feature ``names[j]``; rows of empty masks are all NaN.
        names: the F feature names (`FEATURE_NAMES` by default).
        num_pixels: int64 [N] mask pixel counts (0 marks an empty or missing mask; a positive count with NaN
            values marks a photo whose colour constancy found no reference pixels).
        constancy: the colour-constancy method the values were computed with (`CONSTANCY_METHODS`).
        brightness: float64 [N] mean luma of each whole photo (0..1), or None when not measured.
        light: float64 [N, 2] log chromaticity (log(eR/eG), log(eB/eG)) of each photo's grey-world illuminant (NaN
            rows: no usable reference pixel), or None when not measured (module docstring).
    """

    values: np.ndarray
    names: tuple[str, ...]
    num_pixels: np.ndarray
    constancy: str = "none"
    brightness: np.ndarray | None = None
    light: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """bool [N]: every feature of the example is finite."""
        return np.all(np.isfinite(self.values), axis=1)

    def column(self, name: str) -> np.ndarray:
        """Feature ``name`` for every example, [N]."""
        if name not in self.names:
            raise KeyError(f"unknown feature {name!r}; available: {self.names}.")
        return self.values[:, self.names.index(name)]

    def select(self, names: Sequence[str]) -> ColourFeatures:
        """The same examples restricted to the features ``names`` (in that order)."""
        columns = [self.names.index(n) if n in self.names else None for n in names]
        if None in columns:
            raise KeyError(f"unknown features {[n for n, c in zip(names, columns) if c is None]}; "
                           f"available: {self.names}.")
        return ColourFeatures(self.values[:, columns], tuple(names), self.num_pixels, self.constancy,
                              self.brightness, self.light)


def batch_colour_features(images: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, *,
                          hhr_threshold_deg: float = DEFAULT_HHR_THRESHOLD_DEG, constancy: str = "none",
                          reference_masks: Sequence[np.ndarray] | np.ndarray | None = None,
                          white_fraction: float = DEFAULT_WHITE_FRACTION) -> ColourFeatures:
    """`colour_features` of N examples.

    Args:
        images: [N, H, W, 3] array or a sequence of N [H_i, W_i, 3] photos (sizes may differ), uint8 or float [0, 1].
        masks: [N, H, W] / [N, H, W, 1] array or a sequence of N masks matching their photos. To score one channel of
            a multi-target mask stack use ``masks[..., c]``.
        hhr_threshold_deg, constancy, white_fraction: see `colour_features`.
        reference_masks: N reference masks for the colour constancy (default: outside each mask).
    """
    if len(images) != len(masks) or (reference_masks is not None and len(reference_masks) != len(images)):
        raise ValueError(f"got {len(images)} images, {len(masks)} masks and "
                         f"{'no' if reference_masks is None else len(reference_masks)} reference masks; pass one "
                         "mask (and at most one reference mask) per image.")
    _check_constancy(constancy)
    refs = [None] * len(images) if reference_masks is None else reference_masks
    rows = [colour_features(img, m, hhr_threshold_deg=hhr_threshold_deg, constancy=constancy, reference_mask=ref,
                            white_fraction=white_fraction) for img, m, ref in zip(images, masks, refs)]
    values = np.array([[row[n] for n in FEATURE_NAMES] for row in rows], np.float64).reshape(len(rows),
                                                                                             len(FEATURE_NAMES))
    num_pixels = np.array([row["num_pixels"] for row in rows], np.int64)
    brightness = np.array([float(np.mean(to_unit_rgb(img) @ _LUMA)) for img in images], np.float64)
    light = np.array([_light(img, m, ref) for img, m, ref in zip(images, masks, refs)], np.float64).reshape(-1, 2)
    return ColourFeatures(values, FEATURE_NAMES, num_pixels, constancy, brightness, light)


def _light(image: np.ndarray, mask: np.ndarray, reference_mask: np.ndarray | None) -> np.ndarray:
    """[2] log chromaticity (log(eR/eG), log(eB/eG)) of the photo's grey-world illuminant (module docstring)."""
    rgb = to_unit_rgb(image)
    reference = (~_mask_2d(mask, rgb.shape[:2]) if reference_mask is None
                 else _mask_2d(reference_mask, rgb.shape[:2]))
    light = estimate_illuminant(rgb, reference, constancy="grey_world")
    return np.log(light[[0, 2]] / light[1]) if np.all(np.isfinite(light)) else np.full(2, np.nan)
