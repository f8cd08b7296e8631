"""End-to-end tests of the trainer on the tiny phantom (`configs/unetpp.py:data=phantom,test`, 8 fake devices).

One uninterrupted reference run (module fixture) is compared with runs that are killed (SIGKILL), preempted
(SIGTERM) and resumed, through the real command line in subprocesses. All runs share one config, so they share
compiled programs through the persistent compilation cache (a session temp dir): only the first compiles.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from anemia_jax import checkpointing, config_lib, input_pipeline, optim, parallel, steps, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/unetpp.py:data=phantom,test"
TOTAL = 24  # the test flag's num_train_steps


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Prepared tiny phantom and compilation cache, shared by every run in this module."""
    return {"data_dir": str(tmp_path_factory.mktemp("tfds")), "cache": str(tmp_path_factory.mktemp("jax_cache"))}


def make_config(shared):
    config = config_lib.load_config_file(str(ROOT / CONFIG))
    config.dataset.data_dir = shared["data_dir"]
    config.compilation_cache_dir = shared["cache"]
    return config


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """An uninterrupted run: its workdir, summary and log lines."""
    workdir = tmp_path_factory.mktemp("reference")
    collect = Collect()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_logger().addHandler(collect)
    try:
        summary = train.train_and_evaluate(make_config(shared), workdir)
    finally:
        absl_logging.get_absl_logger().removeHandler(collect)
        absl_logging.set_verbosity(verbosity)
    return workdir, summary, collect.lines


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def final_state(workdir, config, step=TOTAL):
    """The state saved at ``step`` in ``workdir``, on this process's mesh."""
    mesh = parallel.make_mesh()
    tx, _ = optim.make_optimizer(config.optimizer, total_steps=TOTAL, warmup_steps=config.warmup_steps)
    template = train.abstract_train_state(train.build_model(config), tx, config.image_size, mesh)
    with checkpointing.CheckpointManager(pathlib.Path(workdir) / "checkpoints", max_to_keep=1) as mgr:
        return mgr.restore(step, template)[0]


def test_run_leaves_outputs(reference, shared):
    workdir, summary, _ = reference
    config = make_config(shared)
    assert summary["status"] == "completed" and summary["step"] == TOTAL and summary["steps_this_run"] == TOTAL
    assert summary["config_name"] == "unetpp" and summary["num_devices"] == 8
    for which in ("final", "best"):
        val = summary[which]["val"]
        assert 0.0 <= val["dice/mean"] <= 1.0
        for t in config.targets:
            assert {f"dice/{t}", f"iou/{t}", f"precision/{t}", f"recall/{t}", f"hd95/{t}",
                    f"hd95_infinite/{t}"} <= set(val)
            assert val[f"num_images/{t}"] == summary["num_examples"]["val"]
    written = json.loads((workdir / "summary.json").read_text())
    assert written["final"]["step"] == TOTAL and written["targets"] == list(config.targets) == summary["targets"]
    assert json.loads((workdir / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))

    records = read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(config.log_every_steps, TOTAL + 1, config.log_every_steps))
    assert [r["step"] for r in records if r["split"] == "val"] == [12, 24]
    first = next(r for r in records if r["split"] == "train")
    assert {"loss", "lr", "steps_per_s", "images_per_s", "dice/palpebral"} <= set(first)
    assert np.isfinite(first["loss"]) and first["lr"] > 0

    panels = sorted((workdir / "panels").glob("*.png"))
    assert [p.name for p in panels] == ["step_0000012.png", "step_0000024.png"]
    with Image.open(panels[-1]) as im:  # 4 rows of 3 enlarged tiles
        assert im.mode == "RGB" and im.width >= 3 * 128 and im.height >= 4 * 128

    with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=2) as mgr:
        assert mgr.latest_step() == TOTAL
        best = summary["best"]["step"]
        assert best in (12, 24) and set(mgr.all_steps()) == {20, 24, best}
        assert mgr.metrics(best)["dice/mean"] == pytest.approx(summary["best"]["val"]["dice/mean"])


