"""Decoding the Eyes-defy-anemia photos (EXIF orientation applied) and encoding the stored copy.

The photos are ~3000x4000 JPEGs whose pixels are stored landscape with an EXIF orientation tag. They are decoded
with JPEG draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) to the smallest size that still covers what is
needed — the stored resolution and the mask resolution used by the alignment check — which makes preparing the set
several times faster than decoding at full size.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageOps

from anemia_jax.data.datasets.eyes_defy_anemia.masks import UnreadableImageError
from anemia_jax.utils import image_io

JPEG_QUALITY = 95


def load_photo(data: bytes, *, min_long_side: int | None = None) -> Image.Image:
    """Decodes a photo to RGB with its EXIF orientation applied.

    Args:
      data: encoded image bytes (JPEG, PNG, ...).
      min_long_side: if given, the decoded long side may be reduced (JPEG draft) but stays >= this.

    Raises:
      UnreadableImageError: the bytes are not a decodable image (truncated, corrupt, not an image).
    """
    try:
        img = image_io.open_image(data)  # its errors describe the bytes, not the in-memory buffer
        if min_long_side is not None and img.format == "JPEG":
            w, h = img.size
            scale = min_long_side / max(w, h)
            if scale < 1:
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            return Image.fromarray(image_io.to_rgb8(img))  # 16-bit photos scaled to 8 bits, not clipped
        return img.convert("RGB")
    except Exception as e:  # Pillow signals corrupt files with many exception types.
        raise UnreadableImageError(f"{type(e).__name__}: {e}") from e


def stored_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) with the long side shrunk to ``long_side``; smaller images keep their size (no upscaling)."""
    w, h = size
    scale = min(1.0, long_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_photo(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased (Lanczos) resize to ``size`` = (width, height)."""
    return photo if photo.size == tuple(size) else photo.resize(tuple(size), Image.Resampling.LANCZOS)


def encode_jpeg(photo: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes (no EXIF: the pixels are already upright)."""
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
