"""The trainer's command line run as two local processes sharing one workdir, then rerun to resume.

Two `python -m anemia_jax.main --distributed` processes, 2 fake CPU devices each, join through
`jax.distributed.initialize` on 127.0.0.1 (gloo CPU collectives) and train the tiny phantom config
(``configs/unetpp.py:data=phantom,test,steps=8``: checkpoints at 4 and 8, one evaluation at 8) into one workdir.
Only process 0 may write logs, metrics, panels and the summary (a second writer would duplicate every
metrics line); both write their checkpoint shards. The rerun of the same two commands must restore the last
checkpoint, train nothing again and evaluate as before. Then a single process with 4 devices resumes the two
processes' step-4 checkpoint and must end where they ended (float tolerance): the data layout (example j on mesh
device j % 4, per-device permutations) and the per-device augmentation keys depend only on the mesh position, so
both draw identical batches.

The phantom data is prepared here once, before the launch, so that the processes do not race to build it.

Under load the processes are launched again (from the same starting state) when, and only when, they failed on the
Gloo CPU collectives' fixed 30 s wait for a peer to create a communication context (``Gloo context initialization
failed: DEADLINE_EXCEEDED``): a limit inside JAX that no flag changes, which one process reaches when the other is
more than 30 s behind it (two full suites side by side on 2 cores, load 10-14, did that once in one of two runs).
Any other failure fails the test at once.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import _children
import jax
import numpy as np
import pytest

from anemia_jax.data import loading
from anemia_jax.runs import checkpointing, config_lib, model_factory
from anemia_jax.training import experiment
from anemia_jax.utils import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/unetpp.py:data=phantom,test,steps=8"
TOTAL, CKPT_EVERY, LOG_EVERY = 8, 4, 2
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
BUDGET_S = 300  # unloaded seconds per launch (`_children`): it takes about 170 s on 2 idle cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data_dir):
    config = config_lib.load_config_file(str(ROOT / CONFIG))
    config.dataset.data_dir = str(data_dir)
    return config


def start(workdir, data_dir, cache_dir, logs_dir, *, num_processes=NUM_PROCESSES,
          devices_per_process=DEVICES_PER_PROCESS, name="run"):
    """Starts ``num_processes`` trainer processes (distributed if more than one) on the tiny config."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-u", "-m", "anemia_jax.main", f"--config={ROOT / CONFIG}", f"--workdir={workdir}",
               f"--config.dataset.data_dir={data_dir}", f"--config.compilation_cache_dir={cache_dir}"]
    if num_processes > 1:
        command += ["--distributed", f"--coordinator_address=127.0.0.1:{_free_port()}",
                    f"--num_processes={num_processes}"]
    launched = []
    try:
        for i in range(num_processes):
            path = pathlib.Path(logs_dir) / f"{name}_{i}.log"
            with open(path, "w") as log:
                extra = [f"--process_id={i}"] if num_processes > 1 else []
                launched.append((_children.Child(command + extra, budget_s=BUDGET_S, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT), path))
    except BaseException:
        for child, _ in launched:
            child.close()
        raise
    return launched


def finish(launched):
    """Waits for the processes of `start` (each killed past its budget, and all of them on any way out); asserts
    they all exited 0 and returns their logs."""
    try:
        codes = [child.wait() for child, _ in launched]
    finally:
        for child, _ in launched:
            child.close()
    logs = [path.read_text() for _, path in launched]
    for child, _ in launched:
        child.check_budget("\n----\n".join(log[-2000:] for log in logs))
    if codes != [0] * len(launched):
        raise LaunchFailed("a process failed:\n" + "\n----\n".join(log[-4000:] for log in logs), logs)
    return logs


class LaunchFailed(AssertionError):
    """A launched process exited with a failure; ``logs`` are the processes' whole logs."""

    def __init__(self, message: str, logs: list[str]):
        super().__init__(message)
        self.logs = logs


GLOO_WAIT = "Gloo context initialization failed: DEADLINE_EXCEEDED"
ATTEMPTS = 3


def launch(workdir, *args, **kwargs):
    """`finish(start(workdir, ...))`, launched again from ``workdir``'s starting state (at most `ATTEMPTS` times in
    all) when the processes failed on the Gloo wait only (see the module docstring)."""
    workdir = pathlib.Path(workdir)
    snapshot = workdir.with_name(workdir.name + ".before")
    shutil.rmtree(snapshot, ignore_errors=True)
    if workdir.exists():
        shutil.copytree(workdir, snapshot)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return finish(start(workdir, *args, **kwargs))
        except LaunchFailed as e:
            if attempt == ATTEMPTS or not any(GLOO_WAIT in log for log in e.logs):
                raise
        shutil.rmtree(workdir, ignore_errors=True)
        if snapshot.exists():
            shutil.copytree(snapshot, workdir)
    raise AssertionError("unreachable")


