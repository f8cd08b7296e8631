"""Host-side image handling shared by the input pipeline, prediction, panels and the app (PIL + NumPy).

* `load_photo` / `decode_photo`: a photo file or its bytes -> upright uint8 RGB ``[H, W, 3]`` (EXIF orientation
  applied, alpha dropped, greyscale expanded, 16-bit images scaled to 8 bits rather than clipped), with optional
  caps on the file's bytes (regular files only, `input_files`) and on the pixels, the latter checked from the header
  before anything is decoded (`TooManyPixelsError`: a decompression bomb is refused unread).
* `open_image`: encoded bytes -> a PIL image whose "unreadable" error says what is wrong rather than naming an
  in-memory buffer (``<_io.BytesIO object at 0x...>``); callers name the file.
* `resize_image`: photo resizing as training does it (Lanczos, antialiased when shrinking; the aspect ratio is not
  kept), so that prediction sees inputs of the same character as training.
* `decode_mask`: an encoded {0, 1} mask -> uint8 {0, 1} at a size, by area coverage (stays binary).
* `resize_probabilities`: per-pixel probabilities back to a photo's size (bilinear per channel).
* `overlay`: the one mask renderer: each mask tinted in its colour (`COLORS`), optionally outlined, largest first so
  that a nested region stays visible. Its cost grows with the masks' bounding box, not with the outline width (a
  separable running minimum, `scipy.ndimage.minimum_filter`), so a 12-megapixel phone photo takes well under a second
  (``experiments/predict_timing.py``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
from scipy import ndimage

from anemia_jax.utils import input_files

__all__ = ["COLORS", "TooManyPixelsError", "decode_mask", "decode_photo", "load_photo", "open_image", "overlay",
           "resize_image", "resize_probabilities", "to_rgb8"]

# Overlay colours (RGB), one per target channel, in order; no red, which would vanish on conjunctiva.
COLORS = ((255, 230, 0), (0, 190, 255), (255, 0, 255), (0, 255, 120), (255, 140, 0))
DEFAULT_ALPHA = 0.45


def to_rgb8(image: PIL.Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 RGB ``[H, W, 3]``; 16- and 32-bit greyscale are scaled to 8 bits by their bit depth
    (PIL's own ``convert('RGB')`` clips them at 255, turning a 16-bit photo into black and white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class TooManyPixelsError(ValueError):
    """A photo whose header announces more pixels than the cap of what reads it (checked before decoding)."""


def open_image(data: bytes) -> PIL.Image.Image:
    """``PIL.Image.open`` of encoded bytes (lazy: call ``load()``). Unknown formats raise
    ``PIL.UnidentifiedImageError`` with a message about the bytes, not about the in-memory buffer holding them."""
    try:
        return PIL.Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError:
        what = "the file is empty" if not data else f"its first bytes {bytes(data[:8])!r} are no known image format"
        raise PIL.UnidentifiedImageError(f"not a readable image ({what}; JPEG, PNG, BMP, TIFF, WebP or GIF expected)"
                                         ) from None


def decode_photo(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Encoded photo bytes -> upright uint8 RGB ``[H, W, 3]`` (see `to_rgb8`).

    Args:
        data: the encoded photo.
        max_pixels: the largest width x height accepted, read from the header before decoding (None: PIL's own
            decompression-bomb limit only).

    Raises:
        TooManyPixelsError: the header announces more than ``max_pixels`` pixels.
        OSError / ValueError / SyntaxError / EOFError / PIL.Image.DecompressionBombError: not a readable image.
    """
    with open_image(data) as im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise TooManyPixelsError(f"it is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); the "
                                     f"limit is {max_pixels / 1e6:g} megapixels")
        im.load()
        return to_rgb8(PIL.ImageOps.exif_transpose(im))


