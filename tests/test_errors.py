"""One error path: each failure a user can cause ends with a one-paragraph message and a
documented exit status, without a traceback unless ``--verbose``.

The commands are called in-process (``main.main``/``evaluate.main``/``predict.main`` return their status); stderr is
captured by pytest's ``capfd`` (file-descriptor level, so absl's log lines are seen too).
"""

from __future__ import annotations

import os
import pathlib
import zipfile

import pytest
from _filesystems import read_only_folder
from _tiny_run import workdir  # noqa: F401 -- pytest fixture
from PIL import Image

from anemia_jax import cli, evaluate, main, predict
from anemia_jax.runs import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT}/configs/unetpp.py:data=phantom,test"


def run_main(capfd, *args: str) -> tuple[int, str]:
    status = main.main(["main", *args])
    return status, capfd.readouterr().err


def assert_message(err: str, *fragments: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in err, err[-3000:]


# ------------------------------------------------------------------------------------- negative durations


@pytest.mark.parametrize("key", ["num_train_steps", "num_epochs", "warmup_steps", "eval_every_steps",
                                 "checkpoint_every_epochs", "profile_steps"])
def test_negative_durations_are_rejected(key):
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=phantom,test")
    config[key] = -5
    with pytest.raises(config_lib.ConfigError, match=rf"{key}=-5 must be >= 0"):
        config_lib.validate(config)


def test_negative_steps_argument_stops_the_trainer(capfd, tmp_path):
    status, err = run_main(capfd, f"{TINY},steps=-5", f"--workdir={tmp_path / 'run'}",
                           f"--config.dataset.data_dir={tmp_path / 'tfds'}")
    assert status == cli.EXIT_CONFIG
    assert_message(err, "num_train_steps=-5 must be >= 0")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- messages, not tracebacks


def test_missing_config_file(capfd, tmp_path):
    status, err = run_main(capfd, f"--config={tmp_path}/nope.py", f"--workdir={tmp_path / 'run'}")
    assert status == cli.EXIT_CONFIG
    assert_message(err, "nope.py' does not exist")


@pytest.mark.parametrize("kind", ["not_the_dataset", "empty", "truncated"])
def test_unusable_eyes_archive(capfd, tmp_path, kind):
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as z:
        if kind != "empty":
            z.writestr("holiday/beach.jpg", b"\xff\xd8" + os.urandom(3000))
    if kind == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    status, err = run_main(capfd, f"--config={ROOT}/configs/unetpp.py:data=eyes,test", f"--workdir={tmp_path / 'run'}",
                           f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                           f"--config.dataset.builder_kwargs.archive_path={archive}")
    assert status == cli.EXIT_DATA, err[-3000:]
    assert_message(err, str(archive))
    assert not (tmp_path / "run").exists()


def test_image_folder_without_a_readable_image(capfd, tmp_path):
    source = tmp_path / "folder"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    (source / "images" / "a.png").write_bytes(b"not a png")
    (source / "images" / "b.jpg").write_bytes(b"")
    (source / "splits_official_medico2020").mkdir()
    (source / "splits_official_medico2020" / "train.txt").write_text("a\nb\n")
    (source / "splits_official_medico2020" / "val.txt").write_text("a\n")
    config = f"--config={ROOT}/configs/unetpp.py:data=kvasir,test"
    status, err = run_main(capfd, config, f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 't'}",
                           f"--config.dataset.builder_kwargs.source_dir={source}")
    assert status == cli.EXIT_DATA, err[-3000:]
    assert_message(err, "None of the 2 images", str(source / "images"))


def test_read_only_workdir(capfd, tmp_path):
    with read_only_folder(tmp_path / "run") as run_dir:
        status, err = run_main(capfd, TINY, f"--workdir={run_dir}", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                               "--config.compilation_cache_dir=")
    assert status == cli.EXIT_IO, err[-3000:]
    assert_message(err, str(run_dir))
    assert "Permission denied" in err or "Read-only file system" in err


@pytest.mark.parametrize("command", [evaluate, predict])
def test_out_that_is_a_file_or_read_only(capfd, tmp_path, workdir, command):  # noqa: F811 -- fixture
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (120, 60, 60)).save(photo)
    extra = [str(photo)] if command is predict else ["--no_distances"]
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    status = command.main([command.__name__, f"--workdir={workdir}", f"--out={a_file / 'sub'}", *extra])
    err = capfd.readouterr().err
    assert status == cli.EXIT_IO, err[-3000:]
    assert_message(err, str(a_file))
    with read_only_folder(tmp_path / "locked") as locked:
        status = command.main([command.__name__, f"--workdir={workdir}", f"--out={locked}", *extra])
        err = capfd.readouterr().err
        assert status == cli.EXIT_IO, err[-3000:]
        assert_message(err, str(locked))
        assert list(locked.iterdir()) == []


def test_verbose_prints_the_traceback(capfd, tmp_path):
    status, err = run_main(capfd, f"{TINY},steps=-5", "--verbose", f"--workdir={tmp_path / 'run'}")
    assert status == cli.EXIT_CONFIG and "Traceback" in err and "num_train_steps=-5" in err


def test_unknown_errors_keep_their_traceback():
    command = cli.Command("x", "doc")
    with pytest.raises(ZeroDivisionError):
        command.fail(ZeroDivisionError("a bug"))
