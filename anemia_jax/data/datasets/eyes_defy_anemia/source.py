"""Where the Eyes-defy-anemia archive comes from: an explicit path, TFDS's manual_dir, or a kagglehub download.

Order of preference:
1. ``archive_path`` (builder keyword or config field): a zip or a folder; an error if it does not exist.
2. TFDS's ``manual_dir`` (default ``<data_dir>/downloads/manual``) or its ``eyes_defy_anemia/`` subfolder: the
   unzipped folder (``dataset anemia/`` possibly one level down) or the Kaggle zip.
3. ``kagglehub.dataset_download('harshwardhanfartale/eyes-defy-anemia')`` when kagglehub is installed (public set:
   no credentials needed) and the machine is online.
4. Otherwise `SourceNotFoundError`, whose message says what to download and where to put it.

Whatever the source, the scanned totals are compared with the known public archive (`compare_with_known_archive`):
a partial or different download (a kagglehub cache holding another version, an interrupted unzip, a subset) is then
named in the build summary and logged as a warning instead of passing unnoticed. The comparison uses only totals and
patient numbers, so no listing of the dataset's files ships with this package.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Sequence

from anemia_jax.data.datasets.eyes_defy_anemia import archive as archive_lib

KAGGLE_HANDLE = "harshwardhanfartale/eyes-defy-anemia"
KAGGLE_URL = "https://www.kaggle.com/datasets/harshwardhanfartale/eyes-defy-anemia"
# Deep enough for <manual>/<folder>/dataset anemia/<Country>/<n>/<file>, shallow enough not to crawl a manual_dir
# shared with other datasets.
_MAX_DEPTH = 6

# The public archive (Dimauro et al., 2023; Kaggle copy): patient folders per country, folders with a photo, and mask
# files per kind. Italy 1, 35, 54, 58, 75 and 109 have no forniceal (nor forniceal_palpebral) mask.
KNOWN_PATIENTS = {"India": range(1, 96), "Italy": range(1, 124)}
KNOWN_PHOTOS = 218
KNOWN_MASKS = {"palpebral": 218, "forniceal": 212, "forniceal_palpebral": 212}
# Patient ids listed in a difference message before it is abbreviated.
_MAX_LISTED = 10


class SourceNotFoundError(FileNotFoundError):
    """No usable copy of the archive was found and none could be downloaded."""


def holds_dataset(path: pathlib.Path) -> bool:
    """Whether a folder or zip contains Eyes-defy-anemia patient folders (``<Country>/<number>/<file>``)."""
    try:
        with archive_lib.Archive(path, max_depth=_MAX_DEPTH) as a:
            return bool(archive_lib.find_roots(a.files))
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def search_manual_dir(manual_dir: pathlib.Path) -> pathlib.Path | None:
    """The Eyes-defy-anemia folder or zip in ``manual_dir`` (or its ``eyes_defy_anemia/``), or None."""
    for base in (manual_dir / "eyes_defy_anemia", manual_dir):
        if not base.is_dir():
            continue
        # The unzipped folder first (no decompression while building), then any zip that holds the set.
        if holds_dataset(base):
            return base
        for zpath in sorted(base.glob("*.zip")):
            if holds_dataset(zpath):
                return zpath
    return None


def _listed(ids: list[str]) -> str:
    more = ", ..." if len(ids) > _MAX_LISTED else ""
    return ", ".join(ids[:_MAX_LISTED]) + more


def compare_with_known_archive(patients: Sequence[archive_lib.PatientFiles]) -> list[str]:
    """How the scanned patient folders differ from the known public archive (`KNOWN_PATIENTS`, `KNOWN_PHOTOS`,
    `KNOWN_MASKS`).

    Args:
      patients: `archive.scan(...).patients`.

    Returns:
      One human-readable line per difference (missing or unexpected patient folders, photo and per-kind mask
      totals); empty when the source matches the known archive.
    """
    def order(pid: str) -> tuple[str, int]:
        country, number = pid.split("/")
        return country, int(number)

    expected = {f"{c}/{n}" for c, numbers in KNOWN_PATIENTS.items() for n in numbers}
    found = {p.patient_id for p in patients}
    differences = []
    missing, unexpected = sorted(expected - found, key=order), sorted(found - expected, key=order)
    if missing:
        differences.append(f"known patient folders missing ({len(missing)} of {len(expected)}): {_listed(missing)}")
    if unexpected:
        differences.append(f"patient folders not in the known archive ({len(unexpected)}): {_listed(unexpected)}")
    photos = sum(p.photo is not None for p in patients)
    if photos != KNOWN_PHOTOS:
        differences.append(f"photos: {photos} found, {KNOWN_PHOTOS} in the known archive")
    for kind, known in KNOWN_MASKS.items():
        count = sum(kind in p.masks for p in patients)
        if count != known:
            differences.append(f"{kind} masks: {count} found, {known} in the known archive")
    return differences


def manual_instructions(manual_dir: str | os.PathLike | None) -> str:
    where = f"`{manual_dir}`" if manual_dir else "TFDS's manual_dir (`<data_dir>/downloads/manual/`)"
    return (
        f"Download the Eyes-defy-anemia archive from {KAGGLE_URL} (the Download button gives a zip, e.g. "
        f"`archive.zip`, holding the folder `dataset anemia/`) and put the zip, or the folder it unzips to, "
        f"in {where}; or pass `archive_path=<zip or folder>` to the builder.")


def resolve(archive_path: str | os.PathLike | None, manual_dir: str | os.PathLike | None) -> tuple[pathlib.Path, str]:
    """Finds the archive.

    Args:
      archive_path: explicit zip or folder, or None.
      manual_dir: TFDS manual directory (need not exist).

    Returns:
      (path of a zip or folder holding the set, how it was found — for the build summary).

    Raises:
      FileNotFoundError: ``archive_path`` does not exist.
      SourceNotFoundError: nothing found and kagglehub unavailable or failing; the message explains both ways.
    """
    if archive_path is not None:
        path = pathlib.Path(archive_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"archive_path {str(path)!r} does not exist. Point it at the Eyes-defy-anemia zip or the folder it "
                f"unzips to ({KAGGLE_URL}).")
        return path, "archive_path"

    tried = []
    if manual_dir is not None:
        manual = pathlib.Path(manual_dir).expanduser()
        found = search_manual_dir(manual)
        if found is not None:
            return found, "manual_dir"
        tried.append(f"manual_dir {str(manual)!r}: " + ("no Eyes-defy-anemia zip or folder in it" if manual.is_dir()
                                                         else "does not exist"))

    try:
        import kagglehub  # pylint: disable=import-outside-toplevel  # Optional dependency (anemia_jax[kaggle]).
    except ImportError:
        tried.append("kagglehub: not installed")
    else:
        try:
            downloaded = pathlib.Path(kagglehub.dataset_download(KAGGLE_HANDLE))
        except Exception as e:  # Network, authentication, quota... any failure falls through to the instructions.
            tried.append(f"kagglehub.dataset_download({KAGGLE_HANDLE!r}) failed: {type(e).__name__}: {e}")
        else:
            if holds_dataset(downloaded):
                return downloaded, "kagglehub"
            tried.append(f"kagglehub downloaded {str(downloaded)!r}, which holds no Eyes-defy-anemia patient folders")

    raise SourceNotFoundError(
        "Could not find the Eyes-defy-anemia data. Two ways to provide it:\n"
        f"  1. {manual_instructions(manual_dir)}\n"
        f"  2. `pip install kagglehub` (or `pip install anemia_jax[kaggle]`) on a machine with internet access; the "
        f"builder then downloads '{KAGGLE_HANDLE}' itself.\n"
        "Tried: " + "; ".join(tried) + ".")
