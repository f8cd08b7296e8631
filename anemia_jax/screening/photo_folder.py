"""Screening a folder of photos: masks, overlays, uncertainty maps and ``predictions.csv``, written as it goes.

`predict_photos` is what ``python -m anemia_jax.predict`` does once its runs are restored: photos (files or folders)
are decoded as the page decodes uploads, segmented in batches (`Segmenter`), assessed (`photo_report.PhotoAssessor`:
the quality verdict and, with a screening model, the Hb estimate) and written under ``out`` atomically;
``predictions.csv`` is rewritten after every batch, so it always lists the photos whose files are all written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image
from absl import logging
from etils import epath

from anemia_jax.inference import segmenter as segmenter_lib
from anemia_jax.screening import photo_report, quality
from anemia_jax.utils import atomic, conversions, errors, image_io, paths

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)

__all__ = ["IMAGE_SUFFIXES", "PredictionReport", "collect_inputs", "predict_photos"]


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
        path = paths.as_path(item)
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


def _save_png(image: np.ndarray, path: epath.Path, *, compress_level: int = 6) -> None:
    with atomic.open_atomic(path, "wb") as f:  # never a truncated PNG under its final name
        PIL.Image.fromarray(image).save(f, format="PNG", compress_level=compress_level)


def _unique_stem(path: epath.Path, used: set[str]) -> str:
    stem, k = path.stem, 2
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def predict_photos(segmenter, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   assessor: photo_report.PhotoAssessor | None = None, sex: str | None = None,
                   sex_csv: str | os.PathLike | None = None, record: dict | None = None) -> PredictionReport:
    """Segments every photo of ``inputs`` (files or folders) and writes masks, overlays, uncertainty maps, the
    verdicts (and screening) and a CSV into ``out``.

    Args:
        segmenter: an `anemia_jax.inference.segmenter.Segmenter` (one run or an ensemble, TTA, threshold).
        inputs: photo files and/or folders of photos.
        out: output folder (created; local or a URL).
        assessor: the verdict (and screening) of each photo; default: the runs' thresholds
            (`quality.thresholds_for_runs`), no screening.
        sex, sex_csv: the photos' sex for screening (`photo_report.photo_sexes`).
        record: extra entries for ``predictions.json``.

    Returns:
        A `PredictionReport`; unreadable photos are in ``failed`` (each also warned about), never raised.
    """
    out = atomic.ensure_dir(out)
    files, missing = collect_inputs(inputs)
    report = PredictionReport(failed=dict(missing))
    for path, why in missing.items():
        logging.warning("Skipping %s: %s.", path, why)
    targets = segmenter.targets
    if assessor is None:
        assessor = photo_report.PhotoAssessor(targets, quality.thresholds_for_runs(
            segmenter.workdirs, segmenter.recorded_quality))
    screening = assessor.screening is not None
    sexes = dict(zip(map(str, files), photo_report.photo_sexes(files, sex=sex, sex_csv=sex_csv))) if screening \
        else {}
    used: set[str] = set()
    rows = []
    verdicts: dict[str, int] = {"usable": 0, "retake": 0}

    def flush(pending: list[tuple[epath.Path, np.ndarray]]) -> None:
        photos = [photo for _, photo in pending]
        segs = segmenter.segment(photos)
        assessed = assessor.assess(photos, segs, [sexes.get(str(path)) for path, _ in pending])
        for (path, photo), seg, assessment in zip(pending, segs, assessed):
            stem = _unique_stem(path, used)
            for c, t in enumerate(targets):
                _save_png(seg.masks[..., c].astype(np.uint8) * 255, out / f"{stem}_{t}.png")
            overlay = seg.overlay(photo)
            overlay = photo_report.draw_caption(overlay, photo_report.caption_lines(assessment))
            # A photo-sized RGB PNG: level 1 is several times faster than 6 for a few % more bytes.
            _save_png(overlay, out / f"{stem}_overlay.png", compress_level=1)
            _save_png(np.round(np.clip(seg.uncertainty, 0.0, 1.0) * 255).astype(np.uint8),
                      out / f"{stem}_uncertainty.png")
            report.written[str(path)] = stem
            verdicts[assessment.verdict.label] += 1
            rows.append([str(path), stem, photo.shape[1], photo.shape[0]]
                        + [f"{f:.6f}" for f in seg.fractions()] + photo_report.csv_values(assessment, screening))

    def write_csv() -> None:
        if not rows:
            return
        with io.StringIO(newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "stem", "width", "height"] + segmenter_lib.fraction_columns(targets)
                            + photo_report.csv_header(screening))
            writer.writerows(rows)
            atomic.write_bytes(out / "predictions.csv", f.getvalue().encode("utf-8"))

    pending: list[tuple[epath.Path, np.ndarray]] = []
    try:
        for path in files:
            try:
                photo = image_io.load_photo(path)
            except _READ_ERRORS as e:
                # PIL raises SyntaxError for some corrupt headers.
                report.failed[str(path)] = f"{type(e).__name__}: {e}"
                logging.warning("Skipping %s: not a readable image (%s: %s).", path, type(e).__name__, e)
                continue
            pending.append((path, photo))
            if len(pending) == segmenter.batch_size:
                flush(pending)
                pending = []
                write_csv()  # after every batch: the CSV always lists the photos done
        if pending:
            flush(pending)
        write_csv()
    except errors.OutputError as e:
        try:  # the photos finished before the failure (the CSV itself may be what failed)
            write_csv()
            listed = f"listed in {out / 'predictions.csv'}"
        except errors.OutputError:
            listed = "not listed: predictions.csv could not be written either"
        raise errors.OutputError(f"{e} The {len(report.written)} photo(s) done before it are complete in {out}, "
                                 f"{listed}.") from e
    summary = {"runs": segmenter.workdirs, "steps": segmenter.steps, "engine": segmenter.engine,
               **({"onnx_model": str(segmenter.onnx_model.path)} if segmenter.onnx_model is not None else {}),
               "mask_threshold": segmenter.threshold, "quality_target": assessor.target,
               "quality_thresholds": dataclasses.asdict(assessor.thresholds), "verdicts": verdicts,
               "sex": "--sex" if sex else (str(sex_csv) if sex_csv else f"{photo_report.SEX_CSV} beside the photos"),
               **(record or {})}
    atomic.write_text(out / "predictions.json", json.dumps(conversions.jsonable(summary), indent=2) + "\n")
    return report
