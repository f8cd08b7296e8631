"""What `predict` does with the files a user hands it (on the tiny UNet++ run of _tiny_run.py): an output never
replaces an input photo, only regular files are read (a FIFO is never waited on, a device never read), photos are
capped in bytes and pixels before decoding, inputs without a readable photo are a data error (exit 3), a full disk's
message says only what is true, and file names never reach the CSV as spreadsheet formulas."""

from __future__ import annotations

import csv
import errno
import os

import numpy as np
import PIL.Image
import pytest
from _hostile_files import png_bomb, watched_fifo
from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures

from anemia_jax import cli, predict
from anemia_jax.inference import segmenter
from anemia_jax.screening import photo_folder, photo_report
from anemia_jax.utils import errors, image_io, input_files


def _save(path, h=30, w=40, seed=0):
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ never overwrite


def test_outputs_never_replace_an_input_photo(best_run, tmp_path, warnings_log):
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(folder / "a.jpg", 30, 40, seed=1)
    _save(folder / "a_overlay.png", 24, 36, seed=2)  # a real photo whose name is a.jpg's overlay's
    before = (folder / "a_overlay.png").read_bytes()
    report = photo_folder.predict_photos(segmenter.Segmenter([best_run]), [folder], folder)
    assert (folder / "a_overlay.png").read_bytes() == before
    assert report.written == {str(folder / "a.jpg"): "a_2", str(folder / "a_overlay.png"): "a_overlay"}
    rows = {r["file"]: r for r in _rows(folder / "predictions.csv")}
    # The photo a_overlay.png was scored as itself (its own size), not as a.jpg's overlay.
    assert (rows[str(folder / "a_overlay.png")]["width"], rows[str(folder / "a_overlay.png")]["height"]) == ("36", "24")
    assert PIL.Image.open(folder / "a_2_overlay.png").size == (40, 30)
    assert any("never replaces an input" in line and "a_overlay.png" in line for line in warnings_log)