def test_progress_and_evaluation_lines(reference):
    lines = reference[2]
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == TOTAL // 2
    pattern = (r"step (\d+)/24 \(\d+%\) \| loss \d\.\d{4} \| lr \d\.\d\de-\d\d \| [\d.]+ steps/s \| "
               r"[\d.]+ img/s \| ETA \S+ \| dice/palpebral [\d.]+ \| dice/forniceal_palpebral [\d.]+")
    assert all(re.fullmatch(pattern, line) for line in progress), progress
    assert any(line.startswith("val @ step 12: mean dice") for line in lines)
    assert any(line.startswith("First step (including compilation) took") for line in lines)
    assert any(line.startswith("final val @ step 24") and "hd95" in line for line in lines)


def test_config_changes_are_listed():
    old = {"batch_size": 8, "optimizer": {"learning_rate": 1e-3, "b1": 0.9}}
    new = {"batch_size": 8, "optimizer": {"learning_rate": 3e-4, "b1": 0.9}, "seed": 1}
    assert config_lib.config_diff(old, new) == ["optimizer.learning_rate: 0.001 -> 0.0003", "seed: None -> 1"]


def test_rerun_resumes_without_retraining(reference, shared, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    before = (workdir / "metrics.jsonl").read_text()
    summary = train.train_and_evaluate(make_config(shared), workdir)
    assert summary["resumed_from_step"] == TOTAL and summary["steps_this_run"] == 0
    assert (workdir / "metrics.jsonl").read_text() == before
    assert summary["final"]["val"]["dice/mean"] == pytest.approx(reference[1]["final"]["val"]["dice/mean"])


def start_main(cwd, shared):
    """The command line, run from ``cwd`` without --workdir: the run goes to ``cwd/runs/unetpp_data-phantom_test``."""
    args = [sys.executable, "-u", "-m", "anemia_jax.main", f"--config={ROOT / CONFIG}",
            f"--config.dataset.data_dir={shared['data_dir']}", f"--config.compilation_cache_dir={shared['cache']}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(args, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def signal_when(process, pattern, sig, log):
    """Reads the process's log until a line matches ``pattern``, sends ``sig``, and returns its exit code."""
    for line in process.stderr:
        log.append(line)
        if re.search(pattern, line):
            process.send_signal(sig)
            break
    log.extend(process.stderr)
    return process.wait(timeout=300)


def test_interrupted_runs_end_like_an_uninterrupted_one(reference, shared, tmp_path):
    workdir = tmp_path / "runs" / "unetpp_data-phantom_test"  # the default --workdir
    log: list[str] = []
    # Hard kill once the save of step 8 has started (so step 4 is complete; 8 may be half written).
    code = signal_when(start_main(tmp_path, shared), r"Saving checkpoint step 8\b", signal.SIGKILL, log)
    assert code == -signal.SIGKILL, "".join(log[-30:])
    with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=2) as mgr:
        killed_at = mgr.latest_step()
    assert killed_at in (4, 8), "".join(log[-30:])

    # Resume, then preempt (SIGTERM) at the first progress line: a checkpoint is saved mid-run.
    log.clear()
    code = signal_when(start_main(tmp_path, shared), r"\] step \d+/24", signal.SIGTERM, log)
    text = "".join(log)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert f"Resumed from checkpoint step {killed_at}" in text
    preempted_at = int(re.search(r"SIGTERM received: saved checkpoint step (\d+)", text).group(1))
    assert killed_at < preempted_at < TOTAL

    summary = train.train_and_evaluate(make_config(shared), workdir)
    assert summary["resumed_from_step"] == preempted_at and summary["step"] == TOTAL
    config = make_config(shared)
    resumed, uninterrupted = final_state(workdir, config), final_state(reference[0], config)
    jax.tree.map(np.testing.assert_array_equal, parallel.fetch(resumed), parallel.fetch(uninterrupted))
    # The metrics log holds each step once, as if nothing had happened.
    steps_logged = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == TOTAL


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shared, tmp_path, monkeypatch):
    bad_step = 6  # the 6th update; checkpoints every 4 steps
    real_train_batch = input_pipeline.DeviceDataset.train_batch

    def poisoned(self, step):
        batch = real_train_batch(self, step)
        if step == bad_step - 1:  # batch index of update 6; an infinite mask weight makes the loss non-finite
            batch = {**batch, "mask_weights": batch["mask_weights"] * jnp.inf}
        return batch

    monkeypatch.setattr(input_pipeline.DeviceDataset, "train_batch", poisoned)
    config = make_config(shared)
    with pytest.raises(train.NonFiniteError, match=rf"stopped at step {bad_step} of {TOTAL}.*"
                                                   rf"last good checkpoint is step 4"):
        train.train_and_evaluate(config, tmp_path)
    with checkpointing.CheckpointManager(tmp_path / "checkpoints", max_to_keep=2) as mgr:
        assert mgr.all_steps() == [4]
    state = final_state(tmp_path, config, step=4)
    assert int(state.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(parallel.fetch(state.params)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "non_finite" and summary["step"] == bad_step
    assert summary["last_good_checkpoint"] == 4


def test_invalid_config_fails_before_any_work(shared, tmp_path):
    config = make_config(shared)
    config.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 8 devices"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_abstract_state_matches_created_state(shared):
    config = make_config(shared)
    mesh = parallel.make_mesh()
    model = train.build_model(config)
    tx, _ = optim.make_optimizer(config.optimizer, total_steps=TOTAL, warmup_steps=2)
    abstract = train.abstract_train_state(model, tx, config.image_size, mesh)
    real = steps.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 32, 32, 3)), mesh)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


