"""Decoding the Eyes-defy-anemia mask PNGs, checking that they line up with the photo, and storing them.

Every mask file is a whole-frame *cut-out* of the patient's photo: the region's pixels are the photo's own, the rest
is transparent or white. The encodings found in the archive, and how each is read:

* RGBA (or grey+alpha, or palette/tRNS transparency) where alpha is not opaque everywhere: region = alpha > 0.
* Opaque alpha (or nearly: alpha > 0 on more than `MAX_FRACTION` of the frame), or no alpha at all (RGB, grey):
  a cut-out on a white background. Background = pixels within
  `WHITE_TOLERANCE` of pure white in every channel *that are connected to the image border*; everything else is the
  region. Requiring connection to the border keeps near-white specular highlights inside the conjunctiva in the
  mask (wet tissue reflects the flash); a highlight touching the region's edge can carve a notch, never a hole.
* 16-bit PNGs are scaled to 8 bits; palette PNGs are expanded.
* A PNG whose iCCP (colour profile) chunk Pillow rejects is read again with that chunk removed: the pixel data does
  not depend on it.

Since the cut-out carries the photo's pixels, alignment is checked, not assumed (`check_alignment`): the mask's aspect
ratio must match the photo's (a 90-degree error shows up here), and inside the region the cut-out's colours must
correlate with the photo resized to the mask's size (Pearson correlation of the per-channel-centred RGB values, at
least `MIN_CORRELATION`). An aligned cut-out scores about 0.9-1.0 (same pixels up to resampling and JPEG noise); a
flipped, rotated or far-shifted one scores near 0, because conjunctival texture at different places is uncorrelated.
A cut-out that is only slightly off — made from a 90%-scale crop of the photo, or shifted by a few percent — can
still score up to 0.98, because the region's broad colour gradient survives a small displacement. So the identity
must also be the best fit: the correlation is computed again with the photo sampled under each of
`ALTERNATIVE_GEOMETRIES` (scaled about the centre, shifted), and the cut-out is rejected when one of them matches
better by more than `ALTERNATIVE_MARGIN` (the resampling noise of tiny masks). A genuine cut-out peaks at the
identity; a wrong-scale one peaks at (or near) its own scale. A region too flat to correlate falls back to the mean
absolute difference (at most `MAX_FLAT_MAD` grey levels).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
from PIL import Image
from scipy import ndimage

from anemia_jax.utils import image_io

# A background pixel has every channel >= 255 - WHITE_TOLERANCE (resampled cut-outs blend the edge with white).
WHITE_TOLERANCE = 8
# Pearson correlation an aligned cut-out must reach (aligned: ~0.9-1.0; misplaced: ~0).
MIN_CORRELATION = 0.5
# Regions whose colours vary less than this (std, grey levels) cannot be correlated; MAD decides instead.
MIN_TEXTURE = 2.0
MAX_FLAT_MAD = 12.0
# Fewer region pixels than this cannot be verified (the real masks have tens of thousands).
MIN_PIXELS = 8
# A "cut-out" covering more of the frame than this has no recognisable background: it is not a mask.
MAX_FRACTION = 0.9
# Relative aspect-ratio difference tolerated between mask and photo beyond one pixel of rounding.
ASPECT_TOLERANCE = 0.01
# (scale about the frame centre, shift as a fraction of the width, of the height): mask pixel (x, y) is compared with
# the photo at (cx + scale * (x - cx) + dx * w, cy + scale * (y - cy) + dy * h). Scale < 1: a cut-out of a centred
# crop stretched to the frame; > 1: of a zoomed-out frame.
ALTERNATIVE_GEOMETRIES = ((0.8, 0.0, 0.0), (0.9, 0.0, 0.0), (1 / 0.9, 0.0, 0.0), (1 / 0.8, 0.0, 0.0),
                          (1.0, 0.05, 0.0), (1.0, -0.05, 0.0), (1.0, 0.0, 0.05), (1.0, 0.0, -0.05))
# An alternative geometry rejects the cut-out when its correlation exceeds the identity's by more than this. On the
# test archives (photo via JPEG, masks 18x24 to 150x200 px) genuine cut-outs score at most +0.001 against the best
# alternative (tiny masks: the alternatives move pixels by < 1 px and bilinear sampling smooths JPEG noise), 90%-crop
# cut-outs with 30x40 or larger masks at least +0.036; larger masks separate far more (genuine <= -0.65 at 150x200).
ALTERNATIVE_MARGIN = 0.02
# An alternative geometry is only scored when at least this fraction of the region falls inside the photo.
MIN_OVERLAP = 0.5
# The alternatives are scored on an evenly strided subset of at most this many region pixels: a correlation from
# 10^4 samples is accurate to ~0.01, and the eight geometries cost ~20 ms for a ~800x1067 mask.
MAX_ALTERNATIVE_SAMPLES = 10_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnreadableImageError(ValueError):
    """The bytes could not be decoded as an image (the message says why)."""


@dataclasses.dataclass
class CutOut:
    """A decoded mask file: ``mask`` bool [h, w], ``rgb`` uint8 [h, w, 3] (meaningful inside the mask)."""

    mask: np.ndarray
    rgb: np.ndarray
    encoding: str
    iccp_removed: bool = False


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Result of `check_alignment`: ``ok`` and, if not, ``reason``; the scores are for the report."""

    ok: bool
    reason: str = ""
    correlation: float = float("nan")
    mad: float = float("nan")
    # Best correlation under `ALTERNATIVE_GEOMETRIES` and the geometry that gave it (NaN / None if not computed).
    best_alternative: float = float("nan")
    best_geometry: tuple[float, float, float] | None = None


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(type, payload, crc) of each chunk of a PNG file, without checking CRCs."""
    if not data.startswith(_PNG_SIGNATURE):
        raise UnreadableImageError("not a PNG file (bad signature)")
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise UnreadableImageError(f"PNG chunk {ctype!r} is truncated")
        chunks.append((ctype, data[pos + 8:pos + 8 + length], data[pos + 8 + length:end]))
        pos = end
        if ctype == b"IEND":
            break
    return chunks


def make_png_chunk(ctype: bytes, payload: bytes) -> bytes:
    """A PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def strip_png_chunks(data: bytes, drop: tuple[bytes, ...] = (b"iCCP",)) -> bytes:
    """The PNG file without chunks of the given types (other chunks copied byte for byte)."""
    out = [_PNG_SIGNATURE]
    for ctype, payload, crc in png_chunks(data):
        if ctype not in drop:
            out.append(struct.pack(">I", len(payload)) + ctype + payload + crc)
    return b"".join(out)


