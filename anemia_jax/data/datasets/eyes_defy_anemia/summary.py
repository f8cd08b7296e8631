"""The build report of the Eyes-defy-anemia builder: what was written, what was missing, skipped or fixed, and why.

It is logged (absl) at the end of a build and written as ``build_summary.json`` in the prepared dataset's folder
(``<data_dir>/eyes_defy_anemia/<config>/<version>/``), so the answer to "why does patient X have no forniceal mask?"
stays next to the data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath

from anemia_jax.data.datasets.eyes_defy_anemia.archive import MASK_KINDS

SUMMARY_FILENAME = "build_summary.json"


@dataclasses.dataclass
class BuildSummary:
    """Counters and lists filled while the examples are generated. All paths are as found in the archive."""

    source: str = ""
    source_found_by: str = ""
    # Whether the scanned totals equal the known public archive's (None until checked) and, if not, how they differ.
    source_matches_known_archive: bool | None = None
    source_differences: list[str] = dataclasses.field(default_factory=list)
    config: str = ""
    long_side: int = 0
    examples_written: int = 0
    masks_present: dict[str, int] = dataclasses.field(default_factory=lambda: {k: 0 for k in MASK_KINDS})
    # kind -> {patient_id: why the mask is missing ('no file', 'unreadable: ...', 'misaligned: ...')}
    masks_missing: dict[str, dict[str, str]] = dataclasses.field(default_factory=lambda: {k: {} for k in MASK_KINDS})
    misaligned_masks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    files_skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    patients_skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    misnamed_files_accepted: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates_ignored: list[dict[str, str]] = dataclasses.field(default_factory=list)
    iccp_chunks_removed: list[str] = dataclasses.field(default_factory=list)
    mask_encodings: dict[str, int] = dataclasses.field(default_factory=dict)
    files_ignored: dict[str, int] = dataclasses.field(default_factory=dict)
    spreadsheets_used: dict[str, str] = dataclasses.field(default_factory=dict)
    spreadsheet_problems: list[str] = dataclasses.field(default_factory=list)
    patients_without_metadata: list[str] = dataclasses.field(default_factory=list)
    hgb_missing: list[str] = dataclasses.field(default_factory=list)

    def skip_file(self, path: str, reason: str) -> None:
        """Records (and warns about) a file that was not used."""
        logging.warning("eyes_defy_anemia: skipping %s: %s", path, reason)
        self.files_skipped.append({"path": path, "reason": reason})

    def check_source(self, differences: list[str]) -> None:
        """Records (and warns about) how the source differs from the known archive; empty: it matches."""
        self.source_matches_known_archive = not differences
        self.source_differences = list(differences)
        if differences:
            logging.warning("eyes_defy_anemia: the source %s differs from the known public archive (a partial or "
                            "different download?): %s", self.source, "; ".join(differences))

    def mask_missing(self, kind: str, patient_id: str, reason: str) -> None:
        self.masks_missing[kind][patient_id] = reason

    def count_encoding(self, encoding: str) -> None:
        self.mask_encodings[encoding] = self.mask_encodings.get(encoding, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents (NaN scores become None)."""
        d = _finite(dataclasses.asdict(self))
        d["masks_missing_count"] = {k: len(v) for k, v in self.masks_missing.items()}
        d["files_skipped_by_reason"] = dict(collections.Counter(
            s["reason"].split(":")[0] for s in self.files_skipped))
        return d

    def write(self, directory: str | os.PathLike) -> str:
        """Writes ``build_summary.json`` into ``directory``; returns its path."""
        # epath handles local and cloud (gs://) data dirs alike, as TFDS does.
        path = epath.Path(directory) / SUMMARY_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return os.fspath(path)

    def log(self) -> None:
        """One INFO block with the totals, plus a WARNING per misaligned mask."""
        for m in self.misaligned_masks:
            logging.warning("eyes_defy_anemia: %s %s mask not stored (misaligned): %s", m["patient_id"], m["kind"],
                            m["reason"])
        logging.info(
            "eyes_defy_anemia build summary (%s, long side %d) from %s [%s]; matches the known archive: %s\n"
            "  examples written: %d; masks present: %s; missing: %s\n"
            "  misaligned masks: %d; files skipped: %d %s; patients skipped: %d\n"
            "  misnamed files accepted: %d; identical duplicates ignored: %d; iCCP chunks removed: %d\n"
            "  ignored: %s; patients without metadata: %d; Hgb missing: %s; spreadsheet problems: %d",
            self.config, self.long_side, self.source, self.source_found_by, self.source_matches_known_archive,
            self.examples_written, self.masks_present,
            {k: len(v) for k, v in self.masks_missing.items()}, len(self.misaligned_masks), len(self.files_skipped),
            self.to_dict()["files_skipped_by_reason"], len(self.patients_skipped), len(self.misnamed_files_accepted),
            len(self.duplicates_ignored), len(self.iccp_chunks_removed), self.files_ignored,
            len(self.patients_without_metadata), self.hgb_missing, len(self.spreadsheet_problems))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def read_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``build_summary.json`` of a prepared dataset folder (e.g. ``builder.data_path``)."""
    return json.loads((epath.Path(directory) / SUMMARY_FILENAME).read_text())
