"""What a health worker reads about one photo: its quality verdict and, with a screening model, the Hgb estimate.

`PhotoAssessor(targets, thresholds, screening_model)` turns photos and their `segmenter.PhotoSegmentation` into
`PhotoReport` s, shared by ``predict`` and the screening app:

1. the quality verdict (`anemia_jax.screening.quality`): usable / retake with reasons, judged on the quality target (the
   thresholds' ``target``; else the screening model's target; else the runs' first target);
2. with a screening model (`anemia_jax.screening.screening_model`): colour features computed by the model's own
   feature spec, the code that computed its training features (`features.FeatureSpec.compute` of the photo and the
   ensemble's mean probability of the spec's ``target``), then the Hgb estimate with its
   prediction interval, the probability of anemia and the call (WHO: < 12 g/dL women, < 13 g/dL men; unknown sex uses
   13). A photo the model cannot speak for (too dark or bright, unusual colour or light: `colour_domain`; no colour
   read) is also sent to retake;
3. a photo to retake gets NO estimate: its screening fields are emptied (`withhold`) before any output sees them,
   so the page, the CSV and the overlay cannot show one; every photo gets one answer (`wording.answer`: retake,
   likely anemic, likely not anemic, or unclear: confirm with a blood test) and the model's origin
   (`wording.provenance`: PHANTOM for a model fitted on synthetic photos).

`csv_header` / `csv_values` are the per-photo columns of ``predictions.csv``; `caption_lines` / `draw_caption` put the
same on the overlay image, with the model's origin and the research-use notice as a footer (`footer_lines`). Sex per photo: `read_sex_csv` reads a ``sex.csv`` (columns ``file,sex``; ``file`` a name
or a path relative to the CSV's folder; ``sex`` F/M/female/male or empty for unknown), `photo_sexes` combines it
with a ``--sex`` given for every photo.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from absl import logging

from anemia_jax.screening import colour, quality, wording
from anemia_jax.screening import screening_model as sm
from anemia_jax.utils import image_io, input_files, paths

__all__ = ["SEX_CSV", "PhotoAssessor", "PhotoReport", "caption_lines", "csv_header", "csv_values", "draw_caption",
           "footer_lines", "photo_sexes", "read_sex_csv", "screening_features", "uncertainty_image", "withhold"]

SEX_CSV = "sex.csv"  # looked for in each photo's folder
_SCREEN_COLUMNS = ("answer", "answer_why", "sex", "hgb_g_dl", "hgb_lo_g_dl", "hgb_hi_g_dl", "interval_coverage",
                   "who_threshold_g_dl", "hgb_vs_who", "p_anemia", "anemia_threshold", "anemia_call",
                   "screening_note", "colour_check", "colour_range", "model_data", "model_provenance")
_GREEN, _ORANGE, _WHITE = (90, 220, 90), (255, 170, 40), (255, 255, 255)
# The verdict code of each screening flag (`screening_model.ScreeningPredictions.flag`).
_FLAG_CODES = {"too_dark": "too_dark", "too_bright": "too_bright", "unusual_colour": "unusual_colour",
               "no_mask": "no_colour", "no_reference": "no_colour", "missing": "no_colour"}
# The estimate's fields, emptied for a photo to retake.
_ESTIMATE = {"hgb": math.nan, "hgb_lo": math.nan, "hgb_hi": math.nan, "p_anemia": math.nan, "anemic": -1,
             "who_threshold": math.nan, "hgb_vs_who": "", "coverage": math.nan, "threshold": math.nan}


@dataclasses.dataclass(frozen=True)
class PhotoReport:
    """One photo's assessment: quality ``measures``, the ``verdict`` and, with a screening model, ``screening`` (a
    `screening_model.ScreeningPredictions` row: hgb, hgb_lo, hgb_hi, p_anemia, anemic, sex, who_threshold,
    hgb_vs_who, flag, reason, detail; plus the model's interval ``coverage`` and anemia ``threshold``, the
    ``colour_range`` (`colour_domain.ColourDomain.distances`), the ``answer`` code, its ``answer_text`` and
    ``answer_why`` (`wording.answer`), and ``provenance`` (`wording.provenance`)). For a photo to retake the estimate's
    fields are empty (NaN, -1, '': `withhold`) and ``reason`` says why."""

    measures: quality.QualityMeasures
    verdict: quality.Verdict
    target: str
    screening: dict[str, Any] | None = None


def _screening_channel(model: sm.ScreeningModel, targets: Sequence[str]) -> int:
    target = model.feature_spec.target
    if target not in targets:
        raise ValueError(f"The screening model reads colour from {target!r}, which these runs do not predict "
                         f"(targets {list(targets)}); use runs trained on it.")
    return list(targets).index(target)


def screening_features(model: sm.ScreeningModel, photos: Sequence[np.ndarray], segs: Sequence, targets: Sequence[str]
                       ) -> colour.ColourFeatures:
    """Colour features of each photo as ``model`` was trained on them (module docstring, step 2).

    Raises:
        ValueError: the runs do not predict the model's target.
    """
    c = _screening_channel(model, targets)
    return model.feature_spec.compute(photos, [seg.probs_model[..., c] for seg in segs])


class PhotoAssessor:
    """Verdicts (and screening) for photos segmented by runs predicting ``targets``.

    Args:
        targets: the runs' targets, in channel order.
        thresholds: the quality thresholds (`quality.thresholds_for_runs`, `quality.load_thresholds` or `quality.DEFAULTS`).
        screening: a loaded screening model, or None.
    """

    def __init__(self, targets: Sequence[str], thresholds: quality.QualityThresholds,
                 screening: sm.ScreeningModel | None = None):
        self.targets = tuple(targets)
        self.thresholds = thresholds
        self.screening = screening
        wanted = thresholds.target or (screening.feature_spec.target if screening else "")
        self.channel = quality.target_channel(self.targets, wanted)
        self.target = self.targets[self.channel]
        if screening is not None:
            _screening_channel(screening, self.targets)  # fails now, not at the first photo

    def assess(self, photos: Sequence[np.ndarray], segs: Sequence, sexes: Sequence[str | None] | None = None
               ) -> list[PhotoReport]:
        """One `PhotoReport` per photo; ``sexes`` (one per photo, None = unknown) only matter with screening."""
        measures = [quality.measure(p, s, self.channel) for p, s in zip(photos, segs)]
        verdicts = [quality.verdict(m, self.thresholds) for m in measures]
        if self.screening is None or not len(photos):
            return [PhotoReport(m, v, self.target) for m, v in zip(measures, verdicts)]
        features = screening_features(self.screening, photos, segs, self.targets)
        rows = self.screening.predict(features, sex=list(sexes) if sexes is not None else None).rows()
        domain = self.screening.domain
        ranges = (domain.distances(features, features.select(self.screening.feature_names).values)
                  if domain is not None else np.full(len(rows), np.nan))
        origin = wording.provenance(self.screening.training)
        reports = []
        for m, v, row, distance in zip(measures, verdicts, rows, ranges):
            if row["flag"]:
                v = v.with_reason(_FLAG_CODES[row["flag"]], row["reason"])
            row.update(coverage=self.screening.coverage, threshold=self.screening.threshold,
                       colour_range=float(distance), provenance=origin)
            if not v.usable:
                row = withhold(row)
            code, why = wording.answer(row, v.usable)
            row.update(answer=code, answer_text=wording.ANSWERS[code],
                       answer_why="; ".join(v.reasons) if code == "retake" else why)
            reports.append(PhotoReport(m, v, self.target, row))
        return reports


def withhold(row: dict[str, Any]) -> dict[str, Any]:
    """A screening row with the estimate's fields emptied (a photo to retake: no number may be acted on); its
    ``reason`` says so."""
    return {**row, **_ESTIMATE, "reason": wording.WITHHELD}


# ---------------------------------------------------------------------------------------------- outputs


def csv_header(screening: bool) -> list[str]:
    """The report's columns of ``predictions.csv`` (after the file, size and mask fractions)."""
    cols = ["verdict", "reasons", "quality_target", "area_fraction", "mean_uncertainty_bits", "brightness",
            "clipped_fraction"]
    return cols + list(_SCREEN_COLUMNS) if screening else cols