def test_compilation_cache_is_enabled(reference, shared):
    # Another test in this process may have set its own cache directory first; JAX then keeps that one.
    cache = getattr(jax.config, "jax_compilation_cache_dir", None)
    assert cache and os.listdir(cache), "the persistent compilation cache stayed empty"


def test_reporting_helpers(tmp_path):
    from anemia_jax import reporting

    assert reporting.jsonable({"a": np.float32(0.5), "b": (np.inf, np.nan), "c": np.arange(2)}) == {
        "a": 0.5, "b": ["Infinity", "NaN"], "c": [0, 1]}
    assert [reporting.format_duration(s) for s in (4.2, 65, 3725, np.inf)] == ["4s", "1m05s", "1h02m05s", "?"]
    reporter = reporting.Reporter(tmp_path, is_main=True)
    for step in (2, 4, 6):
        reporter.log_metrics(step, "train", {"loss": np.float32(step)})
    with reporter.metrics_path.open("a") as f:
        f.write('{"step": 8, "spl')  # a line cut short by a kill
    assert reporter.truncate_metrics(4) == 2
    assert [r["step"] for r in read_jsonl(reporter.metrics_path)] == [2, 4]
    silent = reporting.Reporter(tmp_path / "other", is_main=False)
    silent.log_metrics(1, "train", {"loss": 1.0})
    assert not (tmp_path / "other").exists()
    # Panel: nested masks keep both colours visible; a missing truth mask is not drawn.
    images = np.full((2, 16, 16, 3), 100, np.uint8)
    truth = np.zeros((2, 16, 16, 2), np.uint8)
    truth[:, 2:14, 2:14, 1] = 1  # outer region, colour 1
    truth[:, 6:10, 6:10, 0] = 1  # nested region, colour 0
    panel = np.asarray(reporting.make_panel(images, truth, truth.astype(np.float32), ["inner", "outer"],
                                            truth_weights=np.array([[1, 1], [1, 0]])))
    scale = 128 // 16
    top, left = 30, 4 + 16 * scale + 4  # first row, truth column
    def pixel(row, y, x):
        return panel[top + row * (16 * scale + 4) + y * scale, left + x * scale]
    assert pixel(0, 8, 8)[0] > pixel(0, 8, 8)[2]  # inner: yellow, drawn over the outer cyan
    assert pixel(0, 3, 3)[2] > pixel(0, 3, 3)[0]  # outer only: cyan
    assert tuple(pixel(1, 3, 3)) == (100, 100, 100)  # row 2's outer truth is missing: not drawn
