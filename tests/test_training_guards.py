"""What the trainer refuses before it spends a minute compiling, and how it says so: config files that raise or do
not parse (exit 2), a batch larger than the training set, a device out of memory (exit 2, no traceback), and the
``test`` config argument, which never silently replaces a size or batch given beside it.

The trainer is called in-process (``main.main`` returns its status) on the tiny phantom config; compiling is replaced
by a stand-in that fails the test, so that nothing here depends on how long compiling takes."""

from __future__ import annotations

import pathlib

import jax
import pytest

from anemia_jax import cli, main
from anemia_jax.runs import config_lib
from anemia_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT}/configs/unetpp.py:data=phantom,test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def run_main(capfd, *args: str) -> tuple[int, str]:
    status = main.main(["main", *args])
    return status, capfd.readouterr().err


def _never_compile(*args, **kwargs):
    raise AssertionError("the train step was compiled")


# ------------------------------------------------------------------------------------------- config files


@pytest.mark.parametrize("body, fragment", [
    ("def get_config(arg=None):\n    raise RuntimeError('boom')\n", "line 2: RuntimeError: boom"),
    ("def get_config(:\n", "line 1: SyntaxError"),
    ("import no_such_module_anywhere\n", "line 1: ModuleNotFoundError"),
    ("def get_config(arg=None):\n    return {}['missing']\n", "line 2: KeyError"),
])
def test_a_config_file_that_raises_is_a_message(capfd, tmp_path, body, fragment):
    config = tmp_path / "mine.py"
    config.write_text(body)
    status, err = run_main(capfd, f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert status == cli.EXIT_CONFIG, err[-3000:]
    assert "Traceback" not in err and str(config) in err and fragment in err, err[-3000:]


def test_test_keeps_a_size_and_batch_given_beside_it():
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=phantom,test,batch=-8,size=48")
    assert config.batch_size == -8 and tuple(config.image_size) == (48, 48)
    plain = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=phantom,test")
    assert plain.batch_size == 8 and tuple(plain.image_size) == (32, 32)


def test_a_negative_batch_beside_test_is_refused(capfd, tmp_path):
    status, err = run_main(capfd, f"{TINY},batch=-8", f"--workdir={tmp_path / 'run'}")
    assert status == cli.EXIT_CONFIG and "batch_size=-8" in err, err[-3000:]


# ------------------------------------------------------------------------------------ batch and memory


def test_a_batch_larger_than_the_training_set_is_refused_before_compiling(capfd, tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(train, "_compile", _never_compile)
    status, err = run_main(capfd, f"{TINY},batch=100000", f"--workdir={tmp_path / 'run'}",
                           f"--config.dataset.data_dir={data_dir}", "--config.compilation_cache_dir=")
    assert status == cli.EXIT_CONFIG, err[-3000:]
    assert "Traceback" not in err and "batch_size=100000 is larger than the" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_device_out_of_memory_is_a_message(capfd, tmp_path, data_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 76.00GiB.")

    monkeypatch.setattr(train, "_compile", out_of_memory)
    status, err = run_main(capfd, TINY, f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={data_dir}",
                           "--config.compilation_cache_dir=")
    assert status == cli.EXIT_CONFIG, err[-3000:]
    assert "Traceback" not in err and "ran out of memory" in err and "batch_size=8" in err, err[-3000:]
