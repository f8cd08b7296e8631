"""Plain Python values from NumPy, JAX and TFDS ones, for JSON files, CSV cells and messages.

* `jsonable`: scalars and arrays -> lists and Python numbers, non-finite floats -> "NaN"/"Infinity" strings, so that
  every file the package writes is strict JSON.
* `as_text`: a text feature or metadata value -> ``str`` (TFDS data sources return text as UTF-8 bytes).
* `nested_diff`: what differs between two nested dicts (a recorded config and the one asked for), key by key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["as_text", "jsonable", "nested_diff"]


def jsonable(value: Any) -> Any:
    """Converts NumPy/JAX scalars and arrays, tuples and non-finite floats to strict-JSON-friendly Python."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


def as_text(value: Any) -> str:
    """A text feature (or any metadata value) as ``str``: TFDS data sources return text features as UTF-8 bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def nested_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``["key: old -> new", ...]`` for every dotted key whose value differs between two nested dicts (e.g. configs)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += nested_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