def _num(value: float, digits: int) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def csv_values(report: PhotoReport, screening: bool) -> list[str]:
    """``report`` as the `csv_header` columns (empty cells where a value does not exist: never 'nan', and no
    estimate for a photo to retake)."""
    m = report.measures
    values = [report.verdict.label, "; ".join(report.verdict.reasons), report.target, f"{m.area_fraction:.6f}",
              _num(m.mean_uncertainty, 4), f"{m.brightness:.4f}", f"{m.clipped_fraction:.4f}"]
    if not screening:
        return values
    s = report.screening or {}
    call = {1: "anemic", 0: "not anemic"}.get(s.get("anemic", -1), "")
    origin = s.get("provenance") or {}
    return values + [wording.ANSWERS.get(s.get("answer", ""), ""), s.get("answer_why", ""), s.get("sex", ""),
                     _num(s.get("hgb"), 2), _num(s.get("hgb_lo"), 2), _num(s.get("hgb_hi"), 2),
                     _num(s.get("coverage"), 2), _num(s.get("who_threshold"), 1), s.get("hgb_vs_who", ""),
                     _num(s.get("p_anemia"), 4), _num(s.get("threshold"), 4), call, s.get("reason", ""),
                     s.get("detail", ""), _num(s.get("colour_range"), 2), origin.get("kind", ""),
                     origin.get("short", "")]


