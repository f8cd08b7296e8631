"""Finding the Eyes-defy-anemia files in a zip or a folder, and naming which file is which.

The archive's layout (``dataset anemia/<Country>/<number>/``, one photo and up to three mask PNGs per patient folder)
is regular, but its file names are not. This module turns a raw listing into one `PatientFiles` per patient folder
and records every decision it took on the way (`ScanResult.misnamed`, `.duplicates`, `.skipped`, `.ignored`), so the
builder's summary can show that nothing was dropped silently.

Naming rules (all derived from the real listing of the public archive):

* a mask is ``<stem>_<kind>.png`` with kind ``palpebral``, ``forniceal`` or ``forniceal_palpebral``; the kind words
  are matched with up to two typos (``palplebral``, ``papebral``), empty tokens from doubled underscores
  (``004__forniceal``) are dropped, and a trailing copy counter (``_palpebral(1).png``) is removed; each such fix is
  recorded as a misnamed file accepted;
* the one other image in the folder is the photo; a mask stem that differs from the photo stem only by zero padding
  (``001_palpebral.png`` beside ``1.jpg``, Italy 1-31) is the archive's convention and is not reported;
* when two files claim the same mask, the canonically named one wins; byte-identical copies are recorded as
  duplicates, differing ones as skipped files;
* hidden files (``.DS_Store``, ``._*``, ``__MACOSX/``) are ignored and counted.

Files larger than the archive's ``max_file_bytes`` are never read (`FileTooLargeError`, an `OSError` the builder
records as a skipped file): a zip member's size comes from the central directory, so an oversized member costs
nothing; the real archive's largest file is a ~5 MB photo.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import posixpath
import re
import zipfile
from typing import Iterable, Iterator

from anemia_jax.utils import errors, input_files

MASK_KINDS = ("palpebral", "forniceal", "forniceal_palpebral")
_PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_MASK_EXTENSIONS = (".png",)
_IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
_COPY_SUFFIX = re.compile(r"\s*\((\d+)\)$")
# Typos accepted in the kind words; 2 covers every misspelling in the archive and stays far from the other word
# (edit distance between 'palpebral' and 'forniceal' is 8).
_MAX_TYPOS = 2
DEFAULT_MAX_FILE_MB = 100


class FileTooLargeError(OSError):
    """A file of the archive is over the size cap; it is skipped, never read."""


class Archive:
    """Read-only view of a zip file or a folder as POSIX-style relative file paths.

    Use as a context manager (closes the zip). ``files`` lists regular files, hidden macOS metadata included.
    ``max_file_bytes`` caps what `read` reads (None: no cap).

    Raises:
        errors.UnusableSourceError: ``path`` is neither a folder nor a readable zip (e.g. truncated).
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike, *, max_depth: int | None = None,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_MB << 20):
        self.path = pathlib.Path(path)
        self.max_file_bytes = max_file_bytes
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            self.files = sorted(_walk(self.path, max_depth))
        elif zipfile.is_zipfile(self.path):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise errors.UnusableSourceError(f"{self.path} is a damaged zip archive ({e}).") from e
            self.files = sorted(
                i.filename.rstrip("/") for i in self._zip.infolist()
                if not i.is_dir() and (max_depth is None or i.filename.count("/") < max_depth))
        elif self.path.exists():
            raise errors.UnusableSourceError(
                f"{self.path} is neither a folder nor a readable zip archive (an interrupted download leaves a "
                "truncated zip like this); download it again or point at the folder it unzips to.")
        else:
            raise FileNotFoundError(f"{self.path} does not exist.")

    def size(self, rel: str) -> int:
        """The (uncompressed) size in bytes of file ``rel``, without reading it."""
        if self._zip is not None:
            return self._zip.getinfo(rel).file_size
        return (self.path / rel).stat().st_size

    def read(self, rel: str) -> bytes:
        """The bytes of file ``rel`` (a path from ``files``).

        Raises:
            FileTooLargeError: the file is over ``max_file_bytes`` (nothing of it is read).
            input_files.NotARegularFileError: in a folder, the path is a FIFO, a device or a symlink loop.
        """
        size = self.size(rel)
        cap = self.max_file_bytes
        if cap is not None and size > cap:
            raise FileTooLargeError(f"{size / 2**20:.1f} MiB, over the {cap / 2**20:.0f} MiB cap on a file "
                                    "(builder keyword max_file_mb)")
        if self._zip is not None:
            with self._zip.open(rel) as f:
                return f.read(size)  # the declared size bounds the read, whatever the member's data hold
        # Regular files only, capped: a FIFO in the folder is refused, never waited on.
        return input_files.read_file(self.path / rel, max_bytes=cap, what="File")

    def describe(self, rel: str) -> str:
        """A path a user can find: ``folder/rel`` or ``archive.zip:rel``."""
        if self._zip is not None:
            return f"{self.path}:{rel}"
        return str(self.path / rel)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _walk(root: pathlib.Path, max_depth: int | None) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
        if max_depth is not None and depth + 1 >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        for name in filenames:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            yield rel.replace(os.sep, "/")


