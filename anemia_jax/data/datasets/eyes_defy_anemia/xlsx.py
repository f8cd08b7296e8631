"""A minimal, dependency-free reader for the cell values of one .xlsx worksheet.

An .xlsx file is a zip of SpreadsheetML parts. The Eyes-defy-anemia spreadsheets need only cell values, so this reads
``xl/workbook.xml`` (sheet names), its relationships (which part holds which sheet), ``xl/sharedStrings.xml`` and the
worksheet's ``<c>`` cells: shared strings (``t="s"``), inline strings (``t="inlineStr"``), formula strings
(``t="str"``), booleans and numbers. Styles, dates and formulas' expressions are ignored: a number formatted as a date
comes back as its serial number. This keeps openpyxl out of the dependencies.

Whatever is wrong with a file (not a zip, truncated, malformed XML, a missing part, a part over `MAX_PART_BYTES`)
surfaces as `XlsxError`, so a caller can skip an unreadable sheet and go on.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import xml.etree.ElementTree as ET
import zipfile
import zlib
from typing import Union

_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_M = "{%s}" % _MAIN_NS

Cell = Union[str, float, bool, None]
# Decompressed size cap of one part: the real sheets are a few kB; a zip bomb must not exhaust memory.
MAX_PART_BYTES = 64 << 20
# What reading a damaged workbook raises below XlsxError: XML syntax, zip structure, deflate stream, short data.
_DAMAGE = (ET.ParseError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


class XlsxError(ValueError):
    """The bytes are not a readable .xlsx workbook, or lack the requested sheet."""


def _column_index(ref: str) -> int:
    """0-based column of a cell reference such as 'AB12'."""
    letters = re.match(r"[A-Za-z]+", ref)
    if letters is None:
        raise XlsxError(f"Malformed cell reference {ref!r}.")
    index = 0
    for ch in letters.group(0).upper():
        index = index * 26 + (ord(ch) - ord("A") + 1)
    return index - 1


def _text_of(element: ET.Element) -> str:
    """Concatenated text of the ``<t>`` runs of a string item, skipping phonetic (``<rPh>``) runs."""
    if element.tag == _M + "t":
        return element.text or ""
    parts = []
    for child in element:
        if child.tag == _M + "rPh":
            continue
        parts.append(_text_of(child))
    return "".join(parts)


def _shared_strings(zf: zipfile.ZipFile, path: str | None) -> list[str]:
    if path is None or path not in zf.namelist():
        return []
    root = _part(zf, path)
    return [_text_of(si) for si in root.findall(_M + "si")]


def _resolve_target(target: str) -> str:
    # Targets are relative to xl/ unless absolute within the package.
    if target.startswith("/"):
        return target.lstrip("/")
    return posixpath.normpath(posixpath.join("xl", target))


def sheet_names(source: bytes | str | os.PathLike) -> list[str]:
    """Names of the worksheets of a workbook, in workbook order."""
    try:
        with _open(source) as zf:
            return [name for name, _ in _sheet_parts(zf)]
    except _DAMAGE as e:
        raise XlsxError(f"Not a readable .xlsx workbook ({type(e).__name__}: {e}).") from e


def _part(zf: zipfile.ZipFile, name: str) -> ET.Element:
    """The parsed XML of part ``name`` (KeyError if absent)."""
    if zf.getinfo(name).file_size > MAX_PART_BYTES:
        raise XlsxError(f"Part {name} is {zf.getinfo(name).file_size / 2**20:.0f} MiB, over the "
                        f"{MAX_PART_BYTES >> 20} MiB cap of this reader.")
    return ET.fromstring(zf.read(name))


def _open(source: bytes | str | os.PathLike) -> zipfile.ZipFile:
    try:
        if isinstance(source, bytes):
            return zipfile.ZipFile(io.BytesIO(source))
        return zipfile.ZipFile(os.fspath(source))
    except zipfile.BadZipFile as e:
        raise XlsxError(f"Not an .xlsx workbook (not a zip archive): {e}") from e


def _sheet_parts(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    """(sheet name, worksheet part path) pairs."""
    try:
        workbook = _part(zf, "xl/workbook.xml")
    except KeyError as e:
        raise XlsxError("Not an .xlsx workbook: it has no xl/workbook.xml part.") from e
    targets = {}
    if "xl/_rels/workbook.xml.rels" in zf.namelist():
        rels = _part(zf, "xl/_rels/workbook.xml.rels")
        for rel in rels.findall("{%s}Relationship" % _PKG_REL_NS):
            targets[rel.get("Id")] = _resolve_target(rel.get("Target", ""))
    parts = []
    sheets = workbook.find(_M + "sheets")
    for i, sheet in enumerate(sheets if sheets is not None else []):
        rid = sheet.get("{%s}id" % _REL_NS)
        # Without relationships, Excel's default part naming is the only sensible guess.
        parts.append((sheet.get("name", ""), targets.get(rid, f"xl/worksheets/sheet{i + 1}.xml")))
    return parts


def _shared_strings_part(zf: zipfile.ZipFile) -> str | None:
    if "xl/_rels/workbook.xml.rels" in zf.namelist():
        rels = _part(zf, "xl/_rels/workbook.xml.rels")
        for rel in rels.findall("{%s}Relationship" % _PKG_REL_NS):
            if rel.get("Type", "").endswith("/sharedStrings"):
                return _resolve_target(rel.get("Target", ""))
    return "xl/sharedStrings.xml"


def _cell_value(cell: ET.Element, shared: list[str]) -> Cell:
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        inline = cell.find(_M + "is")
        return _text_of(inline) if inline is not None else ""
    v = cell.find(_M + "v")
    if v is None or v.text is None:
        return None
    text = v.text
    if kind == "s":
        try:
            return shared[int(text)]
        except (IndexError, ValueError) as e:
            raise XlsxError(f"Cell {cell.get('r')} refers to missing shared string {text!r}.") from e
    if kind in ("str", "e"):
        return text
    if kind == "b":
        return text.strip() == "1"
    try:
        return float(text)
    except ValueError:
        return text


def read_sheet(source: bytes | str | os.PathLike, sheet: str | None = None) -> list[list[Cell]]:
    """Cell values of one worksheet as dense rows.

    Args:
      source: the .xlsx file's bytes or path.
      sheet: worksheet name (case-insensitive); None reads the first sheet.

    Returns:
      One list per row from row 1 to the last row with a cell, each padded with None to the widest row. Numbers are
      floats, strings str, booleans bool, empty cells None.

    Raises:
      XlsxError: the file is not a readable .xlsx workbook or has no sheet of that name.
    """
    try:
        return _read_sheet(source, sheet)
    except _DAMAGE as e:
        raise XlsxError(f"Not a readable .xlsx workbook ({type(e).__name__}: {e}).") from e


def _read_sheet(source: bytes | str | os.PathLike, sheet: str | None) -> list[list[Cell]]:
    with _open(source) as zf:
        parts = _sheet_parts(zf)
        if not parts:
            raise XlsxError("The workbook has no worksheets.")
        if sheet is None:
            part = parts[0][1]
        else:
            matches = [p for name, p in parts if name.strip().lower() == sheet.strip().lower()]
            if not matches:
                raise XlsxError(f"No sheet named {sheet!r}; the workbook has {[name for name, _ in parts]}.")
            part = matches[0]
        shared = _shared_strings(zf, _shared_strings_part(zf))
        try:
            root = _part(zf, part)
        except KeyError as e:
            raise XlsxError(f"The workbook lists worksheet part {part!r} but does not contain it.") from e
    cells: dict[int, dict[int, Cell]] = {}
    data = root.find(_M + "sheetData")
    next_row = 1
    for row in data if data is not None else []:
        r = int(row.get("r", next_row))
        next_row = r + 1
        values = cells.setdefault(r, {})
        next_col = 0
        for cell in row.findall(_M + "c"):
            ref = cell.get("r")
            col = _column_index(ref) if ref else next_col
            next_col = col + 1
            value = _cell_value(cell, shared)
            if value is not None:
                values[col] = value
    nonempty = [r for r, vals in cells.items() if vals]
    if not nonempty:
        return []
    width = 1 + max(c for vals in cells.values() for c in vals)
    return [[cells.get(r, {}).get(c) for c in range(width)] for r in range(1, max(nonempty) + 1)]