def caption_lines(report: PhotoReport) -> list[tuple[str, tuple[int, int, int]]]:
    """The overlay's text: the verdict and, for a usable screened photo, the one answer, the Hb estimate with its
    range and the WHO threshold compared with. A photo to retake shows no estimate (it has none: `withhold`)."""
    v = report.verdict
    s = report.screening
    if not v.usable:
        lines = [("RETAKE: " + "; ".join(v.reasons), _ORANGE)]
        if s is not None:
            lines.append(("No Hb estimate for a photo to retake", _WHITE))
        return lines
    lines = [("Photo usable", _GREEN)]
    if s is None:
        return lines
    lines.append((s["answer_text"], _GREEN if s["answer"] == "likely_not_anemic" else _ORANGE))
    sex = {"F": "woman", "M": "man"}.get(s["sex"], "sex unknown")
    lines.append((f"Hb estimate {s['hgb']:.1f} g/dL, likely range {s['hgb_lo']:.1f} to {s['hgb_hi']:.1f} "
                  f"({s['coverage']:.0%}); WHO anemia threshold {s['who_threshold']:g} g/dL ({sex})", _WHITE))
    lines.append((s["answer_why"], _WHITE))
    return lines


def footer_lines(report: PhotoReport) -> list[tuple[str, tuple[int, int, int]]]:
    """The overlay's footer with a screening model: where the model came from and the research-use notice."""
    if report.screening is None:
        return []
    origin = report.screening.get("provenance") or {}
    colour_ = _ORANGE if origin.get("kind") != "real" else _WHITE
    return [(origin.get("short", ""), colour_), (wording.NOTICE, _WHITE)]


def _wrap(draw: PIL.ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


def draw_caption(image: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]],
                 footer: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``image`` with ``lines`` (text, RGB colour) written on a dark band across its top and
    ``footer`` on one across its bottom (wrapped to the width; the font scales with the photo)."""
    if not lines and not footer:
        return image
    h, w = image.shape[:2]
    size = max(10, round(min(h, w) / 24))
    font = PIL.ImageFont.load_default(size=size)
    canvas = PIL.Image.fromarray(np.asarray(image, np.uint8))
    draw = PIL.ImageDraw.Draw(canvas)
    pad = max(2, size // 3)
    step = round(size * 1.25)
    top = [(part, rgb) for text, rgb in lines for part in _wrap(draw, text, font, w - 2 * pad)]
    bottom = [(part, rgb) for text, rgb in footer for part in _wrap(draw, text, font, w - 2 * pad)]
    top_band = min(h, 2 * pad + step * len(top)) if top else 0
    bottom_band = min(h - top_band, 2 * pad + step * len(bottom)) if bottom else 0
    out = np.asarray(canvas).copy()
    # Darken: the text stays readable.
    out[:top_band] = (out[:top_band].astype(np.float32) * 0.35).astype(np.uint8)
    if bottom_band:
        out[h - bottom_band:] = (out[h - bottom_band:].astype(np.float32) * 0.35).astype(np.uint8)
    canvas = PIL.Image.fromarray(out)
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (text, rgb) in enumerate(top):
        draw.text((pad, pad + i * step), text, fill=rgb, font=font)
    for i, (text, rgb) in enumerate(bottom):
        draw.text((pad, h - bottom_band + pad + i * step), text, fill=rgb, font=font)
    return np.asarray(canvas)


_SURE, _MIDDLE, _UNSURE = np.array([40, 90, 210.0]), np.array([250, 210, 60.0]), np.array([225, 40, 40.0])


def uncertainty_image(photo: np.ndarray, seg, channel: int) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the segmentation's per-pixel uncertainty where the verdict reads it -- the pixels any
    member calls the quality target (`quality.measure`'s region) -- on a dimmed grey copy of the photo: blue where
    the model is sure (0 bits), yellow at 0.5, red where it is unsure (1 bit: probability 0.5). Pixels outside the
    region are not coloured: a model's soft background (p ~ 0.3 after short training) is not what the verdict
    judges. ``photo`` may be the photo at any size (the page passes it shrunk to the size it shows): the maps are
    resized from the training resolution to it, so the cost follows the size drawn, not the photo's."""
    photo = np.asarray(photo, np.uint8)
    grey = (photo.astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], np.float32))[..., None] * 0.45
    region_model = np.any(seg.members_model[..., channel] > seg.threshold, axis=0).astype(np.float32)
    region = image_io.resize_probabilities(region_model[..., None], photo.shape[:2])[..., 0] > 0.5
    worst = seg.uncertainty_model.max(axis=-1, keepdims=True)  # as `PhotoSegmentation.uncertainty`, at this size
    u = np.clip(image_io.resize_probabilities(worst, photo.shape[:2]), 0.0, 1.0)
    ramp = np.where(u < 0.5, _SURE + (_MIDDLE - _SURE) * (2 * u), _MIDDLE + (_UNSURE - _MIDDLE) * (2 * u - 1))
    out = np.where(region[..., None], ramp, np.repeat(grey, 3, axis=-1))
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- sex per photo


