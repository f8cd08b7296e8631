"""What dataset preparation does with a source folder a user got wrong: FIFOs and symlinks that lead nowhere are
skipped (never waited on, never a traceback), sources without usable masks stop before training (exit 3), the
messages advise options that name files, and a failed preparation leaves ``data_dir`` as it was.

Sources are tiny synthetic folders and zips made here (as in test_data_reliability.py)."""

from __future__ import annotations

import os
import pathlib
import shutil

import fake_eyes_archive as fake
import pytest
from _hostile_files import watched_fifo
from test_data_reliability import image_folder, kvasir_config

from anemia_jax import cli, main
from anemia_jax.data import loading
from anemia_jax.data.datasets.image_mask_folder.image_mask_folder_dataset_builder import Builder as FolderBuilder
from anemia_jax.runs import config_lib
from anemia_jax.utils import errors, parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(capfd, *args: str) -> tuple[int, str]:
    status = main.main(["main", *args])
    return status, capfd.readouterr().err


# ------------------------------------------------------------------------------------ files that are not files


def test_a_fifo_among_the_images_is_skipped_not_waited_on(tmp_path):
    source = image_folder(tmp_path / "src", 80)
    (source / "splits_official_medico2020" / "train.txt").write_text("a\nb\nd\n")
    with watched_fifo(source / "images" / "d.png") as fifo:
        builder = FolderBuilder(config="kvasir_seg_256", source_dir=str(source), data_dir=str(tmp_path / "tfds"))
        builder.download_and_prepare()
    assert not fifo.opened_by_reader
    assert "named pipe (FIFO)" in builder.build_summary["train"].skipped[str(source / "images" / "d.png")]
    assert len(builder.as_data_source("train")) == 2


def test_a_fifo_as_split_file_is_a_message(tmp_path):
    source = image_folder(tmp_path / "src", 80)
    (source / "splits_official_medico2020" / "val.txt").unlink()
    with watched_fifo(source / "splits_official_medico2020" / "val.txt") as fifo:
        with pytest.raises(errors.DataError, match="named pipe"):
            loading.prepare_builder(kvasir_config(source, tmp_path / "tfds"))
    assert not fifo.opened_by_reader


def test_dangling_symlinks_and_symlink_loops_are_skipped_images(tmp_path):
    source = image_folder(tmp_path / "src", 80)
    (source / "splits_official_medico2020" / "train.txt").write_text("a\nb\nd\ne\n")
    (source / "images" / "d.png").symlink_to(tmp_path / "nowhere.png")
    (source / "images" / "e.png").symlink_to(source / "images" / "e.png")  # a loop: ELOOP on open
    builder = loading.prepare_builder(kvasir_config(source, tmp_path / "tfds"))
    skipped = builder.build_summary["train"].skipped
    assert set(skipped) == {str(source / "images" / "d.png"), str(source / "images" / "e.png")}, skipped
    assert "symlink loop" in skipped[str(source / "images" / "e.png")]
    assert len(builder.as_data_source("train")) == 2


def test_unreadable_image_messages_describe_the_file_not_a_buffer(tmp_path):
    source = image_folder(tmp_path / "src", 80)
    (source / "images" / "b.png").write_bytes(b"not a png")
    builder = FolderBuilder(config="kvasir_seg_256", source_dir=str(source), data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    reason = builder.build_summary["train"].skipped[str(source / "images" / "b.png")]
    assert "BytesIO" not in reason and "b'not a pn'" in reason, reason


# ----------------------------------------------------------------------------------------- no usable labels


def test_a_folder_without_masks_stops_before_training(capfd, tmp_path):
    source = image_folder(tmp_path / "src", 80)
    shutil.rmtree(source / "masks")
    for k in range(12):  # enough patients for the validation holdout
        shutil.copy(source / "images" / "a.png", source / "images" / f"x{k}.png")
    (source / "splits_official_medico2020" / "train.txt").write_text("\n".join(["a", "b"] + [f"x{k}" for k in range(12)]))
    status, err = run_main(capfd, f"--config={ROOT}/configs/unetpp.py:data=kvasir,test",
                           f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                           f"--config.dataset.builder_kwargs.source_dir={source}", "--config.compilation_cache_dir=")
    assert status == cli.EXIT_DATA, err[-3000:]
    assert "Traceback" not in err and "No usable labels" in err and "'mask'" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


def test_an_archive_whose_masks_are_all_unusable_stops_before_training(tmp_path):
    patients = [fake.Patient("Italy", n, f"{n}.jpg", {"palpebral": (f"{n:03d}_palpebral.png", "garbage")})
                for n in range(1, 11)]
    source = fake.write_archive(tmp_path / "eyes.zip", patients, {})
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=eyes,test")
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.dataset.builder_kwargs.archive_path = str(source)
    with pytest.raises(errors.DataError, match="No usable labels.*none of the .* training examples has a usable "
                                               "'palpebral' mask"):
        loading.load_data(config, parallel.make_mesh())


# ------------------------------------------------------------------------------ messages, what is left behind


def test_kvasir_without_a_source_names_the_path_options_only(capfd, tmp_path):
    status, err = run_main(capfd, f"--config={ROOT}/configs/unetpp.py:data=kvasir,test",
                           f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'tfds'}")
    assert status == cli.EXIT_DATA, err[-3000:]
    assert "--config.dataset.builder_kwargs.source_dir" in err and "--config.dataset.manual_dir" in err
    assert "mask_threshold=PATH" not in err and "DownloadConfig(" not in err, err[-3000:]


def test_missing_kaggle_data_names_the_path_options_and_leaves_data_dir_as_it_was(capfd, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "kagglehub", None)  # no download attempt, whatever is installed
    data_dir = tmp_path / "tfds"
    status, err = run_main(capfd, f"--config={ROOT}/configs/unetpp.py:data=eyes,test",
                           f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={data_dir}")
    assert status == cli.EXIT_DATA, err[-3000:]
    assert "--config.dataset.builder_kwargs.archive_path=PATH" in err and "max_file_mb=PATH" not in err, err[-3000:]
    assert not data_dir.exists(), sorted(str(p) for p in data_dir.rglob("*"))
    # A data_dir that existed keeps what it held, and gains nothing.
    (data_dir / "other").mkdir(parents=True)
    (data_dir / "other" / "keep.txt").write_text("x")
    status, _ = run_main(capfd, f"--config={ROOT}/configs/unetpp.py:data=eyes,test",
                         f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={data_dir}")
    assert status == cli.EXIT_DATA
    assert sorted(os.listdir(data_dir)) == ["other"]