def is_hidden(rel: str) -> bool:
    """macOS/Windows metadata: .DS_Store, AppleDouble ``._*`` files, ``__MACOSX/``, Thumbs.db."""
    parts = rel.split("/")
    return any(p == "__MACOSX" for p in parts) or parts[-1].startswith(".") or parts[-1].lower() in _IGNORED_NAMES


@dataclasses.dataclass
class PatientFiles:
    """The files of one patient folder (paths relative to the archive)."""

    country: str
    number: int
    folder: str
    photo: str | None = None
    masks: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        return f"{self.country}/{self.number}"


@dataclasses.dataclass
class ScanResult:
    """What `scan` found. Every file of the patient folders is in exactly one of: a patient's photo or masks,
    ``duplicates``, ``skipped`` or the ``ignored`` counts."""

    root: str
    patients: list[PatientFiles]
    spreadsheets: dict[str, list[str]]
    misnamed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class NameInfo:
    """How a file name was read: ``kind`` is a mask kind or None (photo candidate); ``notes`` lists the fixes."""

    kind: str | None
    stem: str
    notes: tuple[str, ...]


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _matches(token: str, word: str) -> bool:
    return token == word or (token[:1] == word[:1] and _edit_distance(token, word) <= _MAX_TYPOS)


def parse_name(filename: str) -> NameInfo:
    """Reads a patient-folder file name: which mask kind it is (None for a photo), its stem, and the fixes applied.

    >>> parse_name('T_64_20190612_092742_forniceal_palplebral.png').kind
    'forniceal_palpebral'
    """
    base, ext = posixpath.splitext(filename)
    notes = []
    copy = _COPY_SUFFIX.search(base)
    if copy:
        base = base[:copy.start()]
        notes.append(f"copy counter '({copy.group(1)})' removed")
    if ext.lower() not in _MASK_EXTENSIONS:
        return NameInfo(None, base, tuple(notes))
    raw_tokens = base.split("_")
    tokens = [t for t in raw_tokens if t]
    if len(tokens) != len(raw_tokens):
        notes.append("doubled underscore")
    lower = [t.lower() for t in tokens]
    kind, n = None, 0
    if len(lower) >= 3 and _matches(lower[-2], "forniceal") and _matches(lower[-1], "palpebral"):
        kind, n = "forniceal_palpebral", 2
    elif len(lower) >= 2 and _matches(lower[-1], "palpebral"):
        kind, n = "palpebral", 1
    elif len(lower) >= 2 and _matches(lower[-1], "forniceal"):
        kind, n = "forniceal", 1
    if kind is None:
        return NameInfo(None, base, tuple(notes))
    written = "_".join(lower[-n:])
    if written != kind:
        notes.append(f"'{written}' read as '{kind}'")
    return NameInfo(kind, "_".join(tokens[:-n]), tuple(notes))


def _same_stem(a: str, b: str) -> bool:
    # Italy 1-31: photo '1.jpg', masks '001_*.png'.
    return a == b or (a.isdigit() and b.isdigit() and int(a) == int(b))


def _same_bytes(archive: Archive, a: str, b: str) -> bool:
    """Whether two files hold the same bytes (sizes first: an oversized file is never read)."""
    if archive.size(a) != archive.size(b):
        return False
    try:
        return archive.read(a) == archive.read(b)
    except OSError:
        return False


def find_roots(files: Iterable[str]) -> collections.Counter:
    """Candidate dataset roots: folders holding ``<Country>/<number>/<file>``, with how many such files each has."""
    roots: collections.Counter = collections.Counter()
    for rel in files:
        if is_hidden(rel):
            continue
        parts = rel.split("/")
        if len(parts) >= 3 and parts[-2].strip().isdigit() and not parts[-3].isdigit():
            roots["/".join(parts[:-3])] += 1
    return roots