def read_sex_csv(path: str | os.PathLike) -> dict[str, str]:
    """``{photo path (the CSV's folder / file, absolute), normalised sex}`` from a CSV with columns ``file,sex``.

    Raises:
        ValueError: missing columns or an unknown sex value (the message names the row).
    """
    path = paths.as_path(path)
    # A regular file of at most 16 MB: a FIFO named sex.csv is refused, never waited on.
    text = input_files.read_file(path, max_bytes=16 << 20, what="Sex CSV").decode("utf-8-sig")
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "file" not in fields or "sex" not in fields:
            raise ValueError(f"{path} must have the columns 'file' and 'sex' (found {reader.fieldnames}); e.g.\n"
                             "file,sex\nphoto1.jpg,F\nphoto2.jpg,M\nphoto3.jpg,")
        out = {}
        for n, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row["file"]:
                continue
            try:
                sex = sm.normalise_sex(row["sex"])
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: {e}") from None
            out[_key(path.parent / row["file"])] = sex
    return out


def _key(path: Any) -> str:
    """A photo's path as comparable text (local paths made absolute; URLs as they are)."""
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def photo_sexes(files: Sequence[Any], *, sex: str | None = None, sex_csv: str | os.PathLike | None = None
                ) -> list[str]:
    """The sex of each photo ('F', 'M' or 'unknown'): ``sex`` for every photo when given; else the entry of
    ``sex_csv``, or without it of the ``sex.csv`` in the photo's own folder; else 'unknown'.

    Raises:
        ValueError: ``sex`` together with ``sex_csv``, an unknown value, or a malformed CSV.
    """
    if sex and sex_csv:
        raise ValueError("Give the sex either for every photo (--sex) or per photo (--sex_csv), not both.")
    if sex:
        return [sm.normalise_sex(sex)] * len(files)
    tables: dict[str, Mapping[str, str]] = {}
    if sex_csv:
        tables["explicit"] = read_sex_csv(sex_csv)
    out = []
    for f in files:
        path = paths.as_path(f)
        if sex_csv:
            table = tables["explicit"]
        else:
            folder = str(path.parent)
            if folder not in tables:
                candidate = path.parent / SEX_CSV
                tables[folder] = read_sex_csv(candidate) if input_files.is_regular_file(candidate) else {}
            table = tables[folder]
        out.append(table.get(_key(path), "unknown"))
    listed = {p for t in tables.values() for p in t}
    missing = sorted(listed - {_key(paths.as_path(f)) for f in files})
    if missing:
        logging.warning("The sex CSV lists %d file(s) that are not among the photos: %s", len(missing),
                        ", ".join(missing[:5]))
    return out
