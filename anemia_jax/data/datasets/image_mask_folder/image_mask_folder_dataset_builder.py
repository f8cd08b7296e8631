"""TFDS builder for "a folder of images and a folder of masks with the same names" (e.g. Kvasir-SEG).

Layout of the source folder (names configurable in `ImageMaskFolderConfig`)::

    <source>/images/<id>.<jpg|jpeg|png|bmp|tif|tiff>
    <source>/masks/<id><mask_suffix>.<any of those>     # same stem; the extension may differ from the image's
    <source>/<split file>                               # optional: one id per line, per split

Masks are converted to grey levels and binarised at ``gray >= mask_threshold``, except masks whose values are all 0 or 1
(label images stored as {0, 1} rather than {0, 255}), whose 1s are the foreground whatever the threshold; both
conventions read correctly without flags. Photos of any bit depth are scaled to 8 bits (`image_io.to_rgb8`), never
clipped. Without split files every image goes to a single 'train' split. Examples follow the project's dataset contract
(`anemia_jax.data.datasets`): ``image`` (JPEG), ``mask`` + ``has_mask`` (an image without a usable mask is kept,
all-zero, has_mask=False), ``patient_id`` = the file stem, ``country`` = the config's, ``hgb``/``age`` NaN, ``gender``
'', ``anemic`` -1.

Nothing is dropped silently: unreadable files, masks that do not match their image, ids of a split file that
are not in the folder and images in no split are reported one by one as warnings, and each split ends with a
summary, also kept in ``builder.build_summary[split]``. Only regular files are read (`input_files`): a FIFO, a device,
a dangling symlink or a symlink loop among the images or masks is an unreadable file, and as a split file a message;
none is ever waited on.

The source is ``source_dir=`` (a builder keyword), else ``<manual_dir>/<config.manual_subdir>`` or ``<manual_dir>``
itself (TFDS's manual_dir, ``<data_dir>/downloads/manual`` by default). The prepared data record the source's
fingerprint and the mask threshold (`anemia_jax.data.datasets.source_record`), so that they are never reused for another
folder. ``mask_threshold=`` (a builder keyword, ``config.dataset.builder_kwargs.mask_threshold`` from a config)
overrides the config's threshold. A split of which no image can be read stops preparation with
`errors.UnusableSourceError`.

    builder = Builder(config='kvasir_seg_256', source_dir='/data/kvasir_seg', data_dir=...)
    builder = Builder(config=ImageMaskFolderConfig(name='mine', long_side=512), source_dir='/data/mine')
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from anemia_jax.data.datasets import features as features_lib
from anemia_jax.data.datasets import source_record
from anemia_jax.data.datasets.spec import DatasetSpec, register_dataset
from anemia_jax.utils import errors, image_io, input_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")
# Errors Pillow raises on truncated, corrupt or unsupported files (and `input_files`' ValueErrors for a FIFO).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_MAX_SPLIT_FILE_BYTES = 16 << 20  # a split file lists ids: far below this
_MAX_LISTED = 10  # names listed in one warning; the rest are only counted


def _listed(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(eq=False, kw_only=True)
class ImageMaskFolderConfig(tfds.core.BuilderConfig):
    """Layout and processing of one image/mask folder.

    Attributes:
      images_dir: subfolder holding the images.
      masks_dir: subfolder holding the masks.
      mask_suffix: the mask of ``<id>.<ext>`` is ``<id><mask_suffix>.<ext2>`` (e.g. '_mask'); '' for same name.
      mask_extensions: mask extensions tried, in order of preference after the image's own extension.
      mask_threshold: grey level at or above which a mask pixel is foreground (16-bit masks are scaled to
        8 bits first; colour and palette masks are converted to luminance, ignoring transparency). Masks whose
        values are all 0 or 1 are read as {0, 1} labels whatever the threshold.
      split_files: split name -> file of ids (one per line, '#' comments, an image extension is stripped),
        relative to the source folder; None writes every image to 'train'.
      long_side: images (and masks) larger than this are downsized so that their long side is ``long_side``
        (antialiased image; mask area-averaged, then thresholded); None keeps the original resolution.
      country: value of the ``country`` feature.
      jpeg_quality: quality of re-encoded images (JPEG sources kept at full size are stored byte for byte).
      manual_subdir: folder under TFDS's manual_dir holding this set; None means the config name.
      homepage: the data set's web page, reported as the TFDS homepage; None: the project README
        (`features.PROJECT_HOMEPAGE`).
    """

    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_suffix: str = ""
    mask_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    mask_threshold: int = 128
    split_files: Mapping[str, str] | None = None
    long_side: int | None = None
    country: str = ""
    jpeg_quality: int = 90
    manual_subdir: str | None = None
    homepage: str | None = None

    def __post_init__(self):
        if not 1 <= self.mask_threshold <= 255:
            raise ValueError(f"mask_threshold must be in [1, 255]; got {self.mask_threshold}.")
        if self.long_side is not None and self.long_side < 8:
            raise ValueError(f"long_side must be None or at least 8 pixels; got {self.long_side}.")
        bad = [e for e in self.mask_extensions if e.lower() not in IMAGE_EXTENSIONS]
        if bad:
            raise ValueError(f"Unsupported mask extensions {bad}; use some of {IMAGE_EXTENSIONS}.")


KVASIR_SEG_HOMEPAGE = "https://datasets.simula.no/kvasir-seg/"
_KVASIR_SPLITS = {"train": "splits_official_medico2020/train.txt", "test": "splits_official_medico2020/val.txt"}
_KVASIR_HELP = (
    "Kvasir-SEG: download Kvasir-SEG.zip from https://datasets.simula.no/kvasir-seg/ and unzip it (images/ and "
    "masks/), then put train.txt and val.txt of the official MediaEval 2020 Medico split (folder "
    "kvasir-seg-train-val of https://github.com/DebeshJha/2020-MediaEval-Medico-polyp-segmentation) into "
    "splits_official_medico2020/ beside them."
)


@dataclasses.dataclass
class BuildSummary:
    """What one split's generation wrote and skipped (``skipped``/``masks_unusable``: file -> reason)."""

    written: int = 0
    masks_missing: int = 0
    masks_rescaled: int = 0
    masks_empty: int = 0
    masks_labels01: int = 0  # masks stored as {0, 1} labels (read as such)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    masks_unusable: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        reasons = collections.Counter(r.split(":")[0] for r in [*self.skipped.values(), *self.masks_unusable.values()])
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
        return (
            f"{self.written} examples written ({self.masks_missing} without a mask, {self.masks_rescaled} masks "
            f"rescaled to their image, {self.masks_empty} masks empty after thresholding, {self.masks_labels01} "
            "masks read as {0, 1} labels); "
            f"{len(self.skipped)} images skipped, {len(self.masks_unusable)} masks unusable; reasons: {why}"
        )