def _load(data: bytes) -> Image.Image:
    img = image_io.open_image(data)  # its errors describe the bytes, not the in-memory buffer
    img.load()
    return img


def open_png(data: bytes) -> tuple[Image.Image, bool]:
    """Decodes image bytes; a PNG that fails only because of its iCCP chunk is decoded without it.

    Returns:
      (the loaded image, whether an iCCP chunk had to be removed).

    Raises:
      UnreadableImageError: the bytes are not a decodable image.
    """
    try:
        return _load(data), False
    except Exception as first:  # Pillow raises many types (SyntaxError, OSError, ValueError...) for bad files.
        error = first
    if data.startswith(_PNG_SIGNATURE):
        try:
            if any(c[0] == b"iCCP" for c in png_chunks(data)):
                return _load(strip_png_chunks(data)), True
        except Exception:  # Failing again means the damage is not (only) the profile: report the original error.
            pass
    raise UnreadableImageError(f"{type(error).__name__}: {error}")


def _to_float_channels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour [h, w, 3] in 0..255, alpha [h, w] in 0..255 or None) of any Pillow mode."""
    if img.mode in ("P", "PA") or (img.mode in ("L", "RGB", "I;16", "I") and "transparency" in img.info):
        img = img.convert("RGBA")
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        # 16-bit grey: scale the full 0..65535 range to 0..255.
        grey = grey / 257.0 if mode.startswith("I;16") or grey.max(initial=0) > 255 else grey
        return np.repeat(grey[..., None], 3, axis=-1), None
    if mode == "1":
        mode, img = "L", img.convert("L")
    if mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode else "RGB")
        mode = img.mode
    arr = np.asarray(img, dtype=np.float64)
    if mode == "L":
        return np.repeat(arr[..., None], 3, axis=-1), None
    if mode == "LA":
        return np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1]
    if mode == "RGB":
        return arr, None
    return arr[..., :3], arr[..., 3]


def decode_cutout(data: bytes) -> CutOut:
    """Decodes a mask file into its region and colours (see the module docstring for the encodings).

    Raises:
      UnreadableImageError: undecodable bytes, an empty region, or no recognisable background.
    """
    img, iccp_removed = open_png(data)
    colour, alpha = _to_float_channels(img)
    mask = None
    if alpha is not None and alpha.min() < 255:
        mask, encoding = alpha > 0, "alpha"
        if mask.mean() > MAX_FRACTION:  # a few stray transparent pixels on an opaque white-background cut-out
            mask = None
    if mask is None:
        near_white = np.all(colour >= 255 - WHITE_TOLERANCE, axis=-1)
        labels, _ = ndimage.label(near_white)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        background = np.isin(labels, border[border > 0])
        mask, encoding = ~background, "white_background"
    rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    if not mask.any():
        raise UnreadableImageError(f"the mask is empty ({encoding} encoding, {img.mode} {img.size[0]}x{img.size[1]})")
    if mask.mean() > MAX_FRACTION:
        raise UnreadableImageError(
            f"no transparent or white background: the region would cover {mask.mean():.0%} of the frame "
            f"({img.mode} {img.size[0]}x{img.size[1]}), so this is not a cut-out mask")
    return CutOut(mask=mask, rgb=rgb, encoding=encoding, iccp_removed=iccp_removed)


def _correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(Pearson correlation, std of a, std of b) of two [n, 3] colour arrays, each centred per channel."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    std_a, std_b = np.sqrt((a * a).mean()), np.sqrt((b * b).mean())
    if std_a == 0 or std_b == 0:
        return float("nan"), float(std_a), float(std_b)
    return float((a * b).mean() / (std_a * std_b)), float(std_a), float(std_b)


def _bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``image`` [h, w, c] sampled at (y, x) [n] (all inside the image) with bilinear weights -> [n, c]."""
    h, w = image.shape[:2]
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2) if h > 1 else np.zeros(y.shape, np.int64)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2) if w > 1 else np.zeros(x.shape, np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _best_alternative(small: np.ndarray, region: np.ndarray, colours: np.ndarray
                      ) -> tuple[float, tuple[float, float, float] | None]:
    """Highest correlation of ``colours`` (the cut-out's [n, 3] pixels at ``region``, in np.nonzero order) with
    ``small`` (photo at mask size, [h, w, 3] float) sampled under each of `ALTERNATIVE_GEOMETRIES`, and that
    geometry; (NaN, None) if no geometry keeps `MIN_OVERLAP` of the region inside the photo."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    stride = max(1, -(-len(ys) // MAX_ALTERNATIVE_SAMPLES))
    ys, xs, colours = ys[::stride], xs[::stride], colours[::stride]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    best, best_geometry = -np.inf, None
    for geometry in ALTERNATIVE_GEOMETRIES:
        scale, dx, dy = geometry
        y = cy + scale * (ys - cy) + dy * h
        x = cx + scale * (xs - cx) + dx * w
        inside = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
        if inside.mean() < MIN_OVERLAP:
            continue
        corr = _correlation(colours[inside], _bilinear(small, y[inside], x[inside]))[0]
        if corr > best:
            best, best_geometry = corr, geometry
    return (float(best), best_geometry) if best_geometry is not None else (float("nan"), None)


def check_alignment(photo: Image.Image, cutout: CutOut) -> Alignment:
    """Whether ``cutout`` lines up with ``photo`` (RGB, EXIF orientation applied, any resolution).

    The photo is resized (box filter) to the mask's size; the comparison uses the region shrunk by one pixel when
    enough of it remains, since edge pixels mix region and background. Checks, in order: aspect ratio, correlation
    at least `MIN_CORRELATION` (or, for a flat region, mean absolute difference), and the identity fitting better
    than every alternative geometry (see the module docstring).
    """
    mh, mw = cutout.mask.shape
    pw, ph = photo.size
    expected_h = mw * ph / pw
    if abs(mh - expected_h) > max(1.0, ASPECT_TOLERANCE * mh):
        return Alignment(False, f"mask is {mw}x{mh} but the photo is {pw}x{ph} (aspect {mw / mh:.3f} vs "
                         f"{pw / ph:.3f}): wrong orientation or not a whole-frame cut-out")
    region = ndimage.binary_erosion(cutout.mask)
    if region.sum() < MIN_PIXELS:
        region = cutout.mask
    n = int(region.sum())
    if n < MIN_PIXELS:
        return Alignment(False, f"the region has only {n} pixels: too small to verify")
    small = np.asarray(photo.convert("RGB").resize((mw, mh), Image.Resampling.BOX), dtype=np.float64)
    a = cutout.rgb[region].astype(np.float64)
    b = small[region]
    mad = float(np.abs(a - b).mean())
    corr, std_a, std_b = _correlation(a, b)
    if std_a < MIN_TEXTURE or std_b < MIN_TEXTURE:
        if mad <= MAX_FLAT_MAD:
            return Alignment(True, correlation=float("nan"), mad=mad)
        return Alignment(False, f"flat region whose colours differ from the photo's by {mad:.1f} levels on average "
                         f"(> {MAX_FLAT_MAD})", mad=mad)
    if corr < MIN_CORRELATION:
        return Alignment(False, f"the cut-out's pixels do not match the photo there (correlation {corr:.2f} < "
                         f"{MIN_CORRELATION}): flipped, rotated, shifted or another patient's mask",
                         correlation=corr, mad=mad)
    alt, geometry = _best_alternative(small, region, a)
    if alt > corr + ALTERNATIVE_MARGIN:
        scale, dx, dy = geometry
        return Alignment(False, f"the photo matches the cut-out better scaled by {scale:.2f} and shifted by "
                         f"({dx:+.0%}, {dy:+.0%}) of the frame (correlation {alt:.2f}) than as is ({corr:.2f}): "
                         "the mask was made from a cropped, zoomed or shifted copy of the photo",
                         correlation=corr, mad=mad, best_alternative=alt, best_geometry=geometry)
    return Alignment(True, correlation=corr, mad=mad, best_alternative=alt, best_geometry=geometry)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a bool/{0,1} mask [h, w] to ``size`` = (width, height) -> uint8 [height, width] in {0, 1}.

    Bilinear (area-averaging when shrinking) then a 0.5 threshold: smoother edges than nearest neighbour and no
    half-pixel shift.
    """
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    if img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BILINEAR)
    return (np.asarray(img) >= 128).astype(np.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """PNG bytes of a {0, 1} uint8 mask [H, W] (single channel, values kept as 0/1)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
