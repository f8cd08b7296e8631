"""Outputs: atomic files on a full disk, the overlay outline whose cost does not grow
with its width, and 16-bit photos scaled rather than clipped.

The full disk is a small tmpfs (`_filesystems.full_filesystem`; skipped where mounting is not allowed) or, for the
writer itself, a file object whose writes fail with ENOSPC. The overlay's speed on a 12-megapixel photo is measured by
``experiments/predict_timing.py``, not here: these tests check what it computes.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib

import numpy as np
import PIL.Image
import pytest
from _filesystems import full_filesystem
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import cli, predict
from anemia_jax.data.datasets.image_mask_folder.image_mask_folder_dataset_builder import Builder as FolderBuilder
from anemia_jax.evaluation import eval_report
from anemia_jax.utils import atomic, errors, image_io
from experiments import predict_timing

# ------------------------------------------------------------------------------------------------ atomic outputs


class _FullDisk(io.FileIO):
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written, as on a full disk."""

    budget = 100

    def write(self, data):
        if self.tell() + len(data) > self.budget:
            super().write(bytes(data)[: max(self.budget - self.tell(), 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_atomic_write_on_a_full_disk_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "open", lambda path, mode, **kw: _FullDisk(path, "w"), raising=False)
    with pytest.raises(errors.OutputError) as info:
        atomic.write_bytes(tmp_path / "table.csv", b"x" * 1000)
    assert "No space left on device" in str(info.value) and str(tmp_path / "table.csv") in str(info.value)
    assert cli.exit_status(info.value) == cli.EXIT_IO
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_atomic_write_replaces_whole_or_keeps_the_old(tmp_path, monkeypatch):
    atomic.write_text(tmp_path / "summary.json", "old\n")
    monkeypatch.setattr(atomic, "open", lambda path, mode, **kw: _FullDisk(path, "w"), raising=False)
    with pytest.raises(errors.OutputError):
        atomic.write_text(tmp_path / "summary.json", "new " * 100)
    assert (tmp_path / "summary.json").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _noise_photo(path: pathlib.Path, h: int, w: int, seed: int) -> None:
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)


def test_predict_on_a_full_filesystem(workdir, tmp_path, capfd):  # noqa: F811 -- fixture
    photos = tmp_path / "photos"
    photos.mkdir()
    _noise_photo(photos / "a_small.png", 30, 40, 0)
    _noise_photo(photos / "b_large.png", 400, 500, 1)  # its overlay alone outgrows the filesystem
    with full_filesystem(tmp_path / "out", size="256k") as out:
        status = predict.main(["predict", f"--workdir={workdir}", str(photos), f"--out={out}"])
        err = capfd.readouterr().err
        names = sorted(p.name for p in out.iterdir())
        for name in names:
            assert not name.startswith("."), names  # no temporary file left behind
            if name.endswith(".png"):
                with PIL.Image.open(out / name) as im:
                    im.load()  # complete: a truncated PNG fails to decode
        csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert status == cli.EXIT_IO, err[-3000:]
    assert "Traceback" not in err and "No space left on device" in err and "1 photo(s) done" in err
    assert "a_small_overlay.png" in names and "b_large_overlay.png" not in names
    assert len(csv_lines) == 2 and "a_small" in csv_lines[1]


def test_evaluation_outputs_on_a_full_filesystem(tmp_path):
    per_image = {"index": np.arange(5000), "weights": np.ones((5000, 1)), "dice": np.random.rand(5000, 1)}
    summary = {"targets": {}}
    with full_filesystem(tmp_path / "out", size="32k") as out:
        with pytest.raises(errors.OutputError, match="No space left on device"):
            eval_report.write_outputs(out, per_image, summary, ["mask"])
        assert [p.name for p in out.iterdir()] == []


# ----------------------------------------------------------------------------------------------- overlay


@pytest.mark.parametrize("outline", [0, 1, 3, 7])
def test_overlay_matches_the_reference_outline(outline):
    rng = np.random.default_rng(outline)
    image = rng.integers(0, 256, (90, 120, 3), np.uint8)
    yy, xx = np.mgrid[0:90, 0:120]
    inner = ((xx - 60) / 30.0) ** 2 + ((yy - 45) / 15.0) ** 2 <= 1
    outer = inner | (((xx - 70) / 45.0) ** 2 + ((yy - 40) / 25.0) ** 2 <= 1)
    edge = (xx < 20) & (yy > 60)  # touches the image border: the border is replicated, not outlined
    masks = np.stack([inner, outer, edge], axis=-1)
    np.testing.assert_array_equal(image_io.overlay(image, masks, outline=outline),
                                  predict_timing.old_overlay(image, masks, outline))
    np.testing.assert_array_equal(image_io.overlay(image, np.zeros_like(masks), outline=outline), image)


def test_overlay_work_is_confined_to_the_masks(monkeypatch):
    """The outline is computed on the masks' bounding box (grown by the width), with a filter whose cost does not
    depend on the width: what made a 12 MP overlay take 18 s (and 48 MP five minutes) is gone."""
    seen = []
    real = image_io.ndimage.minimum_filter

    def spy(mask, size, mode):
        seen.append((mask.shape, size))
        return real(mask, size=size, mode=mode)

    monkeypatch.setattr(image_io.ndimage, "minimum_filter", spy)
    masks = np.zeros((3000, 4000, 1), bool)
    masks[1000:1400, 1500:2300] = True
    image_io.overlay(np.zeros((3000, 4000, 3), np.uint8), masks, outline=13)
    assert seen == [((400 + 26, 800 + 26), 27)]


# ----------------------------------------------------------------------------------------------- 16-bit photos


def _grey16_png(path: pathlib.Path, h: int = 24, w: int = 32) -> np.ndarray:
    values = np.tile(np.linspace(0, 65535, w).astype(np.uint16), (h, 1))
    PIL.Image.fromarray(values).save(path)
    return np.round(values / 65535 * 255).astype(np.uint8)


def test_sixteen_bit_photos_are_scaled_not_clipped(tmp_path, workdir):  # noqa: F811 -- fixture
    expected = _grey16_png(tmp_path / "grey16.png")
    assert PIL.Image.open(tmp_path / "grey16.png").mode.startswith("I")
    photo = image_io.load_photo(tmp_path / "grey16.png")
    np.testing.assert_array_equal(photo[..., 0], expected)
    assert 0 < photo.mean() < 255 and len(np.unique(photo)) > 20
    # predict reads it the same way: outside the masks the overlay shows the photo's own (scaled) grey levels.
    assert predict.main(["predict", f"--workdir={workdir}", str(tmp_path / "grey16.png"),
                         f"--out={tmp_path / 'out'}"]) == cli.EXIT_OK
    overlay = np.asarray(PIL.Image.open(tmp_path / "out" / "grey16_overlay.png"))
    masks = np.stack([np.asarray(PIL.Image.open(p)) > 0 for p in sorted((tmp_path / "out").glob("grey16_[!ou]*.png"))],
                     axis=-1)
    outside = ~masks.any(axis=-1)
    if outside.any():
        np.testing.assert_array_equal(overlay[outside][:, 0], np.broadcast_to(expected, outside.shape)[outside])


def test_sixteen_bit_training_images_are_scaled_not_clipped(tmp_path):
    source = tmp_path / "src"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    expected = _grey16_png(source / "images" / "a.png")
    PIL.Image.fromarray(np.zeros((24, 32), np.uint8)).save(source / "masks" / "a.png")
    builder = FolderBuilder(config="kvasir_seg_256", source_dir=str(source), data_dir=str(tmp_path / "tfds"))
    (source / "splits_official_medico2020").mkdir()
    (source / "splits_official_medico2020" / "train.txt").write_text("a\n")
    (source / "splits_official_medico2020" / "val.txt").write_text("a\n")
    builder.download_and_prepare()
    stored = builder.as_data_source("train")[0]["image"]
    assert np.abs(stored[..., 0].astype(int) - expected).max() <= 3  # JPEG-stored
