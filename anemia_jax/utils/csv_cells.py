"""CSV cells that a spreadsheet shows as text, never runs as a formula.

A photo named ``=HYPERLINK("http://x", "click").jpg`` lands in ``predictions.csv`` and the page's CSV; opened in
Excel, LibreOffice or Google Sheets, a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
is read as a formula (CSV or formula injection, OWASP). `escape_cell` prefixes such a cell with an apostrophe, which
spreadsheets show as nothing and which keeps the rest verbatim; numbers (``-0.25``, ``+3``, ``-inf``) are left as
they are, so that numeric columns stay numeric. `escape_row` does it for a row, before ``csv.writer`` quotes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["FORMULA_STARTS", "escape_cell", "escape_row"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_cell(value: Any) -> Any:
    """``value`` unchanged unless it is text a spreadsheet would run as a formula; then ``"'" + value``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


def escape_row(row: Iterable[Any]) -> list[Any]:
    """`escape_cell` of every cell of ``row``."""
    return [escape_cell(v) for v in row]
