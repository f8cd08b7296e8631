"""Segmenting new photographs with a trained run: mask PNGs and overlays at each photo's own size.

    python -m anemia_jax.predict --workdir=runs/unetpp photo.jpg more_photos/ --out=masks/
        [--checkpoint=best|latest|<step>] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--threshold=0.5]
        [--prune_level=k] [--batch_size=8]

Each photo (any size or aspect ratio; folders contribute their image files, non-recursively, sorted) is

1. decoded with PIL and turned upright by its EXIF orientation (`PIL.ImageOps.exif_transpose`: phone photos are
   often stored sideways with an orientation tag), then converted to RGB;
2. resized to the model's training resolution exactly as training photos were (Lanczos, aspect not kept);
3. predicted (`run_lib.make_probability_fn`: optionally test-time augmentation or a pruned UNet++);
4. its probabilities resized back to the upright photo's own size (bilinear, per target) and thresholded
   (``p > threshold``).

Outputs in ``--out``: ``<stem>_<target>.png`` (8-bit, 0 background / 255 mask, photo size), ``<stem>_overlay.png``
(the photo with each mask tinted and outlined) and ``predictions.csv`` (file, size, mask fraction per target).
Stems that repeat across folders get ``_2``, ``_3``... appended. A file that cannot be read as an image is reported
with a warning and skipped; the command then ends with exit status 1 and the list of failures.

Photos, folders and ``--out`` may be local or on shared/cloud storage (``gs://...``, through `etils.epath`).

It runs in one process (over that process's devices); photos are batched ``--batch_size`` at a time at the
training resolution, so memory does not grow with the photos' size beyond one decoded photo per batch slot.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
from collections.abc import Iterable, Sequence

import jax
import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
from absl import logging
from etils import epath

from anemia_jax import parallel, reporting, run_lib, tta

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_OVERLAY_ALPHA = 0.4

__all__ = ["IMAGE_SUFFIXES", "PredictionReport", "collect_inputs", "load_photo", "main", "overlay",
           "predict_photos", "resize_probabilities"]


@dataclasses.dataclass
class PredictionReport:
    """What `predict_photos` did: ``written`` maps each photo to its output stem; ``failed`` photo -> reason."""

    written: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[epath.Path], dict[str, str]]:
    """Expands folders into their image files (by suffix, sorted, non-recursive); files are kept whatever their
    suffix. Returns ``(files, missing)`` where missing maps paths that do not exist to a reason."""
    files, missing = [], {}
    for item in inputs:
        path = reporting.as_path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                logging.warning("Folder %s holds no image files (%s).", path, ", ".join(IMAGE_SUFFIXES))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            missing[str(path)] = "no such file or folder"
    return files, missing


def load_photo(path: str | os.PathLike) -> np.ndarray:
    """The upright RGB photo as uint8 [H, W, 3] (EXIF orientation applied; alpha dropped, greyscale expanded).

    Raises:
        OSError / ValueError (PIL's `UnidentifiedImageError` is an OSError): the file is not a readable image.
    """
    with reporting.as_path(path).open("rb") as f, PIL.Image.open(f) as im:
        im.load()
        upright = PIL.ImageOps.exif_transpose(im)
        return np.asarray(upright.convert("RGB"), np.uint8)


def _resize_image(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Lanczos, as `input_pipeline` resizes training photos: the model sees inputs of the same character.
    if photo.shape[:2] == size:
        return photo
    return np.asarray(PIL.Image.fromarray(photo).resize((size[1], size[0]), PIL.Image.Resampling.LANCZOS), np.uint8)


def resize_probabilities(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [h, w, C] probabilities -> float32 [H, W, C] at ``size`` = (H, W), bilinear per channel (stays in
    [0, 1])."""
    probs = np.asarray(probs, np.float32)
    if probs.shape[:2] == tuple(size):
        return probs
    channels = [np.asarray(PIL.Image.fromarray(np.ascontiguousarray(probs[..., c])).resize(
        (size[1], size[0]), PIL.Image.Resampling.BILINEAR)) for c in range(probs.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def overlay(photo: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: ``photo`` with each channel of bool ``masks`` [H, W, C] tinted and outlined in its colour
    (`reporting.COLORS`), larger masks first so a nested one stays visible."""
    out = photo.astype(np.float32)
    width = max(1, round(max(photo.shape[:2]) / 300))  # outline thick enough to see on a full-size photo
    order = np.argsort(-masks.reshape(-1, masks.shape[-1]).sum(0), kind="stable")
    for c in order:
        m = masks[..., c].astype(bool)
        colour = np.asarray(reporting.COLORS[c % len(reporting.COLORS)], np.float32)
        out[m] = (1 - _OVERLAY_ALPHA) * out[m] + _OVERLAY_ALPHA * colour
        mask_image = PIL.Image.fromarray(m.astype(np.uint8) * 255)
        eroded = np.asarray(mask_image.filter(PIL.ImageFilter.MinFilter(2 * width + 1))) > 0
        out[m & ~eroded] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _save_png(image: np.ndarray, path: epath.Path) -> None:
    with path.open("wb") as f:
        PIL.Image.fromarray(image).save(f, format="PNG")


def _unique_stem(path: epath.Path, used: set[str]) -> str:
    stem, k = path.stem, 2
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def predict_photos(run: run_lib.Run, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   threshold: float = 0.5, transforms: Sequence[tta.Transform] | None = None,
                   prune_level: int | None = None, batch_size: int | None = None) -> PredictionReport:
    """Segments every photo of ``inputs`` (files or folders) and writes masks and overlays into ``out``.

    Args:
        run: a restored run (`run_lib.load_run`).
        inputs: photo files and/or folders of photos.
        out: output folder (created; local or a URL).
        threshold: probability above which a pixel is in the mask.
        transforms: TTA views, or None.
        prune_level: UNet++ pruned network L^k, or None.
        batch_size: photos per device call (rounded up to a multiple of the mesh size; default the mesh size).

    Returns:
        A `PredictionReport`; unreadable photos are in ``failed`` (each also warned about), never raised.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1); got {threshold}.")
    out = reporting.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, missing = collect_inputs(inputs)
    report = PredictionReport(failed=dict(missing))
    for path, why in missing.items():
        logging.warning("Skipping %s: %s.", path, why)
    size, targets, mesh = run.image_size, run.targets, run.mesh
    batch = run_lib.mesh_batch_size(batch_size, mesh)
    probability = run_lib.make_probability_fn(run, prune_level=prune_level, transforms=transforms)
    used: set[str] = set()
    rows = []

    def flush(pending: list[tuple[epath.Path, np.ndarray]]) -> None:
        inputs_u8 = np.stack([_resize_image(photo, size) for _, photo in pending])
        probs = run_lib.predict_images(run, inputs_u8, probability=probability, batch_size=batch)
        for i, (path, photo) in enumerate(pending):
            full = resize_probabilities(probs[i], photo.shape[:2]) > threshold
            stem = _unique_stem(path, used)
            for c, t in enumerate(targets):
                _save_png(full[..., c].astype(np.uint8) * 255, out / f"{stem}_{t}.png")
            _save_png(overlay(photo, full), out / f"{stem}_overlay.png")
            report.written[str(path)] = stem
            rows.append([str(path), stem, photo.shape[1], photo.shape[0]] + [f"{full[..., c].mean():.6f}"
                                                                            for c in range(len(targets))])

    pending: list[tuple[epath.Path, np.ndarray]] = []
    for path in files:
        try:
            photo = load_photo(path)
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            # PIL raises SyntaxError for some corrupt headers.
            report.failed[str(path)] = f"{type(e).__name__}: {e}"
            logging.warning("Skipping %s: not a readable image (%s: %s).", path, type(e).__name__, e)
            continue
        pending.append((path, photo))
        if len(pending) == batch:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if jax.process_index() == 0 and rows:
        with io.StringIO(newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "stem", "width", "height"] + [f"fraction/{t}" for t in targets])
            writer.writerows(rows)
            (out / "predictions.csv").write_bytes(f.getvalue().encode("utf-8"))
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anemia_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="Photo files and/or folders of photos.")
    run_lib.add_run_arguments(p, verb="predict")
    p.add_argument("--out", required=True, help="Output folder for masks and overlays.")
    p.add_argument("--threshold", type=float, default=0.5, help="Probability threshold of the masks.")
    p.add_argument("--batch_size", type=int, default=None, help="Photos per device call (default: device count).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status: 0 all written, 1 some photos failed, 2 bad arguments."""
    args = _parser().parse_args(argv)
    try:
        # This process's devices only: every process of a multi-host job would otherwise need the same photos.
        run, transforms = run_lib.load_run_from_args(args, mesh=parallel.make_mesh(jax.local_devices()))
        report = predict_photos(run, args.inputs, args.out, threshold=args.threshold, transforms=transforms,
                                prune_level=args.prune_level, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    print(f"Wrote masks of {len(report.written)} photo(s) to {args.out}.")
    if report.failed:
        print(f"{len(report.failed)} input(s) failed:", file=sys.stderr)
        for path, why in report.failed.items():
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
