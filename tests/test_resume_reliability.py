"""The trainer after kills, damage, model changes, a full disk and a second trainer.

One module run (fixture `resumed_run`): the tiny phantom config (8 steps, checkpoints every 4, one evaluation at the
end) is stopped as its first checkpoint save starts (as a kill there would stop it: nothing saved, metrics lines
written), then rerun to completion. The tests check its metrics, then copy it to damage its latest checkpoint, to
resume it with another model, and to start a second trainer on it. The lock's own cases (a dead holder's lock, leases
on object storage) use no trainer.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import sys
import time

import _children
import pytest
from _fake_gcs import fake_gcs  # noqa: F401 -- pytest fixture
from _filesystems import full_filesystem

from anemia_jax import cli, main
from anemia_jax.data import loading
from anemia_jax.runs import checkpointing, config_lib
from anemia_jax.training import reporting, train, workdir_lock
from anemia_jax.utils import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/unetpp.py:data=phantom,test,steps=8"
OVERRIDES = {"checkpoint_every_steps": 4, "eval_every_steps": 8, "max_panels": 1}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return {"data_dir": str(tmp_path_factory.mktemp("tfds")), "cache": str(tmp_path_factory.mktemp("jax_cache"))}


def make_config(shared, **changes):
    config = config_lib.load_config_file(f"{ROOT}/{CONFIG}")
    config.dataset.data_dir = shared["data_dir"]
    config.compilation_cache_dir = shared["cache"]
    config.update_from_flattened_dict({**OVERRIDES, **changes})
    return config


def main_args(shared, workdir, *extra):
    return ["main", f"--config={ROOT}/{CONFIG}", f"--workdir={workdir}",
            f"--config.dataset.data_dir={shared['data_dir']}", f"--config.compilation_cache_dir={shared['cache']}",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *extra]


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def assert_unique_and_ascending(workdir):
    records = read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
    for split in {r["split"] for r in records}:
        steps = [r["step"] for r in records if r["split"] == split]
        assert steps == sorted(set(steps)), (split, steps)
    return records




@pytest.fixture(scope="module")
def resumed_run(shared, tmp_path_factory):
    """``(workdir, metrics lines left by the stopped attempt, summary of the rerun)``."""
    workdir = tmp_path_factory.mktemp("run")

    def killed(self, step, *args, **kwargs):
        raise KeyboardInterrupt(f"killed as checkpoint {step} starts")

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(checkpointing.CheckpointManager, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(make_config(shared), workdir)
    before = read_jsonl(workdir / "metrics.jsonl")
    summary = train.train_and_evaluate(make_config(shared), workdir)
    return workdir, before, summary


def copy_of(run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run, tmp_path / "run"))


# ----------------------------------------------------------------------------------- metrics after a kill


def test_metrics_unique_after_a_kill_before_the_first_checkpoint(resumed_run, shared):
    workdir, before, summary = resumed_run
    assert [r["step"] for r in before if r["split"] == "train"] == [2, 4]
    assert summary["resumed_from_step"] is None and summary["step"] == 8
    records = assert_unique_and_ascending(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["split"] == "val"] == [8]
    assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end
    recorded = json.loads((workdir / "config.json").read_text())["data_source"]  # the data actually used
    assert recorded["builder"] == "conjunctiva_phantom" and recorded["prepared_dir"].startswith(shared["data_dir"])


# ------------------------------------------------------------------------------------ damaged checkpoints


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(resumed_run, shared, tmp_path, warnings_log):
    run = copy_of(resumed_run[0], tmp_path)
    state_files = [p for p in (run / "checkpoints/8/state").rglob("*") if p.is_file()]
    largest = max(state_files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    summary = train.train_and_evaluate(make_config(shared), run)
    assert summary["resumed_from_step"] == 4 and summary["step"] == 8 and summary["status"] == "completed"
    assert any("Checkpoint step 8" in w and "damaged" in w for w in warnings_log), warnings_log
    assert (run / "checkpoints_damaged" / "8").is_dir()
    with checkpointing.CheckpointManager(run / "checkpoints", max_to_keep=2, read_only=True) as manager:
        assert manager.all_steps() == [4, 8] and manager.verify(8).status == "intact"
    assert_unique_and_ascending(run)


# ---------------------------------------------------------------------------------- a rerun's other config


def test_a_rerun_with_another_config_keeps_the_original(resumed_run, shared, tmp_path, warnings_log):
    run = copy_of(resumed_run[0], tmp_path)
    original = json.loads((run / "config.json").read_text())
    summary = train.train_and_evaluate(make_config(shared, **{"optimizer.learning_rate": 0.5, "seed": 7}), run)
    assert summary["status"] == "completed"
    now = json.loads((run / "config.json").read_text())
    assert (now["optimizer"]["learning_rate"], now["seed"]) == (0.5, 7)
    kept = json.loads((run / "config_history" / "config_1.json").read_text())
    assert kept == original and kept["optimizer"]["learning_rate"] != 0.5
    assert any("optimizer.learning_rate" in w and "config_history" in w for w in warnings_log), warnings_log
    # The same config again keeps no copy.
    assert reporting.Reporter(run, is_main=True, tensorboard=False).write_config(now) is None
    assert sorted(p.name for p in (run / "config_history").iterdir()) == ["config_1.json"]


# ------------------------------------------------------------------------------- messages, not tracebacks


def test_resuming_with_another_model_is_a_message(resumed_run, shared, tmp_path, capfd):
    run = copy_of(resumed_run[0], tmp_path)
    status = main.main(main_args(shared, run, "--config.model.features=8"))
    err = capfd.readouterr().err
    assert status == cli.EXIT_CHECKPOINT, err[-3000:]
    assert "Traceback" not in err and "written by a different model configuration" in err
    assert "model.features: 4 -> 8" in err


def test_full_disk_is_one_message(shared, tmp_path, capfd):
    with full_filesystem(tmp_path / "full", size="200k") as place:
        status = main.main(main_args(shared, place / "run"))
    err = capfd.readouterr().err
    assert status == cli.EXIT_IO, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("main: ")]
    assert len(message) == 1 and "No space left on device" in message[0] and str(place / "run") in message[0]


# -------------------------------------------------------------------------------- one trainer per workdir


def test_second_trainer_stops_at_once_naming_the_holder(resumed_run, shared, capfd, monkeypatch):
    workdir = resumed_run[0]
    listing = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*"))

    def never(*args, **kwargs):
        raise AssertionError("the second trainer loaded data")

    monkeypatch.setattr(loading, "load_data", never)  # it stops before loading data or compiling anything
    with workdir_lock.WorkdirLock(workdir):
        status = main.main(main_args(shared, workdir))
    err = capfd.readouterr().err
    assert status == cli.EXIT_BUSY, err[-3000:]
    assert f"process {os.getpid()} on host {socket.gethostname()}" in err and "Traceback" not in err
    assert sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == listing


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = _children.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True, budget_s=120)
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere"}))
    with workdir_lock.WorkdirLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(errors.WorkdirBusyError, match=f"process {os.getpid()}"):
            workdir_lock.WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_lease_on_object_storage(fake_gcs):  # noqa: F811 -- fixture
    url = "gs://bucket/runs/x"
    with workdir_lock.WorkdirLock(url, lease_seconds=60):
        with pytest.raises(errors.WorkdirBusyError, match="in use by another trainer"):
            workdir_lock.WorkdirLock(url, lease_seconds=60).acquire()
    assert "/bucket/runs/x/.lock" not in fake_gcs.store
    stale = {"pid": 1, "host": "elsewhere", "started_utc": "then", "renewed": time.time() - 120}
    with fake_gcs().open("gs://bucket/runs/x/.lock", "w") as f:
        f.write(json.dumps(stale))
    with workdir_lock.WorkdirLock(url, lease_seconds=60) as lock:
        assert lock.held
