"""Per-patient metadata of Eyes-defy-anemia from the country spreadsheets (Number, Hgb, Gender, Age).

The sheets are hand-typed, so parsing is lenient where intent is unambiguous and strict elsewhere:

* header names are matched case- and punctuation-insensitively against known variants (``Number``/``N``/``ID``,
  ``Hgb``/``Hb``/``Hemoglobin``, ``Gender``/``Sex``/``Sesso``, ``Age``/``Eta``); other columns (``Note``, unnamed)
  are ignored;
* Hgb may be a number or text with a decimal comma (``'15,1'``); ``'_'``, ``'-'``, ``''`` and other non-numbers
  mean unknown (NaN), and the unparsable ones are reported;
* gender ``F``/``Female``/``Donna``/``W`` -> ``'F'``, ``M``/``Male``/``Uomo`` -> ``'M'``, anything else ``''``;
* ``anemic`` follows the WHO adult thresholds: Hgb < 12 g/dL for women, < 13 g/dL for men; -1 when Hgb or gender is
  unknown (the threshold depends on both).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from anemia_jax.data.datasets.eyes_defy_anemia import xlsx

# WHO haemoglobin thresholds for anaemia in non-pregnant adults (g/dL).
WHO_THRESHOLD_G_DL = {"F": 12.0, "M": 13.0}

_HEADER_ALIASES = {
    "number": ("number", "num", "n", "no", "nr", "id", "patient", "patientid", "paziente", "numero"),
    "hgb": ("hgb", "hb", "hemoglobin", "haemoglobin", "emoglobina", "hgbgdl", "hbgdl"),
    "gender": ("gender", "sex", "sesso", "genere"),
    "age": ("age", "eta", "età", "ageyears"),
}
_MISSING_TOKENS = {"", "_", "-", "--", "na", "n/a", "nan", "none", "?"}
_GENDER_WORDS = {
    "f": "F", "female": "F", "woman": "F", "w": "F", "donna": "F", "femmina": "F",
    "m": "M", "male": "M", "man": "M", "uomo": "M", "maschio": "M",
}


@dataclasses.dataclass(frozen=True)
class PatientMetadata:
    """One spreadsheet row. ``hgb``/``age`` are NaN and ``gender`` '' when unknown."""

    hgb: float = math.nan
    gender: str = ""
    age: float = math.nan

    @property
    def anemic(self) -> int:
        return anemic_label(self.hgb, self.gender)


@dataclasses.dataclass
class SheetMetadata:
    """Parsed sheet: rows by patient number, plus human-readable notes on cells that could not be used."""

    patients: dict[int, PatientMetadata]
    problems: list[str]


def anemic_label(hgb: float, gender: str) -> int:
    """1 anemic, 0 not anemic, -1 unknown, by the WHO adult thresholds (Hgb < 12 g/dL women, < 13 g/dL men)."""
    if gender not in WHO_THRESHOLD_G_DL or not math.isfinite(hgb):
        return -1
    return int(hgb < WHO_THRESHOLD_G_DL[gender])


def _normalise_header(cell: xlsx.Cell) -> str:
    if not isinstance(cell, str):
        return ""
    # 'Hgb (g/dL)' -> 'hgb' : keep the leading word when units follow in brackets.
    text = cell.split("(")[0].strip().lower()
    return re.sub(r"[^a-zà-ÿ0-9]", "", text)


def parse_number(cell: xlsx.Cell) -> float | None:
    """A float from a numeric cell or from text with a decimal point or comma; None if it is not a number."""
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        return float(cell)
    if cell is None:
        return None
    text = str(cell).strip().replace("\u00a0", "").replace(" ", "")
    # A lone comma is a decimal comma ('15,1'); with both separators the comma groups thousands.
    if "," in text and "." not in text:
        text = text.replace(",", ".")
    else:
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _is_missing(cell: xlsx.Cell) -> bool:
    return cell is None or (isinstance(cell, str) and cell.strip().lower() in _MISSING_TOKENS)


def parse_gender(cell: xlsx.Cell) -> str | None:
    """'F' or 'M'; '' when the cell is empty; None when it holds something unrecognised."""
    if _is_missing(cell):
        return ""
    return _GENDER_WORDS.get(str(cell).strip().lower().rstrip("."))


def _find_header(rows: Sequence[Sequence[xlsx.Cell]]) -> tuple[int, dict[str, int]]:
    for r, row in enumerate(rows[:20]):
        columns: dict[str, int] = {}
        for c, cell in enumerate(row):
            name = _normalise_header(cell)
            for field, aliases in _HEADER_ALIASES.items():
                if name in aliases and field not in columns:
                    columns[field] = c
        if "number" in columns and "hgb" in columns:
            return r, columns
    raise ValueError(
        "Could not find the header row: expected columns named like 'Number' and 'Hgb' (also 'Gender', 'Age') in "
        "the first 20 rows of the sheet.")


def parse_sheet(rows: Sequence[Sequence[xlsx.Cell]], *, source: str = "sheet") -> SheetMetadata:
    """Parses the rows of a country sheet (as returned by `xlsx.read_sheet`) into per-patient metadata.

    Args:
      rows: cell values, header row first (leading title rows are skipped).
      source: name used in problem messages (e.g. the file path).

    Returns:
      Patients keyed by their integer number; rows without a number are skipped, a repeated number keeps its first row.

    Raises:
      ValueError: no header row with at least Number and Hgb columns.
    """
    header, columns = _find_header(rows)
    patients: dict[int, PatientMetadata] = {}
    problems: list[str] = []

    def cell(row, field):
        c = columns.get(field)
        return row[c] if c is not None and c < len(row) else None

    for r, row in enumerate(rows[header + 1:], start=header + 2):
        number_cell = cell(row, "number")
        if _is_missing(number_cell):
            if any(not _is_missing(v) for v in row):
                problems.append(f"{source} row {r}: no patient number, row ignored ({list(row)!r})")
            continue
        number = parse_number(number_cell)
        if number is None or number != int(number):
            problems.append(f"{source} row {r}: patient number {number_cell!r} is not an integer, row ignored")
            continue
        number = int(number)
        if number in patients:
            problems.append(f"{source} row {r}: patient {number} appears again, keeping the first row")
            continue

        def number_or_nan(field: str, label: str) -> float:
            value = parse_number(cell(row, field))
            if value is not None:
                return value
            if not _is_missing(cell(row, field)):
                problems.append(f"{source} row {r}: {label} {cell(row, field)!r} of patient {number} "
                                "is not a number, stored as NaN")
            return math.nan

        hgb, age = number_or_nan("hgb", "Hgb"), number_or_nan("age", "age")
        gender_cell = cell(row, "gender")
        gender = parse_gender(gender_cell)
        if gender is None:
            problems.append(
                f"{source} row {r}: gender {gender_cell!r} of patient {number} not recognised, stored as ''")
            gender = ""
        patients[number] = PatientMetadata(hgb=hgb, gender=gender, age=age)
    return SheetMetadata(patients=patients, problems=problems)


def read_metadata_xlsx(data: bytes, *, source: str = "sheet", sheet: str = "Foglio1") -> SheetMetadata:
    """Reads sheet ``sheet`` (falling back to the first sheet if absent) of an .xlsx file's bytes."""
    try:
        rows = xlsx.read_sheet(data, sheet)
    except xlsx.XlsxError as e:
        if "No sheet named" not in str(e):
            raise
        rows = xlsx.read_sheet(data, None)
    return parse_sheet(rows, source=source)
