"""TFDS builder for Eyes-defy-anemia: eye photos with palpebral/forniceal conjunctiva masks and Hgb per patient.

One example per patient folder (218 in the public archive: Italy 1-123, India 1-95). The photo is stored upright
(EXIF orientation applied) as JPEG with its long side shrunk to the config's ``long_side``; each mask is decoded
from its cut-out PNG, checked against the photo (`masks.check_alignment`), resized to the stored photo's size and
stored as a {0, 1} PNG. A mask that is absent, unreadable or misaligned is stored all-zero with ``has_<kind>=False``
and listed, with the reason, in the build summary (`summary.BuildSummary`, also written to ``build_summary.json``).
Files over ``max_file_mb`` (builder keyword, default `archive.DEFAULT_MAX_FILE_MB`) are skipped unread, with a
warning. The prepared data record the source's fingerprint (`anemia_jax.data.datasets.source_record`), so that they are
never reused for another archive. A source that is not the dataset, empty or truncated raises
`errors.UnusableSourceError`.

Usage (no TensorFlow needed)::

    builder = Builder(data_dir=..., config='long512', archive_path='~/Downloads/archive.zip')  # or via manual_dir
    builder.download_and_prepare(file_format='array_record')
    ds = builder.as_data_source('train')
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from anemia_jax.data.datasets import features as features_lib
from anemia_jax.data.datasets import source_record
from anemia_jax.data.datasets.eyes_defy_anemia import archive as archive_lib
from anemia_jax.data.datasets.eyes_defy_anemia import masks as masks_lib
from anemia_jax.data.datasets.eyes_defy_anemia import metadata as metadata_lib
from anemia_jax.data.datasets.eyes_defy_anemia import photos as photos_lib
from anemia_jax.data.datasets.eyes_defy_anemia import source as source_lib
from anemia_jax.data.datasets.eyes_defy_anemia import summary as summary_lib
from anemia_jax.data.datasets.eyes_defy_anemia.archive import MASK_KINDS
from anemia_jax.data.datasets.spec import DatasetSpec, register_dataset
from anemia_jax.utils import input_files

SHEET_NAME = "Foglio1"


@dataclasses.dataclass(eq=False)
class EyesDefyAnemiaConfig(tfds.core.BuilderConfig):
    """Which Eyes-defy-anemia set to write.

    Attributes:
      long_side: stored photo long side in pixels (never upscaled).
      archive_path: optional source zip or folder (the builder's ``archive_path=`` overrides it).
    """

    long_side: int = 512
    archive_path: str | None = None


def _read(arc: archive_lib.Archive, rel: str) -> bytes:
    try:
        return arc.read(rel)
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, input_files.NotARegularFileError,
            input_files.FileTooLargeError) as e:
        raise masks_lib.UnreadableImageError(f"could not be read from the archive ({type(e).__name__}: {e})") from e


class Builder(source_record.RecordsSource, tfds.core.GeneratorBasedBuilder):
    """Eyes-defy-anemia (Dimauro et al., 2023) as a TFDS dataset; see the module docstring and README.md."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: one example per patient, aligned masks, build summary."}
    BUILDER_CONFIGS = [
        EyesDefyAnemiaConfig(name="long512", long_side=512,
                             description="Photos and masks stored with a long side of 512 px (training at <= 512)."),
        EyesDefyAnemiaConfig(name="long1024", long_side=1024,
                             description="Photos and masks stored with a long side of 1024 px."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "long512"
    MANUAL_DOWNLOAD_INSTRUCTIONS = source_lib.manual_instructions(None)

    def __init__(self, *, archive_path: str | None = None, max_file_mb: int | str | None = None, **kwargs: Any):
        """Args: archive_path: zip or folder to build from (overrides the config's); max_file_mb: files larger than
        this many MiB are skipped unread (default `archive.DEFAULT_MAX_FILE_MB`); other arguments as in TFDS."""
        self._archive_path = archive_path
        try:
            self._max_file_mb = int(max_file_mb) if max_file_mb not in (None, "") else archive_lib.DEFAULT_MAX_FILE_MB
        except ValueError:
            self._max_file_mb = 0
        if self._max_file_mb < 1:
            raise ValueError(f"max_file_mb must be a positive whole number of MiB; got {max_file_mb!r}.")
        super().__init__(**kwargs)
        # Pickling re-runs __init__ with this state.
        self._original_state.update(archive_path=archive_path, max_file_mb=max_file_mb)
        if "file_format" in kwargs:
            self._original_state["file_format"] = kwargs["file_format"]
        self.build_summary: summary_lib.BuildSummary | None = None
        self._manual_dir = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features_lib.example_features(MASK_KINDS),
            homepage=source_lib.KAGGLE_URL,
            # Keep the archive's order (country, then patient number) so example i is predictable.
            disable_shuffling=True,
        )

    def _download_and_prepare(self, dl_manager, download_config):  # pytype: disable=signature-mismatch
        # The manual dir is searched directly: dl_manager.manual_dir raises when it is empty, and an empty manual dir
        # must still let the kagglehub fallback run.
        self._manual_dir = download_config.manual_dir or dl_manager.download_dir / "manual"
        self.build_summary = summary_lib.BuildSummary(config=self.builder_config.name,
                                                      long_side=self.builder_config.long_side)
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        self.build_summary.log()
        self.build_summary.write(self.data_dir)  # The temporary dir TFDS renames to data_path on success.

    def source_options(self) -> dict[str, Any]:
        return {"max_file_mb": self._max_file_mb}

    def requested_source(self, manual_dir):
        explicit = self._archive_path or self.builder_config.archive_path
        if explicit:
            return pathlib.Path(explicit).expanduser()
        manual = manual_dir or pathlib.Path(self.data_dir_root) / "downloads" / "manual"
        return source_lib.search_manual_dir(pathlib.Path(manual).expanduser())

    def _split_generators(self, dl_manager):
        del dl_manager  # The source is resolved by source_lib (manual_dir, archive_path or kagglehub).
        path, found_by = source_lib.resolve(self._archive_path or self.builder_config.archive_path, self._manual_dir)
        self.build_summary.source, self.build_summary.source_found_by = str(path), found_by
        self.used_source = path
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path) -> Iterator[tuple[str, dict[str, Any]]]:
        summary = self.build_summary
        with archive_lib.Archive(path, max_file_bytes=self._max_file_mb << 20) as arc:
            scan = archive_lib.scan(arc)
            summary.check_source(source_lib.compare_with_known_archive(scan.patients))
            for skipped in scan.skipped:
                summary.skip_file(skipped["path"], skipped["reason"])
            summary.misnamed_files_accepted = scan.misnamed
            summary.duplicates_ignored = scan.duplicates
            summary.files_ignored = dict(scan.ignored)
            sheets = self._read_metadata(arc, scan)
            for patient in scan.patients:
                example = self._example(arc, patient, sheets.get(patient.country))
                if example is not None:
                    summary.examples_written += 1
                    yield patient.patient_id, example

    def _read_metadata(self, arc, scan) -> dict[str, dict[int, metadata_lib.PatientMetadata]]:
        summary = self.build_summary
        sheets = {}
        for country, paths in scan.spreadsheets.items():
            contents = {}
            for rel in paths:
                try:
                    contents[rel] = _read(arc, rel)
                    parsed = metadata_lib.read_metadata_xlsx(contents[rel], source=rel, sheet=SHEET_NAME)
                except (ValueError, masks_lib.UnreadableImageError) as e:  # XlsxError is a ValueError.
                    summary.skip_file(rel, f"unreadable spreadsheet: {e}")
                    continue
                if country not in sheets:
                    sheets[country] = parsed.patients
                    summary.spreadsheets_used[country] = rel
                    summary.spreadsheet_problems.extend(parsed.problems)
                elif contents[rel] != contents[summary.spreadsheets_used[country]]:
                    summary.spreadsheet_problems.append(
                        f"{rel} differs from {summary.spreadsheets_used[country]}; used the latter")
            if country not in sheets:
                summary.spreadsheet_problems.append(f"no readable {country}.xlsx: {country} patients have no metadata")
            else:
                folders = {p.number for p in scan.patients if p.country == country}
                extra = sorted(set(sheets[country]) - folders)
                if extra:
                    summary.spreadsheet_problems.append(f"{country} sheet lists patients without a folder: {extra}")
        return sheets

    def _example(self, arc, patient: archive_lib.PatientFiles, sheet) -> dict[str, Any] | None:
        """The example of one patient folder, or None (recorded in the summary) if its photo is unusable."""
        summary, pid = self.build_summary, patient.patient_id
        if patient.photo is None:
            summary.patients_skipped.append({"patient_id": pid, "reason": "no photo in the folder"})
            for rel in patient.masks.values():
                summary.skip_file(rel, f"the folder of {pid} has no photo")
            return None

        cutouts = {}
        for kind in MASK_KINDS:
            rel = patient.masks.get(kind)
            if rel is None:
                summary.mask_missing(kind, pid, "no file")
                continue
            try:
                cutouts[kind] = masks_lib.decode_cutout(_read(arc, rel))
            except masks_lib.UnreadableImageError as e:
                summary.skip_file(rel, f"unreadable mask: {e}")
                summary.mask_missing(kind, pid, f"unreadable: {e}")
                continue
            if cutouts[kind].iccp_removed:
                summary.iccp_chunks_removed.append(rel)

        long_side = self.builder_config.long_side
        need = max([long_side] + [max(c.mask.shape) for c in cutouts.values()])
        try:
            photo = photos_lib.load_photo(_read(arc, patient.photo), min_long_side=need)
        except masks_lib.UnreadableImageError as e:
            summary.skip_file(patient.photo, f"unreadable photo: {e}")
            summary.patients_skipped.append({"patient_id": pid, "reason": f"unreadable photo {patient.photo}"})
            return None
        size = photos_lib.stored_size(photo.size, long_side)

        meta = (sheet or {}).get(patient.number)
        if meta is None:
            summary.patients_without_metadata.append(pid)
            meta = metadata_lib.PatientMetadata()
        if not np.isfinite(meta.hgb):
            summary.hgb_missing.append(pid)
        example = {
            "image": photos_lib.encode_jpeg(photos_lib.resize_photo(photo, size)),
            "patient_id": pid,
            "country": patient.country,
            "hgb": np.float32(meta.hgb),
            "gender": meta.gender,
            "age": np.float32(meta.age),
            "anemic": np.int32(meta.anemic),
        }
        empty = np.zeros((size[1], size[0]), np.uint8)
        for kind in MASK_KINDS:
            stored = None
            if kind in cutouts:
                alignment = masks_lib.check_alignment(photo, cutouts[kind])
                if alignment.ok:
                    stored = masks_lib.resize_mask(cutouts[kind].mask, size)
                    summary.masks_present[kind] += 1
                    summary.count_encoding(cutouts[kind].encoding)
                else:
                    summary.misaligned_masks.append({
                        "patient_id": pid, "kind": kind, "path": patient.masks[kind], "reason": alignment.reason,
                        "correlation": alignment.correlation, "mad": alignment.mad,
                        "best_alternative": alignment.best_alternative})
                    summary.mask_missing(kind, pid, f"misaligned: {alignment.reason}")
            example[kind] = masks_lib.encode_mask_png(stored if stored is not None else empty)
            example[f"has_{kind}"] = stored is not None
        return example


# ~175 training photos per fold: 11 steps per epoch at batch 16.
register_dataset(DatasetSpec(
    name="eyes_defy_anemia", builder="eyes_defy_anemia", stored=((512, "long512"), (1024, "long1024")),
    masks=MASK_KINDS, default_targets=("palpebral", "forniceal_palpebral"), protocols=("kfold", "loco"),
    builder_kwargs=(("archive_path", ""), ("max_file_mb", "")),
    schedule=(("num_epochs", 300), ("warmup_epochs", 5), ("eval_every_epochs", 10), ("checkpoint_every_epochs", 10)),
), aliases=("eyes",))
