"""Tests of the image_mask_folder TFDS builder on a generated folder, and of its Kvasir-SEG config on real data."""

import logging
import pathlib
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from anemia_jax.data.datasets import features as features_lib
from anemia_jax.data.datasets.image_mask_folder import image_mask_folder_dataset_builder as imf

# Foreground of every generated image is a red rectangle on a grey-blue background, so its mask is
# computable from the stored pixels: that is how alignment is checked after EXIF rotation and resizing.
_FG, _BG = (220, 30, 30), (60, 90, 150)


def _scene(h: int, w: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image [h, w, 3] with a red box (top, left, bottom, right) and its mask as grey levels (200 / 40)."""
    image = np.empty((h, w, 3), np.uint8)
    image[:] = _BG
    mask = np.full((h, w), 40, np.uint8)
    t, l, b, r = box
    image[t:b, l:r] = _FG
    mask[t:b, l:r] = 200
    return image, mask


def _red(image: np.ndarray) -> np.ndarray:
    return (image[..., 0].astype(int) - image[..., 2].astype(int)) > 60


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    # a: jpg image with a png mask whose levels straddle the threshold (127 -> 0, 128 -> 1).
    img, mask = _scene(30, 40, (5, 8, 20, 30))
    mask[0, :5], mask[25, 2:6] = 127, 128  # both in the background
    Image.fromarray(img).save(root / "images/a.jpg", quality=95)
    Image.fromarray(mask).save(root / "masks/a.png")
    # b: png image, 16-bit png mask.
    img, mask = _scene(24, 24, (2, 2, 12, 20))
    Image.fromarray(img).save(root / "images/b.png")
    Image.fromarray(mask.astype(np.uint16) * 257).save(root / "masks/b.png")
    # c: bmp with bmp mask; d: tif with an RGB tif mask at half resolution (same aspect: rescaled).
    img, mask = _scene(20, 32, (4, 4, 16, 16))
    Image.fromarray(img).save(root / "images/c.bmp")
    Image.fromarray(mask).save(root / "masks/c.bmp")
    img, mask = _scene(40, 48, (10, 10, 30, 40))
    Image.fromarray(img).save(root / "images/d.tif")
    Image.fromarray(np.repeat(mask[::2, ::2, None], 3, axis=2)).save(root / "masks/d.tif")
    # e: a jpg stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view); mask upright.
    img, mask = _scene(36, 28, (3, 5, 14, 22))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(img, k=1)).save(root / "images/e.jpg", quality=95, exif=exif)
    Image.fromarray(mask).save(root / "masks/e.png")
    # f: unreadable; g: no mask; h: mask of another aspect ratio; a mask without image; junk files.
    (root / "images/f.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(_scene(16, 16, (2, 2, 8, 8))[0]).save(root / "images/g.png")
    Image.fromarray(_scene(16, 32, (2, 2, 8, 8))[0]).save(root / "images/h.jpg")
    Image.fromarray(np.zeros((32, 16), np.uint8)).save(root / "masks/h.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks/orphan_mask.png")
    (root / "images/.DS_Store").write_bytes(b"\0")
    (root / "images/notes.txt").write_text("not an image")
    (root / "train.txt").write_text("# training ids\na\nb.png\nd\nmissing_id\n\n")
    (root / "test.txt").write_text("e\nc\n")
    return root


def _build(tmp_path, source_dir, **config_kwargs):
    config = imf.ImageMaskFolderConfig(name="mine", **config_kwargs)
    builder = imf.Builder(config=config, source_dir=source_dir, data_dir=tmp_path)
    builder.download_and_prepare()
    return builder


def _all(builder, split):
    ds = builder.as_data_source(split)
    return [ds[i] for i in range(len(ds))]


def test_single_split_binarisation_alignment_and_summary(tmp_path, source, caplog):
    caplog.set_level(logging.WARNING)
    builder = _build(tmp_path, source)
    assert list(builder.info.splits.keys()) == ["train"]
    examples = _all(builder, "train")
    ids = [ex["patient_id"].decode() for ex in examples]
    assert ids == ["a", "b", "c", "d", "e", "g", "h"]  # sorted stems; f unreadable
    by_id = dict(zip(ids, examples))

    summary = builder.build_summary["train"]
    assert summary.written == 7 and summary.masks_missing == 1 and summary.masks_rescaled == 1
    assert [pathlib.Path(p).name for p in summary.skipped] == ["f.jpg"]
    assert summary.skipped[str(source / "images/f.jpg")].startswith("unreadable")
    assert [pathlib.Path(p).name for p in summary.masks_unusable] == ["h.png"]
    log = caplog.text
    assert "f.jpg" in log and "h.png" in log and "orphan_mask" in log and "7 examples written" in log
    assert "notes.txt" in log  # ignored junk is named too

    for ex in examples:
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[2] == 3
        assert ex["mask"].shape == ex["image"].shape[:2] + (1,) and set(np.unique(ex["mask"])) <= {0, 1}
        assert ex["country"] == b"" and ex["gender"] == b"" and ex["anemic"] == -1
        assert np.isnan(ex["hgb"]) and np.isnan(ex["age"])
    assert {i: bool(ex["has_mask"]) for i, ex in by_id.items()} == dict(
        a=True, b=True, c=True, d=True, e=True, g=False, h=False
    )
    assert not by_id["g"]["mask"].any() and not by_id["h"]["mask"].any()

    # Binarisation at gray >= 128, exact where the image is stored at full size.
    a_mask = by_id["a"]["mask"][..., 0]
    assert a_mask[0, :5].sum() == 0 and a_mask[25, 2:6].all()
    # Every mask, whatever its format, lines up with the red box of its (possibly rotated) image.
    assert by_id["e"]["image"].shape[:2] == (36, 28)  # EXIF orientation applied
    for i in "abcde":
        assert _iou(by_id[i]["mask"][..., 0].astype(bool), _red(by_id[i]["image"])) > 0.9, i


def test_split_files_and_stored_resolution(tmp_path, source, caplog):
    caplog.set_level(logging.WARNING)
    splits = {"train": "train.txt", "test": "test.txt"}
    builder = _build(tmp_path, source, split_files=splits, long_side=16, country="X")
    train, test = _all(builder, "train"), _all(builder, "test")
    assert [ex["patient_id"] for ex in train] == [b"a", b"b", b"d"]  # split-file order; extension stripped
    assert [ex["patient_id"] for ex in test] == [b"e", b"c"]
    assert "missing_id" in builder.build_summary["train"].skipped
    assert "missing_id" in caplog.text and "in no split file" in caplog.text
    for ex in train + test:
        assert max(ex["image"].shape[:2]) == 16 and ex["country"] == b"X"
        assert ex["mask"].shape[:2] == ex["image"].shape[:2]
        assert _iou(ex["mask"][..., 0].astype(bool), _red(ex["image"])) > 0.7


def test_mask_suffix_and_folder_names(tmp_path):
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    expected = {}
    for name, box in (("p1", (1, 1, 6, 6)), ("p2", (4, 2, 12, 9))):
        image, mask = _scene(14, 12, box)
        Image.fromarray(image).save(root / "img" / f"{name}.png")
        Image.fromarray(mask).save(root / "gt" / f"{name}_mask.png")
        expected[name] = (mask >= 128).astype(np.uint8)
    builder = _build(tmp_path / "data", root, images_dir="img", masks_dir="gt", mask_suffix="_mask")
    examples = _all(builder, "train")
    assert [ex["patient_id"] for ex in examples] == [b"p1", b"p2"] and all(ex["has_mask"] for ex in examples)
    for ex in examples:
        np.testing.assert_array_equal(ex["mask"][..., 0], expected[ex["patient_id"].decode()])


def test_missing_source_says_where_to_put_it(tmp_path):
    builder = imf.Builder(config="kvasir_seg_256", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="source_dir") as err:
        builder.download_and_prepare()
    message = str(err.value)
    assert "manual" in message and "kvasir_seg" in message and "datasets.simula.no" in message
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        imf.Builder(config="kvasir_seg", source_dir=tmp_path, data_dir=tmp_path).download_and_prepare()


def test_builder_pickles_with_its_source(tmp_path, source):
    builder = imf.Builder(config="kvasir_seg_256", source_dir=source, data_dir=tmp_path)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone._source_dir == builder._source_dir and clone.builder_config.name == "kvasir_seg_256"


def test_info_homepage(tmp_path):
    # TFDS's default would be a non-existent tensorflow.org catalog page.
    for config in ("kvasir_seg", "kvasir_seg_256"):
        assert imf.Builder(config=config, data_dir=tmp_path).info.homepage == "https://datasets.simula.no/kvasir-seg/"
    mine = imf.ImageMaskFolderConfig(name="mine")
    assert imf.Builder(config=mine, data_dir=tmp_path).info.homepage == features_lib.PROJECT_HOMEPAGE
    theirs = imf.ImageMaskFolderConfig(name="theirs", homepage="https://example.org/polyps")
    assert imf.Builder(config=theirs, data_dir=tmp_path).info.homepage == "https://example.org/polyps"


def test_config_validation():
    with pytest.raises(ValueError, match="mask_threshold"):
        imf.ImageMaskFolderConfig(name="bad", mask_threshold=0)
    with pytest.raises(ValueError, match="mask extensions"):
        imf.ImageMaskFolderConfig(name="bad", mask_extensions=(".gif",))


def test_kvasir_seg_256_on_real_ids(tmp_path, shared_dir):
    """The real 'kvasir_seg_256' config on the first ids of each official split (links, not copies)."""
    kvasir = shared_dir / "kvasir_seg"
    if not kvasir.is_dir():
        pytest.skip(f"{kvasir} is absent")
    splits = kvasir / "splits_official_medico2020"
    train_ids, val_ids = imf._read_ids(splits / "train.txt"), imf._read_ids(splits / "val.txt")
    assert (len(train_ids), len(val_ids)) == (880, 120) and not set(train_ids) & set(val_ids)
    source = tmp_path / "kvasir_subset"
    (source / "splits_official_medico2020").mkdir(parents=True)
    for sub in ("images", "masks"):
        (source / sub).mkdir()
    chosen = {"train.txt": train_ids[:5], "val.txt": val_ids[:3]}
    for name, ids in chosen.items():
        (source / "splits_official_medico2020" / name).write_text("\n".join(ids) + "\n")
        for i in ids:
            for sub in ("images", "masks"):
                (source / sub / f"{i}.jpg").symlink_to(kvasir / sub / f"{i}.jpg")

    builder = imf.Builder(config="kvasir_seg_256", source_dir=source, data_dir=tmp_path / "data")
    builder.download_and_prepare()
    for split, ids in (("train", chosen["train.txt"]), ("test", chosen["val.txt"])):
        examples = _all(builder, split)
        assert [ex["patient_id"].decode() for ex in examples] == ids
        for i, ex in zip(ids, examples):
            assert max(ex["image"].shape[:2]) == 256 and ex["has_mask"]
            original = Image.open(kvasir / "masks" / f"{i}.jpg").convert("L")
            height, width = ex["image"].shape[:2]
            assert original.size[0] / original.size[1] == pytest.approx(width / height, rel=0.02)
            expected = np.asarray(original.resize(ex["image"].shape[1::-1], Image.Resampling.BOX)) >= 128
            assert _iou(ex["mask"][..., 0].astype(bool), expected) > 0.97
    assert builder.build_summary["train"].written == 5 and not builder.build_summary["test"].skipped
    assert "tensorflow" not in sys.modules