@dataclasses.dataclass(frozen=True)
class _Folder:
    """The image and mask files found in a source folder, by id."""

    images: dict[str, list[epath.Path]]  # id -> files, preferred first
    masks: dict[str, list[epath.Path]]


def _read_ids(path: epath.Path) -> list[str]:
    try:
        text = input_files.read_file(path, max_bytes=_MAX_SPLIT_FILE_BYTES, what="Split file").decode("utf-8")
    except (input_files.NotARegularFileError, input_files.FileTooLargeError, UnicodeDecodeError) as e:
        raise errors.UnusableSourceError(f"{e} A split file lists one image id per line.") from None
    ids = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            stem, dot, ext = line.rpartition(".")
            ids.append(stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else line)
    return ids


def _index_folder(root: epath.Path, suffix: str, extensions: tuple[str, ...], what: str) -> dict[str, list[epath.Path]]:
    """id -> image files of ``root`` with that id, in order of ``extensions`` (other entries: one warning)."""
    extensions = tuple(e.lower() for e in extensions)
    by_id: dict[str, list[epath.Path]] = collections.defaultdict(list)
    ignored = []
    for path in sorted(root.iterdir()):
        ext = path.suffix.lower()
        if path.name.startswith(".") or ext not in extensions or not path.stem.endswith(suffix) or path.is_dir():
            ignored.append(path.name)
            continue
        by_id[path.stem[: len(path.stem) - len(suffix)] if suffix else path.stem].append(path)
    if ignored:
        logging.warning("Ignored %d non-%s entries in %s: %s", len(ignored), what, root, _listed(ignored))
    return {k: sorted(v, key=lambda p: extensions.index(p.suffix.lower())) for k, v in by_id.items()}


def _open(path: epath.Path) -> tuple[Image.Image, bool]:
    """The decoded image upright (EXIF orientation applied), and whether that rotated or flipped it."""
    image = image_io.open_image(input_files.read_file(path, what="File"))  # a FIFO is refused, never waited on
    image.load()  # decode now, so that a truncated file fails here and not later
    rotated = image.getexif().get(0x0112, 1) not in (0, 1)
    return (ImageOps.exif_transpose(image) if rotated else image), rotated


