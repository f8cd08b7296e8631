"""Segmenting new photographs with a trained run (or an ensemble of runs): mask PNGs and overlays at each photo's size.

    python -m anemia_jax.predict --workdir=runs/unetpp [--workdir=RUN2 ...] photo.jpg more_photos/ --out=masks/
        [--checkpoint=best|latest|<step>] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--threshold=0.5]
        [--prune_level=k] [--batch_size=8] [--quality=quality.json] [--screening=screening_model.json
        [--sex=F|M | --sex_csv=sex.csv]] [--config.<key>=<value> ...]

Each photo (any size or aspect ratio; folders contribute their image files, non-recursively, sorted) is decoded with
PIL and turned upright by its EXIF orientation (phone photos are often stored sideways with an orientation tag), then
segmented by `anemia_jax.inference.segmenter.Segmenter`: resized to the training resolution as training photos were,
predicted (optionally with test-time augmentation, a pruned UNet++, or averaged over several runs), and its
probabilities resized back to the photo's own size and thresholded (``p > threshold``).

Each photo also gets a quality verdict, usable or retake with its reasons (`anemia_jax.screening.quality`: no
conjunctiva found, region too small, segmentation too uncertain, photo too dark, overexposed), with the thresholds of
``--quality`` (default: ``quality.json`` in the first run's folder or its parent, as ``python -m
anemia_jax.calibrate_quality`` writes it; else the runs' ``config.quality``). With ``--screening`` (a screening model,
`anemia_jax.screening.screening_model`) each photo also gets the estimated Hgb with its prediction interval, the
probability of anemia and the call (WHO: < 12 g/dL women, < 13 g/dL men; unknown sex: 13), from colour features computed
as the model's were (`anemia_jax.screening.photo_report`). Sex: ``--sex=F|M`` for every photo, or ``--sex_csv`` (or,
without it, a ``sex.csv`` in the photo's folder) with columns ``file,sex`` (``file`` a name or a path relative to the
CSV; ``sex`` F/M/female/male, empty for unknown).

Outputs in ``--out``: ``<stem>_<target>.png`` (8-bit, 0 background / 255 mask, photo size), ``<stem>_overlay.png``
(the photo with each mask tinted and outlined, the verdict and any Hgb estimate written across its top),
``<stem>_uncertainty.png`` (8-bit grey: the per-pixel entropy of the mean probability, 0 certain .. 255 = 1 bit;
the largest over the targets), ``predictions.csv`` (file, size, mask fraction per target, the verdict and its
measures, and the screening columns) and ``predictions.json`` (the runs, checkpoints, the quality thresholds and
where they came from, the screening model, and the usable/retake counts). Photos with the verdict 'retake' keep
their estimates in the CSV but must not be acted on; their overlay shows none.

Stems that repeat across folders get ``_2``, ``_3``... appended. A file that cannot be read as an image is reported
with a warning and skipped. Photos, folders and ``--out`` may be local or on shared/cloud storage (``gs://...``).

It runs in one process (over that process's devices); photos are batched ``--batch_size`` at a time at the
training resolution, so memory does not grow with the photos' size beyond one decoded photo per batch slot.

Every output file is written atomically (`anemia_jax.utils.atomic`): it appears complete under its name or not at all,
even on a full disk or a kill. ``predictions.csv`` is rewritten after every batch, so it always lists the photos whose
files are all written; when writing fails (full disk, read-only ``--out``) the command stops with a message saying how
many photos were done.

Failures end with a one-paragraph message and no traceback unless ``--verbose``. Exit status:

| status | meaning |
|---:|---|
| 0 | every photo written |
| 1 | some photos could not be read (listed); the others were written |
| 2 | bad arguments or run directory |
| 4 | no usable checkpoint (``--checkpoint=STEP`` damaged or absent, every checkpoint damaged, or one of another model configuration) |
| 5 | ``--out`` cannot be written (a file, read-only, full disk); the photos done are listed in predictions.csv |
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image
from absl import flags, logging
from etils import epath

from anemia_jax import cli
from anemia_jax.screening import photo_report, quality
from anemia_jax.training import reporting
from anemia_jax.utils import atomic, errors, image_io

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)

__all__ = ["IMAGE_SUFFIXES", "PredictionReport", "collect_inputs", "main", "predict_photos"]


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
            [r.workdir for r in segmenter.runs], segmenter.runs[0].config.get("quality")))
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
            outline = max(1, round(max(photo.shape[:2]) / 300))  # visible on a full-size photo
            overlay = image_io.overlay(photo, seg.masks, outline=outline)
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
            writer.writerow(["file", "stem", "width", "height"] + [f"fraction/{t}" for t in targets]
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
    summary = {"runs": [str(r.workdir) for r in segmenter.runs], "steps": [r.step for r in segmenter.runs],
               "mask_threshold": segmenter.threshold, "quality_target": assessor.target,
               "quality_thresholds": dataclasses.asdict(assessor.thresholds), "verdicts": verdicts,
               "sex": "--sex" if sex else (str(sex_csv) if sex_csv else f"{photo_report.SEX_CSV} beside the photos"),
               **(record or {})}
    atomic.write_text(out / "predictions.json", json.dumps(reporting.jsonable(summary), indent=2) + "\n")
    return report


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.predict", __doc__)
    cmd.run_flags(verb="predict with")
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Output folder for masks, overlays and predictions.csv.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the masks.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Photos per device call (default: device count).", flag_values=fv)
    flags.DEFINE_string("quality", None, "Quality thresholds JSON (python -m anemia_jax.calibrate_quality); default: "
                        f"{quality.THRESHOLDS_FILE} in the first run's folder or its parent, else config.quality.",
                        flag_values=fv)
    flags.DEFINE_string("screening", None, "Screening model JSON (anemia_jax.screening.screening_model): adds the Hgb "
                        "estimate, its interval and the anemia call per photo.", flag_values=fv)
    flags.DEFINE_string("sex", None, "F or M: sex of every photo's subject, for the WHO threshold "
                        "(default: per photo from --sex_csv or sex.csv beside the photos; else unknown).",
                        flag_values=fv)
    flags.DEFINE_string("sex_csv", None, "CSV with columns file,sex (default: sex.csv in each photo's folder).",
                        flag_values=fv)
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first, then photos/folders and flags); returns the exit status."""
    cmd = _command()
    try:
        inputs = cmd.parse_runs(sys.argv if argv is None else argv)
        if inputs is None:
            return cli.EXIT_OK  # --help
        if not inputs:
            raise cli.CommandLineError("Name the photos (files or folders) to segment.")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    import jax  # noqa: PLC0415 -- after the flags: --help and flag errors stay fast

    from anemia_jax.inference import probabilities, segmenter  # noqa: PLC0415
    from anemia_jax.runs import restore
    from anemia_jax.screening import screening_model
    from anemia_jax.utils import parallel

    try:
        transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
        # This process's devices only: every process of a multi-host job would otherwise need the same photos.
        restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint,
                                     mesh=parallel.make_mesh(jax.local_devices()), configs=cmd.run_configs())
        seg = segmenter.Segmenter(restored, threshold=cmd.threshold, transforms=transforms,
                                  prune_level=cmd.prune_level, batch_size=cmd.batch_size)
        model = screening_model.load(cmd.screening) if cmd.screening else None
        thresholds = quality.thresholds_for_runs(cmd.workdir, restored[0].config.get("quality"), cmd.quality)
        assessor = photo_report.PhotoAssessor(seg.targets, thresholds, model)
        record = {"screening_model": None if model is None else {
            "path": str(cmd.screening), "features_from": model.training.get("features_from"),
            "constancy": model.constancy, "coverage": model.coverage, "anemia_threshold": model.threshold}}
        report = predict_photos(seg, inputs, cmd.out, assessor=assessor, sex=cmd.sex, sex_csv=cmd.sex_csv,
                                record=record)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        if cli.exit_status(e) is None and isinstance(e, (FileNotFoundError, ValueError)):
            wrapped = cli.CommandLineError(str(e))  # an argument these runs cannot take
            wrapped.__cause__, e = e, wrapped
        return cmd.fail(e)
    print(f"Wrote masks of {len(report.written)} photo(s) to {cmd.out}.")
    if report.failed:
        print(f"{len(report.failed)} input(s) failed:", file=sys.stderr)
        for path, why in report.failed.items():
            print(f"  {path}: {why}", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