def load_photo(path: str | os.PathLike, *, max_bytes: int | None = None, max_pixels: int | None = None
               ) -> np.ndarray:
    """A photo file (local or a URL) -> upright uint8 RGB ``[H, W, 3]`` (`decode_photo`). Only a regular file is
    read, and at most ``max_bytes`` of it (`input_files.read_file`: a FIFO or a device is refused, never waited on).

    Raises:
        FileNotFoundError, input_files.NotARegularFileError, input_files.FileTooLargeError: as `read_file`.
        TooManyPixelsError and the decoding errors of `decode_photo`.
    """
    return decode_photo(input_files.read_file(path, max_bytes=max_bytes, what="Photo"), max_pixels=max_pixels)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> uint8 ``[H, W, 3]`` at ``size = (H, W)`` with Lanczos (antialiased when shrinking),
    exactly as the input pipeline resizes training photos."""
    if image.shape[:2] == tuple(size):
        return image
    resized = PIL.Image.fromarray(image).resize((size[1], size[0]), PIL.Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def decode_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Encoded {0, 1} mask -> uint8 ``[H, W]`` in {0, 1} at ``size``: area-resized coverage thresholded at one
    half (any non-zero pixel counts as inside)."""
    with open_image(data) as im:
        binary = np.asarray(im.convert("L")) > 0
    if binary.shape == tuple(size):
        return binary.astype(np.uint8)
    coverage = PIL.Image.fromarray(binary.astype(np.float32))  # Mode "F".
    coverage = coverage.resize((size[1], size[0]), PIL.Image.Resampling.BOX)
    return (np.asarray(coverage) >= 0.5).astype(np.uint8)


def resize_probabilities(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float ``[h, w, C]`` probabilities -> float32 ``[H, W, C]`` at ``size = (H, W)``, bilinear per channel (stays
    in [0, 1])."""
    probs = np.asarray(probs, np.float32)
    if probs.shape[:2] == tuple(size):
        return probs
    out = np.empty((*size, probs.shape[-1]), np.float32)
    for c in range(probs.shape[-1]):
        out[..., c] = np.asarray(PIL.Image.fromarray(np.ascontiguousarray(probs[..., c])).resize(
            (size[1], size[0]), PIL.Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0, out=out)  # in place: a photo-sized copy less


def overlay(image: np.ndarray, masks: np.ndarray, *, alpha: float = DEFAULT_ALPHA, outline: int = 0,
            colors: Sequence[tuple[int, int, int]] = COLORS) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``image`` with each channel of ``masks`` (bool/{0,1} ``[H, W, C]``) tinted in its colour.

    Args:
        image: uint8 RGB ``[H, W, 3]``.
        masks: ``[H, W, C]``; channel c is drawn in ``colors[c % len(colors)]``, largest region first, so that a
            region nested in another (palpebral in forniceal_palpebral) stays visible.
        alpha: opacity of the tint.
        outline: width in pixels of a solid outline along each region's inner border (0: none).
    """
    result = np.array(image, dtype=np.uint8, copy=True)
    masks = np.asarray(masks).astype(bool)
    box = _bounding_box(masks.any(axis=-1), pad=max(outline, 0))
    if box is None:
        return result
    # Only pixels inside a mask change: their values are computed alone (in float32, channel after channel, as a
    # whole-image float copy would), inside the masks' bounding box grown by the outline width.
    crop, masks = result[box], masks[box]
    inside = masks.any(axis=-1)
    values, selected = crop[inside].astype(np.float32), masks[inside]
    order = np.argsort(-selected.sum(0), kind="stable")
    for c in order:
        m = selected[:, c]
        colour = np.asarray(colors[c % len(colors)], np.float32)
        values[m] = (1 - alpha) * values[m] + alpha * colour
        if outline > 0 and m.any():
            # Erosion by a (2w+1)-square with the border replicated (as PIL's MinFilter does): a separable running
            # minimum, whose cost does not depend on the width. The crop keeps a w-pixel margin of background
            # wherever it is not the photo's border, so cropping changes nothing.
            region = masks[..., c]
            eroded = ndimage.minimum_filter(region.view(np.uint8), size=2 * outline + 1, mode="nearest") > 0
            values[(region & ~eroded)[inside]] = colour
    crop[inside] = np.clip(values, 0, 255).astype(np.uint8)
    return result


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """The slices of the smallest box holding ``mask``'s pixels, grown by ``pad`` (clipped to the array)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, h)),
            slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, w)))