def final_params(workdir, config, step=TOTAL):
    """The parameters saved at ``step``, restored on this process's 8-device mesh (saved on 4 devices)."""
    mesh = parallel.make_mesh()
    tx, _ = experiment.build_optimizer(config, total_steps=TOTAL, warmup_steps=config.warmup_steps)
    template = experiment.abstract_train_state(model_factory.build_model(config), tx, config.image_size, mesh)
    with checkpointing.CheckpointManager(pathlib.Path(workdir) / "checkpoints", max_to_keep=2) as mgr:
        state, _ = mgr.restore(step, template)
    assert int(parallel.fetch(state.step)) == step
    return parallel.fetch(state.params)


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_two_process_training_writes_once_and_resumes(tmp_path):
    data_dir, cache_dir = tmp_path / "tfds", tmp_path / "jax_cache"
    config = _config(data_dir)
    loading.prepare_builder(config)  # prepared once, before any worker starts
    workdir = tmp_path / "run"

    logs = launch(workdir, data_dir, cache_dir, tmp_path)

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == TOTAL and summary["steps_this_run"] == TOTAL
    assert summary["num_processes"] == NUM_PROCESSES
    assert summary["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert summary["resumed_from_step"] is None
    val = summary["final"]["val"]
    assert 0.0 <= val["dice/mean"] <= 1.0 and np.isfinite(val["dice/mean"])
    for t in config.targets:
        assert val[f"num_images/{t}"] == summary["num_examples"]["val"]  # every process's examples counted
    records = read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))  # once each: one writer
    assert [r["step"] for r in records if r["split"] == "val"] == [TOTAL]
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert [p.name for p in (workdir / "panels").glob("*.png")] == [f"step_{TOTAL:07d}.png"]
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == TOTAL
    with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=2) as mgr:
        assert mgr.all_steps() == list(range(CKPT_EVERY, TOTAL + 1, CKPT_EVERY))
    # Only process 0 reports; process 1's log has no progress line.
    assert f"step {TOTAL}/{TOTAL}" in logs[0] and f"step {TOTAL}/{TOTAL}" not in logs[1]

    # A copy without the last checkpoint: an interrupted run, resumed below by a single process.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(workdir, interrupted, ignore=lambda d, names: [str(TOTAL)] if d.endswith("checkpoints") else [])

    # The same two commands again: both restore the last checkpoint, train nothing, end at the same step and
    # evaluate the restored state exactly as the first run evaluated it.
    before = (workdir / "metrics.jsonl").read_text()
    logs = launch(workdir, data_dir, cache_dir, tmp_path, name="rerun")
    rerun = json.loads((workdir / "summary.json").read_text())
    assert rerun["resumed_from_step"] == TOTAL and rerun["steps_this_run"] == 0 and rerun["step"] == TOTAL
    assert rerun["final"]["val"] == pytest.approx(summary["final"]["val"], rel=1e-6, nan_ok=True)
    assert (workdir / "metrics.jsonl").read_text() == before
    assert f"Resumed from checkpoint step {TOTAL}" in logs[0]

    # One process with 4 devices resumes the two processes' step-4 checkpoint and retrains steps 5-8 only. The
    # mesh positions, hence batches and augmentation keys, are those of the two-process run, so it ends where
    # that run ended, to float tolerance (the all-reduces sum in another order).
    logs = finish(start(interrupted, data_dir, cache_dir, tmp_path, num_processes=1,
                        devices_per_process=NUM_PROCESSES * DEVICES_PER_PROCESS, name="single"))
    single = json.loads((interrupted / "summary.json").read_text())
    assert single["num_processes"] == 1 and single["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert single["resumed_from_step"] == CKPT_EVERY and single["steps_this_run"] == TOTAL - CKPT_EVERY
    assert f"Resumed from checkpoint step {CKPT_EVERY}" in logs[0]
    resumed_records = read_jsonl(interrupted / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in resumed_records] == [(r["split"], r["step"]) for r in records]
    for got, want in zip(resumed_records, records):
        if got["split"] == "train":
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5),
                 final_params(interrupted, config), final_params(workdir, config))


def test_a_launch_is_repeated_after_the_gloo_wait_only(tmp_path, monkeypatch):
    module = sys.modules[__name__]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "state").write_text("start")
    seen = []

    def finish_failing_once(launched, failure=GLOO_WAIT + ": GetKeyValue() timed out"):
        seen.append((workdir / "state").read_text())
        (workdir / "state").write_text("half written")
        if len(seen) == 1:
            raise LaunchFailed("a process failed", [failure, ""])
        return ["done"]

    monkeypatch.setattr(module, "start", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "finish", finish_failing_once)
    assert launch(workdir) == ["done"] and seen == ["start", "start"]  # relaunched from the starting state
    seen.clear()
    monkeypatch.setattr(module, "finish", lambda launched: finish_failing_once(launched, "NonFiniteError"))
    with pytest.raises(LaunchFailed):
        launch(tmp_path / "other")  # any other failure is not repeated
    assert len(seen) == 1