def _spreadsheets(files: list[str], root: str, countries: Iterable[str]) -> dict[str, list[str]]:
    """``<Country>.xlsx`` inside the country folder, beside it, or beside an enclosing folder — in that order."""
    by_dir = collections.defaultdict(dict)
    for rel in files:
        if rel.lower().endswith(".xlsx") and not is_hidden(rel):
            d, name = posixpath.split(rel)
            by_dir[d][name[:-5].strip().lower()] = rel
    found = {}
    for country in countries:
        dirs = [posixpath.join(root, country) if root else country]
        d = root
        while True:
            dirs.append(d)
            if not d:
                break
            d = posixpath.dirname(d)
        found[country] = [by_dir[d][country.lower()] for d in dirs if country.lower() in by_dir.get(d, {})]
    return found


def scan(archive: Archive) -> ScanResult:
    """Groups the archive's files into patients and names every photo and mask.

    Raises:
      ValueError: no ``<Country>/<number>/`` patient folders anywhere in the archive.
    """
    roots = find_roots(archive.files)
    if not roots:
        raise errors.UnusableSourceError(
            f"{archive.path} does not contain the Eyes-defy-anemia patient folders (expected "
            "'dataset anemia/<Country>/<number>/<photo>.jpg'"
            + (f"; it holds {len(archive.files)} other files" if archive.files else "; it is empty")
            + "); is it the right archive? Download the dataset's zip from "
            "https://www.kaggle.com/datasets/harshwardhanfartale/eyes-defy-anemia.")
    root = roots.most_common(1)[0][0]
    prefix = root + "/" if root else ""
    result = ScanResult(root=root, patients=[], spreadsheets={})
    folders: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for rel in archive.files:
        if not rel.startswith(prefix):
            continue
        parts = rel[len(prefix):].split("/")
        if is_hidden(rel):
            result.ignored["hidden file (" + (parts[-1] if parts[-1].startswith(".") else "system") + ")"] += 1
        elif len(parts) == 3 and parts[1].strip().isdigit():
            folders[(parts[0], int(parts[1]))].append(rel)
        elif not rel.lower().endswith(".xlsx"):
            result.ignored["outside patient folders"] += 1
    for (country, number), rels in sorted(folders.items()):
        result.patients.append(_scan_folder(archive, country, number, rels, result))
    for other_root in roots:
        if other_root != root:
            result.ignored[f"files of a second dataset copy under '{other_root}/'"] += roots[other_root]
    result.spreadsheets = _spreadsheets(archive.files, root, sorted({c for c, _ in folders}))
    return result


def _scan_folder(archive: Archive, country: str, number: int, rels: list[str], result: ScanResult) -> PatientFiles:
    patient = PatientFiles(country=country, number=number, folder=posixpath.dirname(rels[0]))
    photos, masks = [], collections.defaultdict(list)
    for rel in sorted(rels):
        name = posixpath.basename(rel)
        info = parse_name(name)
        if info.kind is not None:
            masks[info.kind].append((rel, info))
        elif posixpath.splitext(name)[1].lower() in _PHOTO_EXTENSIONS:
            photos.append((rel, info))
        else:
            result.skipped.append({"path": rel, "reason": "neither a photo nor a mask (unexpected file type)"})

    if photos:
        # Prefer a photo whose stem the masks share, then the plain-named one; the others are reported.
        mask_stems = {i.stem for group in masks.values() for _, i in group}
        photos.sort(key=lambda p: (not any(_same_stem(p[1].stem, s) for s in mask_stems), bool(p[1].notes),
                                   not p[0].lower().endswith((".jpg", ".jpeg")), p[0]))
        patient.photo = photos[0][0]
        for rel, _ in photos[1:]:
            result.skipped.append({"path": rel, "reason": f"second photo in the folder; kept {patient.photo}"})
    photo_stem = photos[0][1].stem if photos else None

    for kind, group in masks.items():
        # Canonical names first: a fixed-up name only stands in when the proper file is absent.
        group.sort(key=lambda m: (len(m[1].notes), m[0]))
        kept, kept_info = group[0]
        patient.masks[kind] = kept
        notes = list(kept_info.notes)
        if photo_stem is not None and not _same_stem(kept_info.stem, photo_stem):
            notes.append(f"stem '{kept_info.stem}' differs from the photo's '{photo_stem}'")
        if notes:
            result.misnamed.append({"path": kept, "kind": kind, "notes": "; ".join(notes)})
        for rel, _ in group[1:]:
            if _same_bytes(archive, rel, kept):
                result.duplicates.append({"path": rel, "kept": kept})
            else:
                result.skipped.append(
                    {"path": rel, "reason": f"another {kind} mask with different content; kept {kept}"})
    return patient