def _open_or_record(
    path: epath.Path, unreadable: dict[str, str], what: str, consequence: str
) -> tuple[Image.Image, bool] | None:
    """`_open`, or None if Pillow cannot decode the file: then ``unreadable[str(path)]`` gets the reason and a
    warning says "<what> <path> is unreadable (<error>)<consequence>"."""
    try:
        return _open(path)
    except _READ_ERRORS as e:
        unreadable[str(path)] = f"unreadable: {e}"
        logging.warning("%s %s is unreadable (%s)%s", what, path, e, consequence)
        return None


def _mask_gray(mask: Image.Image) -> tuple[np.ndarray, bool]:
    """Grey levels in [0, 255] (float32 ``[H, W]``) of a mask of any Pillow mode, and whether it is a {0, 1} label
    image (every value 0 or 1, at least one 1): those are scaled to {0, 255}, so that any threshold reads them."""
    if mask.mode.startswith("I;16") or mask.mode == "I":
        values = np.asarray(mask, np.float32)
        scale = 1.0 / 257.0  # 16-bit grey
    elif mask.mode == "F":
        values = np.asarray(mask, np.float32)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    else:
        if mask.mode in ("RGBA", "LA", "PA"):
            mask = mask.convert("RGB")  # the colour, not the transparency, carries the label
        values, scale = np.asarray(mask.convert("L"), np.float32), 1.0
    labels01 = mask.mode != "F" and values.max(initial=0.0) == 1.0 and bool(np.isin(values, (0.0, 1.0)).all())
    return (values * 255.0 if labels01 else values * scale), labels01


def _target_size(width: int, height: int, long_side: int | None) -> tuple[int, int]:
    if long_side is None or max(width, height) <= long_side:
        return width, height
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _kvasir_config(name: str, long_side: int) -> ImageMaskFolderConfig:
    """Kvasir-SEG with its official 880/120 split, stored at ``long_side``."""
    return ImageMaskFolderConfig(
        name=name,
        split_files=_KVASIR_SPLITS,
        long_side=long_side,
        manual_subdir="kvasir_seg",
        description=f"Kvasir-SEG polyps, official 880/120 split (val.txt -> 'test'), long side {long_side}.",
        homepage=KVASIR_SEG_HOMEPAGE,
    )


