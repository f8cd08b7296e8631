"""Screening a folder of photos: masks, overlays, uncertainty maps and ``predictions.csv``, written as it goes.

`predict_photos` is what ``python -m anemia_jax.predict`` does once its runs are restored: photos (files or folders)
are decoded as the page decodes uploads, segmented in batches (`Segmenter`), assessed (`photo_report.PhotoAssessor`:
the quality verdict and, with a screening model, the Hb estimate) and written under ``out`` atomically;
``predictions.csv`` is rewritten after every batch, so it always lists the photos whose files are all written.

What is refused rather than trusted: only regular files are read (a FIFO or a device named as a photo, or found in a
folder, is reported, never waited on), each at most ``max_bytes`` long and ``max_pixels`` large (checked from the
header before decoding, as the page checks uploads); an output never replaces an input (a photo whose outputs would
overwrite one of the photos gets another stem, with a warning); the CSV's text cells are escaped so that a
spreadsheet never runs a file name as a formula (`csv_cells`); inputs without one readable photo are a data error.
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
from anemia_jax.utils import atomic, conversions, csv_cells, errors, image_io, input_files, paths

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# PIL raises SyntaxError for some corrupt headers and EOFError for some truncated GIFs.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)
MAX_FILE_BYTES = 100_000_000  # default cap of one photo file
MAX_PIXELS = 50_000_000  # default cap of one decoded photo, as the page's (--max_megapixels=50)
TABLES = ("predictions.csv", "predictions.json")

__all__ = ["IMAGE_SUFFIXES", "MAX_FILE_BYTES", "MAX_PIXELS", "PredictionReport", "collect_inputs", "find_photos",
           "predict_photos"]


@dataclasses.dataclass
class PredictionReport:
    """What `predict_photos` did: ``written`` maps each photo to its output stem; ``failed`` photo -> reason."""

    written: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[epath.Path], dict[str, str]]:
    """Expands folders into their image files (by suffix, sorted, non-recursive); files are kept whatever their
    suffix. Returns ``(files, missing)`` where missing maps inputs that cannot be read as files to a reason: paths
    that do not exist, and FIFOs, devices or sockets (named, or in a folder with an image suffix), which are never
    opened."""
    files, missing = [], {}
    for item in inputs:
        path = paths.as_path(item)
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                if entry.suffix.lower() not in IMAGE_SUFFIXES or entry.is_dir():
                    continue
                if input_files.is_regular_file(entry):
                    found.append(entry)
                else:
                    missing[str(entry)] = _why_not_a_file(entry)
            if not found:
                logging.warning("Folder %s holds no image files (%s).", path, ", ".join(IMAGE_SUFFIXES))
            files += found
        elif input_files.is_regular_file(path):
            files.append(path)
        else:
            missing[str(path)] = _why_not_a_file(path)
    return files, missing


def _why_not_a_file(path: epath.Path) -> str:
    try:
        input_files.check_regular_file(path, what="Photo")
    except FileNotFoundError:
        return "no such file or folder"
    except (input_files.NotARegularFileError, OSError) as e:
        return str(e)
    return "not a regular file"


def find_photos(inputs: Sequence[str | os.PathLike]) -> tuple[list[epath.Path], dict[str, str]]:
    """`collect_inputs`, failing when there is nothing to read at all.

    Raises:
        errors.DataError: no input names a file (empty folders, or only paths that do not exist or are not files).
    """
    files, missing = collect_inputs(inputs)
    if files:
        return files, missing
    if missing:
        listed = "; ".join(f"{p}: {why}" for p, why in list(missing.items())[:10])
        raise errors.DataError(f"None of the inputs is a photo file that can be read ({listed}). Name photo files "
                               "(JPEG, PNG...), or folders that hold them.")
    raise errors.DataError(f"{', '.join(map(str, inputs))} hold(s) no image files ({', '.join(IMAGE_SUFFIXES)}). "
                           "Name photo files, or folders that hold them.")


def _real(path: str | os.PathLike) -> str:
    """The path a file is reached by, for comparing an output with the inputs (symlinks and '..' resolved)."""
    return os.fspath(path) if paths.is_url(path) else os.path.realpath(os.fspath(path))


def _save_png(image: np.ndarray, path: epath.Path, *, compress_level: int = 6) -> None:
    with atomic.open_atomic(path, "wb") as f:  # never a truncated PNG under its final name
        PIL.Image.fromarray(image).save(f, format="PNG", compress_level=compress_level)


def _unique_stem(path: epath.Path, used: set[str], out: epath.Path, suffixes: Sequence[str],
                 inputs: set[str]) -> str:
    """The photo's stem, with ``_2``, ``_3``... appended while it repeats an earlier photo's or while one of its
    outputs (``out/<stem>_<suffix>.png``) would replace one of the ``inputs`` (real paths); the latter is warned about.
    """
    def clashes(candidate: str) -> list[str]:
        return [str(out / f"{candidate}_{s}.png") for s in suffixes if _real(out / f"{candidate}_{s}.png") in inputs]

    stem, k = path.stem, 2
    while stem in used or clashes(stem):
        stem, k = f"{path.stem}_{k}", k + 1
    if stem != path.stem and (clash := clashes(path.stem)):
        logging.warning("The outputs of %s are written under the stem '%s': %s is one of the input photos, and an "
                        "output never replaces an input.", path, stem, ", ".join(clash))
    used.add(stem)
    return stem


def predict_photos(segmenter, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   assessor: photo_report.PhotoAssessor | None = None, sex: str | None = None,
                   sex_csv: str | os.PathLike | None = None, record: dict | None = None,
                   max_bytes: int | None = MAX_FILE_BYTES, max_pixels: int | None = MAX_PIXELS) -> PredictionReport:
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
        max_bytes: the largest photo file read (None: no cap).
        max_pixels: the largest photo decoded, read from its header (None: PIL's own decompression-bomb limit).

    Returns:
        A `PredictionReport`; unreadable photos are in ``failed`` (each also warned about), never raised.

    Raises:
        errors.DataError: no photo could be read (nothing written). errors.OutputError: ``out`` cannot be written
            (the message says how many photos were done, and where they are listed).
        ValueError: ``out`` would replace one of the inputs with ``predictions.csv`` or ``predictions.json``.
    """
    files, missing = find_photos(inputs)
    taken = {_real(p) for p in [*files, *missing]}
    out_real = paths.as_path(out)
    for name in TABLES:
        if _real(out_real / name) in taken:
            raise ValueError(f"--out={out} would replace the input {out_real / name} with its {name}; choose "
                             "another --out.")
    out = atomic.ensure_dir(out)
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
    suffixes = [*targets, "overlay", "uncertainty"]
    rows = []
    verdicts: dict[str, int] = {"usable": 0, "retake": 0}
    answers: dict[str, int] = {}

    def flush(pending: list[tuple[epath.Path, np.ndarray]]) -> None:
        photos = [photo for _, photo in pending]
        segs = segmenter.segment(photos)
        assessed = assessor.assess(photos, segs, [sexes.get(str(path)) for path, _ in pending])
        for (path, photo), seg, assessment in zip(pending, segs, assessed):
            stem = _unique_stem(path, used, out, suffixes, taken)
            for c, t in enumerate(targets):
                _save_png(seg.masks[..., c].astype(np.uint8) * 255, out / f"{stem}_{t}.png")
            overlay = seg.overlay(photo)
            overlay = photo_report.draw_caption(overlay, photo_report.caption_lines(assessment),
                                                photo_report.footer_lines(assessment))
            # A photo-sized RGB PNG: level 1 is several times faster than 6 for a few % more bytes.
            _save_png(overlay, out / f"{stem}_overlay.png", compress_level=1)
            _save_png(np.round(np.clip(seg.uncertainty, 0.0, 1.0) * 255).astype(np.uint8),
                      out / f"{stem}_uncertainty.png")
            report.written[str(path)] = stem
            verdicts[assessment.verdict.label] += 1
            if assessment.screening is not None:
                answer = assessment.screening["answer"]
                answers[answer] = answers.get(answer, 0) + 1
            rows.append([str(path), stem, photo.shape[1], photo.shape[0]]
                        + [f"{f:.6f}" for f in seg.fractions()] + photo_report.csv_values(assessment, screening))

    def write_csv() -> bool:
        """Writes ``predictions.csv`` if there is a photo to list; returns whether it did."""
        if not rows:
            return False
        with io.StringIO(newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "stem", "width", "height"] + segmenter_lib.fraction_columns(targets)
                            + photo_report.csv_header(screening))
            writer.writerows(csv_cells.escape_row(row) for row in rows)
            atomic.write_bytes(out / "predictions.csv", f.getvalue().encode("utf-8"))
        return True

    pending: list[tuple[epath.Path, np.ndarray]] = []
    try:
        for path in files:
            try:
                photo = image_io.load_photo(path, max_bytes=max_bytes, max_pixels=max_pixels)
            except (input_files.NotARegularFileError, input_files.FileTooLargeError, image_io.TooManyPixelsError) as e:
                report.failed[str(path)] = str(e)
                logging.warning("Skipping %s: %s.", path, e)
                continue
            except _READ_ERRORS as e:
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
            listed = f"listed in {out / 'predictions.csv'}" if write_csv() else "so there is no predictions.csv"
        except errors.OutputError:
            listed = "not listed: predictions.csv could not be written either"
        if not report.written:
            raise errors.OutputError(f"{e} No photo was finished before it, {listed}.") from e
        raise errors.OutputError(f"{e} The {len(report.written)} photo(s) done before it are complete in {out}, "
                                 f"{listed}.") from e
    if not report.written:
        listed = "; ".join(f"{p}: {why}" for p, why in list(report.failed.items())[:10])
        more = len(report.failed) - 10
        raise errors.DataError(f"None of the {len(report.failed)} input(s) is a photo that could be read ({listed}"
                               f"{f'; and {more} more' if more > 0 else ''}). Nothing was written to {out}. Check "
                               "that they are intact JPEG or PNG photos.")
    summary = {"runs": segmenter.workdirs, "steps": segmenter.steps, "engine": segmenter.engine,
               **({"onnx_model": str(segmenter.onnx_model.path)} if segmenter.onnx_model is not None else {}),
               "mask_threshold": segmenter.threshold, "quality_target": assessor.target,
               "quality_thresholds": dataclasses.asdict(assessor.thresholds), "verdicts": verdicts,
               **({"answers": answers} if screening else {}),
               "sex": "--sex" if sex else (str(sex_csv) if sex_csv else f"{photo_report.SEX_CSV} beside the photos"),
               **(record or {})}
    atomic.write_text(out / "predictions.json", json.dumps(conversions.jsonable(summary), indent=2) + "\n")
    return report