def test_out_that_would_replace_an_input_table_is_refused(workdir, tmp_path, capfd):  # noqa: F811 -- fixture
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(folder / "a.png")
    (folder / "predictions.csv").write_text("my own notes\n")
    status = predict.main(["predict", f"--workdir={workdir}", str(folder / "a.png"), str(folder / "predictions.csv"),
                           f"--out={folder}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CONFIG and "Traceback" not in err and "would replace the input" in err, err[-2000:]
    assert (folder / "predictions.csv").read_text() == "my own notes\n"


# --------------------------------------------------------------------------------- regular files, limits


def test_a_fifo_in_a_photo_folder_is_reported_not_waited_on(best_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(folder / "good.png")
    with watched_fifo(folder / "pipe.jpg") as fifo:
        report = photo_folder.predict_photos(segmenter.Segmenter([best_run]), [folder], tmp_path / "out")
    assert not fifo.opened_by_reader
    assert list(report.written) == [str(folder / "good.png")]
    assert "named pipe (FIFO)" in report.failed[str(folder / "pipe.jpg")]


def test_a_device_named_as_a_photo_is_never_read(workdir, tmp_path, capfd):  # noqa: F811 -- fixture
    with pytest.raises(input_files.NotARegularFileError, match="character device"):
        image_io.load_photo("/dev/zero", max_bytes=1000)
    status = predict.main(["predict", f"--workdir={workdir}", "/dev/zero", f"--out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_DATA and "Traceback" not in err and "/dev/zero" in err, err[-2000:]


def test_file_size_cap(tmp_path):
    photo = _save(tmp_path / "a.png")
    with pytest.raises(input_files.FileTooLargeError, match="the limit is"):
        image_io.load_photo(photo, max_bytes=100)
    assert image_io.load_photo(photo, max_bytes=photo.stat().st_size).shape == (30, 40, 3)


def test_pixel_cap_refuses_a_bomb_before_decoding(workdir, tmp_path, capfd, monkeypatch):  # noqa: F811 -- fixture
    folder = tmp_path / "photos"
    folder.mkdir()
    png_bomb(folder / "bomb.png", 12000)  # 144 megapixels in ~20 KB
    assert (folder / "bomb.png").stat().st_size < 100_000
    _save(folder / "good.png")
    converted = image_io.to_rgb8

    def to_rgb8(image):
        assert image.size[0] * image.size[1] <= 50e6, "decoded a photo over the pixel cap"
        return converted(image)

    monkeypatch.setattr(image_io, "to_rgb8", to_rgb8)
    status = predict.main(["predict", f"--workdir={workdir}", str(folder), f"--out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_FAILED, err[-2000:]
    assert "12000 x 12000" in err and "limit is 50 megapixels" in err
    assert (tmp_path / "out" / "good_overlay.png").exists() and not (tmp_path / "out" / "bomb_overlay.png").exists()
    # The cap is a flag.
    status = predict.main(["predict", f"--workdir={workdir}", str(folder / "good.png"), "--max_megapixels=0.001",
                           f"--out={tmp_path / 'small'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_DATA and "limit is 0.001 megapixels" in err, err[-2000:]


# ------------------------------------------------------------------------------------ nothing to predict


def test_a_folder_without_photos_is_a_data_error(workdir, tmp_path, capfd):  # noqa: F811 -- fixture
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    status = predict.main(["predict", f"--workdir={workdir}", str(empty), f"--out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_DATA and "Traceback" not in err and str(empty) in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_only_unreadable_photos_is_a_data_error_naming_each_file(workdir, tmp_path, capfd):  # noqa: F811
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    status = predict.main(["predict", f"--workdir={workdir}", str(tmp_path / "broken.jpg"),
                           f"--out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_DATA and "Traceback" not in err, err[-2000:]
    assert "broken.jpg" in err and "BytesIO" not in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


# ---------------------------------------------------------------------------------------- full disk, CSV


def test_full_disk_before_the_first_photo_claims_no_csv(workdir, tmp_path, capfd, monkeypatch):  # noqa: F811
    _save(tmp_path / "a.png")

    def full(image, path, **kwargs):
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise errors.OutputError(f"Could not write {path}: No space left on device.") from error

    monkeypatch.setattr(photo_folder, "_save_png", full)
    status = predict.main(["predict", f"--workdir={workdir}", str(tmp_path / "a.png"), f"--out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_IO and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert "listed in" not in err and "no predictions.csv" in err


def test_file_names_never_reach_the_csv_as_formulas(best_run, tmp_path):
    name = '=HYPERLINK("evil.invalid","x")'
    _save(tmp_path / f"{name}.png")
    _save(tmp_path / "-5.png", seed=3)
    photo_folder.predict_photos(segmenter.Segmenter([best_run]), [tmp_path], tmp_path / "out")
    rows = {r["stem"]: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert set(rows) == {f"'{name}", "-5"}  # a number stays a number
    assert all(not value.startswith(("=", "+", "@")) for row in rows.values() for value in row.values())


def test_a_fifo_as_sex_csv_is_never_waited_on(tmp_path):
    photo = _save(tmp_path / "a.png")
    with watched_fifo(tmp_path / photo_report.SEX_CSV) as fifo:  # beside the photos: not a table, ignored
        assert photo_report.photo_sexes([photo]) == ["unknown"]
        with pytest.raises(ValueError, match="named pipe"):  # named explicitly: a message
            photo_report.photo_sexes([photo], sex_csv=fifo.path)
    assert not fifo.opened_by_reader


def test_fifos_named_as_a_run_or_thresholds_are_never_waited_on(workdir, tmp_path, capfd):  # noqa: F811
    photo = _save(tmp_path / "a.png")
    (tmp_path / "run").mkdir()
    with watched_fifo(tmp_path / "run" / "config.json") as config, watched_fifo(tmp_path / "q.json") as thresholds:
        status = predict.main(["predict", f"--workdir={tmp_path / 'run'}", str(photo), f"--out={tmp_path / 'o1'}"])
        err = capfd.readouterr().err
        assert status == cli.EXIT_CONFIG and "not a training run directory" in err, err[-2000:]
        status = predict.main(["predict", f"--workdir={workdir}", str(photo), f"--quality={thresholds.path}",
                               f"--out={tmp_path / 'o2'}"])
        err = capfd.readouterr().err
        assert status == cli.EXIT_CONFIG and "No quality thresholds" in err, err[-2000:]
    assert not config.opened_by_reader and not thresholds.opened_by_reader