class Builder(source_record.RecordsSource, tfds.core.GeneratorBasedBuilder):
    """Image/mask folder builder; configs 'kvasir_seg' (long side 512) and 'kvasir_seg_256'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_kvasir_config("kvasir_seg", 512), _kvasir_config("kvasir_seg_256", 256)]
    DEFAULT_BUILDER_CONFIG_NAME = "kvasir_seg"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the source folder (images/, masks/ and any split files) at <manual_dir>/<config name>/ or pass "
        "source_dir= to the builder. " + _KVASIR_HELP
    )

    def __init__(self, *, source_dir: epath.PathLike | None = None, mask_threshold: int | str | None = None,
                 file_format: str | None = None, **kwargs: Any):
        # array_record is the only format readable without TensorFlow (tfds.data_source).
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._source_dir = None if source_dir is None else epath.Path(source_dir)
        self._mask_threshold = self.builder_config.mask_threshold
        if mask_threshold is not None:
            try:
                self._mask_threshold = int(mask_threshold)
            except ValueError:
                self._mask_threshold = 0
            if not 1 <= self._mask_threshold <= 255:
                raise ValueError(f"mask_threshold must be an integer grey level in [1, 255]; got {mask_threshold!r}.")
        # So that pickled builders keep their source and threshold.
        self._original_state.update(source_dir=source_dir, mask_threshold=mask_threshold)
        self.build_summary: dict[str, BuildSummary] = {}

    def source_options(self) -> dict[str, Any]:
        return {"mask_threshold": self._mask_threshold}

    def requested_source(self, manual_dir) -> epath.Path | None:
        manual = epath.Path(manual_dir) if manual_dir else epath.Path(self.data_dir_root) / "downloads" / "manual"
        if self._source_dir is not None:
            return self._source_dir
        try:
            return self._find_source(manual)
        except FileNotFoundError:
            return None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            # Released (1.0.0) without feature descriptions: adding them would change prepared features.json.
            features=features_lib.example_features(["mask"], documented=False),
            # Without it TFDS reports a non-existent tensorflow.org catalog page.
            homepage=self.builder_config.homepage or features_lib.PROJECT_HOMEPAGE,
            # Example i of a split is the i-th id of its split file (or of the sorted image names).
            disable_shuffling=True,
        )

    def _find_source(self, manual: epath.Path | None) -> epath.Path:
        """The source folder: ``source_dir``, else ``manual/<subdir>`` or ``manual`` (None: no manual_dir)."""
        config: ImageMaskFolderConfig = self.builder_config
        subdir = config.manual_subdir or config.name
        layout = (
            f"a folder with {config.images_dir}/<id>.<ext> and {config.masks_dir}/<id>{config.mask_suffix}.<ext>"
            + (f" and the split files {', '.join(config.split_files.values())}" if config.split_files else "")
        )
        if self._source_dir is not None:
            if not (self._source_dir / config.images_dir).is_dir():
                raise FileNotFoundError(
                    f"source_dir={self._source_dir} has no {config.images_dir}/ folder; it must be {layout}."
                )
            return self._source_dir
        candidates = [manual / subdir, manual] if manual is not None else []
        for candidate in candidates:
            if (candidate / config.images_dir).is_dir():
                return candidate
        default_manual = epath.Path(self.data_dir_root) / "downloads" / "manual"
        raise FileNotFoundError(
            f"No source folder for image_mask_folder/{config.name}. Give it as source_dir=<folder> (from the command "
            f"line: --config.dataset.builder_kwargs.source_dir=<folder>), or put the folder at <manual_dir>/{subdir}/ "
            f"(manual_dir is {default_manual} unless --config.dataset.manual_dir=<folder> says otherwise); looked in "
            f"{[str(c) for c in candidates] or 'nothing (manual_dir missing or empty)'}. It must be {layout}."
            + (f" {_KVASIR_HELP}" if config.name.startswith("kvasir_seg") else "")
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: ImageMaskFolderConfig = self.builder_config
        try:
            manual = epath.Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS raises this when manual_dir is missing or empty
            manual = None
        source = self.used_source = self._find_source(manual)
        mask_root = source / config.masks_dir
        masks = {}
        if mask_root.is_dir():
            masks = _index_folder(mask_root, config.mask_suffix, config.mask_extensions, "mask")
        else:
            logging.warning("No %s/ folder in %s: every example gets has_mask=False.", config.masks_dir, source)
        folder = _Folder(images=_index_folder(source / config.images_dir, "", IMAGE_EXTENSIONS, "image"), masks=masks)
        if not folder.images:
            raise errors.UnusableSourceError(
                f"{source / config.images_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); point "
                "source_dir at the folder holding images/ and masks/.")
        orphans = sorted(set(folder.masks) - set(folder.images))
        if orphans:
            logging.warning("%d masks have no image and are ignored: %s", len(orphans), _listed(orphans))
        if not config.split_files:
            return {"train": self._generate_examples(folder, sorted(folder.images), "train")}
        splits, seen = {}, collections.Counter()
        for split, relative in config.split_files.items():
            ids_file = source / relative
            if not ids_file.exists():
                raise FileNotFoundError(f"Split file {ids_file} of split {split!r} is missing (one id per line).")
            ids = _read_ids(ids_file)
            seen.update(ids)
            splits[split] = self._generate_examples(folder, ids, split)
        in_two = sorted(i for i, n in seen.items() if n > 1)
        if in_two:
            logging.warning("%d ids are listed more than once in the split files: %s", len(in_two), _listed(in_two))
        unused = sorted(set(folder.images) - set(seen))
        if unused:
            logging.warning("%d images are in no split file and are not written: %s", len(unused), _listed(unused))
        return splits

    def _mask(
        self, path: epath.Path, image_size: tuple[int, int], size: tuple[int, int], summary: BuildSummary
    ) -> np.ndarray | None:
        """Binary uint8 mask ``[H, W]`` at the stored ``size`` (W, H), or None (recorded) if it is unusable.

        ``image_size`` is the image's original (W, H): a mask of another size is accepted only with the same
        aspect ratio (a lower-resolution export), never transposed or cropped.
        """
        opened = _open_or_record(path, summary.masks_unusable, "Mask", "; its image is kept with has_mask=False.")
        if opened is None:
            return None
        mask, _ = opened
        gray, labels01 = _mask_gray(mask)
        if labels01:
            summary.masks_labels01 += 1
        (w, h), (w0, h0) = mask.size, image_size
        if (w, h) != (w0, h0):
            if abs(w * h0 - h * w0) > 0.01 * w0 * h:
                summary.masks_unusable[str(path)] = f"mismatched: mask {w}x{h} for an image of {w0}x{h0}"
                logging.warning(
                    "Mask %s is %dx%d but its image is %dx%d (another aspect ratio): its image is kept with "
                    "has_mask=False.", path, w, h, w0, h0,
                )
                return None
            summary.masks_rescaled += 1
        if (w, h) != size:
            # Area-average when shrinking, bilinear when enlarging, then threshold: the binary mask of the
            # resized grey levels, which keeps thin structures better than resizing the binary mask.
            resample = Image.Resampling.BOX if w >= size[0] else Image.Resampling.BILINEAR
            gray = np.asarray(Image.fromarray(gray).resize(size, resample), np.float32)
        binary = (gray >= self._mask_threshold).astype(np.uint8)
        if not binary.any() and gray.max(initial=0.0) > 0:
            summary.masks_empty += 1
            logging.warning(
                "Mask %s is empty after thresholding at grey level %d (its values reach %.0f): lower the threshold "
                "with --config.dataset.builder_kwargs.mask_threshold=N (builder keyword mask_threshold).", path,
                self._mask_threshold, gray.max(),
            )
        return binary

    def _generate_examples(self, folder: _Folder, ids: list[str], split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        config: ImageMaskFolderConfig = self.builder_config
        summary = self.build_summary[split] = BuildSummary()
        missing = [i for i in ids if i not in folder.images]
        for i in missing:
            summary.skipped[i] = "missing: listed in the split file but no image"
        if missing:
            logging.warning("Split %r: %d ids have no image: %s", split, len(missing), _listed(missing))
        for example_id in dict.fromkeys(ids):  # ordered, without repeats
            if example_id in folder.images:
                record = self._example(example_id, folder, summary)
                if record is not None:
                    summary.written += 1
                    yield example_id, record
        clean = not (summary.skipped or summary.masks_unusable or summary.masks_missing or summary.masks_empty)
        log = logging.info if clean else logging.warning
        log("image_mask_folder/%s split %r: %s", config.name, split, summary)
        if ids and not summary.written:
            images = self.used_source / config.images_dir if self.used_source is not None else config.images_dir
            raise errors.UnusableSourceError(
                f"None of the {len(dict.fromkeys(ids))} images of split {split!r} in {images} could be read "
                f"({_listed([f'{k}: {v}' for k, v in summary.skipped.items()])}). Check that source_dir points at "
                "the right folder and that its images are intact.")

    def _example(self, example_id: str, folder: _Folder, summary: BuildSummary) -> dict[str, Any] | None:
        config: ImageMaskFolderConfig = self.builder_config
        image_path, *others = folder.images[example_id]
        if others:
            logging.warning("Several images for id %r: using %s, ignoring %s.", example_id, image_path, others)
        opened = _open_or_record(image_path, summary.skipped, "Image", " and is skipped.")
        if opened is None:
            return None
        original, rotated = opened
        size = _target_size(*original.size, config.long_side)
        is_jpeg = image_path.suffix.lower() in _JPEG_EXTENSIONS
        if is_jpeg and original.mode == "RGB" and size == original.size and not rotated:
            image_bytes = input_files.read_file(image_path)  # already what we store: avoid a second JPEG loss
        else:
            image = Image.fromarray(image_io.to_rgb8(original))  # 16-bit photos scaled, not clipped
            if size != image.size:
                # reducing_gap: a cheap integer pre-reduction first; still antialiased, several times faster.
                image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            image_bytes = _encode(image, "JPEG", quality=config.jpeg_quality)
        mask_paths = folder.masks.get(example_id)
        if mask_paths:
            # Prefer the mask with the image's own extension (e.g. x.png beside x.jpg and x.png masks).
            same = [p for p in mask_paths if p.suffix.lower() == image_path.suffix.lower()]
            mask = self._mask((same or mask_paths)[0], original.size, size, summary)
        else:
            mask = None
            summary.masks_missing += 1
            logging.info("No mask for %s: stored with has_mask=False.", image_path)
        return {
            "image": image_bytes,
            "mask": _encode(Image.fromarray(mask if mask is not None else np.zeros(size[::-1], np.uint8)), "PNG"),
            "has_mask": mask is not None,
            "patient_id": example_id,
            "country": config.country,
            "hgb": np.float32(np.nan),
            "gender": "",
            "age": np.float32(np.nan),
            "anemic": np.int32(-1),
        }


# Official 880/120 split: the 120 test images are only ever scored at the end; model selection uses a validation
# holdout carved out of the 880 (~50 steps per epoch at batch 16).
register_dataset(DatasetSpec(
    name="kvasir_seg", builder="image_mask_folder", stored=((256, "kvasir_seg_256"), (512, "kvasir_seg")),
    masks=("mask",), default_targets=("mask",), protocols=("holdout",), test_split="test",
    builder_kwargs=(("source_dir", ""), ("mask_threshold", "")),
    schedule=(("num_epochs", 100), ("warmup_epochs", 2), ("eval_every_epochs", 2), ("checkpoint_every_epochs", 2)),
), aliases=("kvasir",))
