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
import time

import _children
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fake_gcs import fake_gcs  # noqa: F401 -- pytest fixture
from absl import logging as absl_logging
from etils import epath
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from PIL import Image

from anemia_jax import evaluate
from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import evaluator
from anemia_jax.runs import checkpointing, config_lib, model_factory
from anemia_jax.training import experiment, reporting, train
from anemia_jax.utils import compilation_cache, conversions, parallel, paths
from anemia_jax.utils.conversions import jsonable

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


EVALUATIONS: list[dict] = []  # the results of every Evaluator.run while `spy_evaluator` is installed


def spy_evaluator(monkeypatch):
    """Records every `evaluator.Evaluator.run` result (the one evaluation loop) in `EVALUATIONS`."""
    real = evaluator.Evaluator.run

    def run(self, variables):
        result = real(self, variables)
        EVALUATIONS.append(result.scalars)
        return result

    monkeypatch.setattr(evaluator.Evaluator, "run", run)


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """An uninterrupted run: its workdir, summary, log lines and the results of its evaluations."""
    workdir = tmp_path_factory.mktemp("reference")
    collect = Collect()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_logger().addHandler(collect)
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy_evaluator(monkeypatch)
        EVALUATIONS.clear()
        try:
            summary = train.train_and_evaluate(make_config(shared), workdir)
        finally:
            absl_logging.get_absl_logger().removeHandler(collect)
            absl_logging.set_verbosity(verbosity)
    return workdir, summary, collect.lines, list(EVALUATIONS)


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def final_state(workdir, config, step=TOTAL):
    """The state saved at ``step`` in ``workdir``, on this process's mesh."""
    mesh = parallel.make_mesh()
    tx, _ = experiment.build_optimizer(config, total_steps=TOTAL, warmup_steps=config.warmup_steps)
    template = experiment.abstract_train_state(model_factory.build_model(config), tx, config.image_size, mesh)
    with checkpointing.CheckpointManager(pathlib.Path(workdir) / "checkpoints", max_to_keep=1) as mgr:
        return mgr.restore(step, template)[0]


def test_run_leaves_outputs(reference, shared):
    workdir, summary, _, _ = reference
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
    recorded = json.loads((workdir / "config.json").read_text())
    data_source = recorded.pop("data_source")  # the data actually used (prepared directory and its source)
    assert recorded == json.loads(json.dumps(config.to_dict()))
    assert data_source["builder"] == "conjunctiva_phantom" and data_source["prepared_dir"].startswith(shared["data_dir"])

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
    assert any(re.match(r"unetpp: 0\.\d+ M parameters; [\d.]+ GFLOP per training step", line) for line in lines)


def read_events(workdir):
    """Every summary value of the run's TensorBoard event files: [(step, tag, value protobuf)].

    Event files are TFRecord files (per record: uint64 length, uint32 CRC, data, uint32 CRC) of `Event` protobufs;
    tensorboardX ships the protobuf classes, so no TensorFlow is needed to read them back."""
    import struct

    from tensorboardX.proto import event_pb2

    values = []
    for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            values += [(event.step, v.tag, v) for v in event.summary.value]
    return values


def test_tensorboard_events_hold_scalars_panels_and_hparams(reference):
    workdir, summary = reference[0], reference[1]
    values = read_events(workdir)
    scalars = {(step, tag): v.simple_value for step, tag, v in values if v.HasField("simple_value")}
    records = read_jsonl(workdir / "metrics.jsonl")
    for record in records:
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, float):
                assert scalars[(record["step"], f"{record['split']}/{name}")] == pytest.approx(value, rel=1e-6)
    assert scalars[(24, "val/dice/mean")] == pytest.approx(summary["final"]["val"]["dice/mean"], rel=1e-6)
    images = {step: v.image for step, tag, v in values if tag == "val/panel"}
    assert sorted(images) == [12, 24]
    with Image.open(__import__("io").BytesIO(images[24].encoded_image_string)) as panel:
        assert panel.size == (images[24].width, images[24].height) and panel.width >= 3 * 128
    tags = {tag for _, tag, _ in values}
    assert "_hparams_/experiment" in tags and "_hparams_/session_start_info" in tags
    assert any(tag.startswith("config") for tag in tags)


def test_trainer_and_evaluate_command_score_alike(reference, shared, tmp_path, monkeypatch):
    """The trainer's final validation scores and `python -m anemia_jax.evaluate` on the same checkpoint are the
    same numbers, from the same `Evaluator.run` (one forward pass per batch: see test_evaluate.py)."""
    workdir, summary, _, trainer_evaluations = reference
    # Evaluations of the trainer: at steps 12 and 24 (with panels), then final val (with distances), then best val.
    same = lambda a, b: jsonable(a) == jsonable(b)  # noqa: E731 -- NaN equals NaN here
    assert len(trainer_evaluations) >= 3 and same(trainer_evaluations[2], summary["final"]["val"])
    spy_evaluator(monkeypatch)
    EVALUATIONS.clear()
    out = tmp_path / "eval"
    assert evaluate.main(["evaluate", f"--workdir={workdir}", f"--checkpoint={TOTAL}", "--split=val",
                          f"--out={out}"]) == 0
    assert len(EVALUATIONS) == 1
    command = EVALUATIONS[0]
    assert same(command, summary["final"]["val"])  # exactly: same variables, batches and code
    written = json.loads((out / "summary.json").read_text())
    for t in summary["targets"]:
        assert written["targets"][t]["dice"]["mean"] == command[f"dice/{t}"]


def test_config_changes_are_listed():
    old = {"batch_size": 8, "optimizer": {"learning_rate": 1e-3, "b1": 0.9}}
    new = {"batch_size": 8, "optimizer": {"learning_rate": 3e-4, "b1": 0.9}, "seed": 1}
    assert conversions.nested_diff(old, new) == ["optimizer.learning_rate: 0.001 -> 0.0003", "seed: None -> 1"]


def test_rerun_resumes_without_retraining(reference, shared, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    before = (workdir / "metrics.jsonl").read_text()

    def never_compile(*args, **kwargs):
        raise AssertionError("a finished run's rerun compiled the train step")

    monkeypatch.setattr(train, "_compile", never_compile)  # nothing to train: the step's FLOPs come from the checkpoint
    summary = train.train_and_evaluate(make_config(shared), workdir)
    assert summary["resumed_from_step"] == TOTAL and summary["steps_this_run"] == 0
    assert (workdir / "metrics.jsonl").read_text() == before
    assert summary["final"]["val"]["dice/mean"] == pytest.approx(reference[1]["final"]["val"]["dice/mean"])
    assert summary["train_step_gflops"] == reference[1]["train_step_gflops"] > 0
    assert summary["num_params"] == reference[1]["num_params"]


def start_main(cwd, shared) -> _children.Child:
    """The command line, run from ``cwd`` without --workdir: the run goes to ``cwd/runs/unetpp_data-phantom_test``."""
    args = [sys.executable, "-u", "-m", "anemia_jax.main", f"--config={ROOT / CONFIG}",
            f"--config.dataset.data_dir={shared['data_dir']}", f"--config.compilation_cache_dir={shared['cache']}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return _children.Child(args, budget_s=300, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           text=True)


def signal_when(child: _children.Child, pattern, sig, log):
    """Reads the child's log until a line matches ``pattern``, sends ``sig``, and returns its exit code (the child
    is killed past its budget of unloaded seconds, and on any way out of here)."""
    with child:
        for line in child.process.stderr:
            log.append(line)
            if re.search(pattern, line):
                child.process.send_signal(sig)
                break
        log.extend(child.process.stderr)
        code = child.wait()
    child.check_budget("".join(log))
    return code


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
    model = model_factory.build_model(config)
    tx, _ = experiment.build_optimizer(config, total_steps=TOTAL, warmup_steps=2)
    abstract = experiment.abstract_train_state(model, tx, config.image_size, mesh)
    real = experiment.init_train_state(config, model, tx, mesh)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


def test_compilation_cache_is_enabled(reference, shared, tmp_path):
    cache = shared["cache"]
    # The runs of this module set their configured directory, whatever an earlier test had set; it filled up.
    assert jax.config.jax_compilation_cache_dir == cache
    assert os.listdir(cache), "the run's persistent compilation cache stayed empty"
    # A cache another library set and opened (JAX opens it at the first compilation) in this process gives way too.
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    other = tmp_path / "other_cache"
    other.mkdir()
    unique = float(time.time_ns() % 997) + 0.5  # a constant no earlier program holds: each compile is new
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even these tiny programs
    try:
        jax_cache.set_cache_dir(str(other))
        jax_cache.reset_cache()
        jax.jit(lambda x: x * unique - 1.0)(jnp.ones(5)).block_until_ready()
        assert os.listdir(other), "set-up: the other cache should have opened"
        compilation_cache.enable(cache)
        assert jax.config.jax_compilation_cache_dir == cache
        before_run, before_other = set(os.listdir(cache)), set(os.listdir(other))
        jax.jit(lambda x: x * unique + 2.0)(jnp.ones(7)).block_until_ready()
        assert set(os.listdir(cache)) > before_run, "the new compilation was not written to the configured cache"
        assert set(os.listdir(other)) == before_other
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation_cache.enable(cache)


def test_workdir_paths_keep_urls():
    assert str(paths.as_path("gs://bucket/runs/unetpp")) == "gs://bucket/runs/unetpp"
    assert str(paths.as_path(epath.Path("gs://bucket/runs/x")) / "checkpoints") == "gs://bucket/runs/x/checkpoints"
    assert str(paths.as_path("s3://b/r")) == "s3://b/r" and paths.is_url("gs://b") and not paths.is_url("/b")
    assert paths.as_path("runs/x") == pathlib.Path.cwd() / "runs" / "x"
    assert paths.as_path("~/runs") == pathlib.Path.home() / "runs"
    with pytest.raises(ValueError, match="URL"):
        paths.as_path(pathlib.Path("gs://bucket/x"))  # pathlib made it 'gs:/bucket/x'


def test_url_workdir_reaches_no_local_path_and_nothing_before_data(shared, tmp_path, monkeypatch, fake_gcs):
    # A TPU VM run: --workdir=gs://... must stay a URL (not ./gs:/bucket/...), and a run that fails on its data
    # must not have created anything there.
    monkeypatch.chdir(tmp_path)

    def no_data(config, mesh):
        raise train.DataNotFoundError("no data here")

    monkeypatch.setattr(loading, "load_data", no_data)
    collect = Collect()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_logger().addHandler(collect)
    try:
        with pytest.raises(train.DataNotFoundError):
            train.train_and_evaluate(make_config(shared), "gs://bucket/runs/unetpp")
    finally:
        absl_logging.get_absl_logger().removeHandler(collect)
        absl_logging.set_verbosity(verbosity)
    assert any(line.endswith("workdir gs://bucket/runs/unetpp") for line in collect.lines), collect.lines[:3]
    assert list(tmp_path.iterdir()) == [] and fake_gcs.store == {}


def test_missing_data_leaves_no_workdir_and_keeps_an_existing_one(shared, tmp_path):
    config = config_lib.load_config_file(str(ROOT / "configs/unetpp.py:data=eyes,test"))
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.dataset.builder_kwargs.archive_path = str(tmp_path / "no_such_archive.zip")
    config.compilation_cache_dir = shared["cache"]
    with pytest.raises(train.DataNotFoundError, match="archive_path"):
        train.train_and_evaluate(config, tmp_path / "runs" / "new")
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "runs" / "old"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"split": "train", "step": 4}\n')
    listing = sorted((p.relative_to(existing), p.stat().st_mtime_ns) for p in existing.rglob("*"))
    with pytest.raises(train.DataNotFoundError):
        train.train_and_evaluate(config, existing)
    assert sorted((p.relative_to(existing), p.stat().st_mtime_ns) for p in existing.rglob("*")) == listing


def test_reporter_on_object_storage(fake_gcs):
    reporter = reporting.Reporter("gs://bucket/runs/x", is_main=True)
    reporter.info("logging creates nothing")
    assert fake_gcs.store == {}
    reporter.write_config({"a": 1})
    for step in (2, 4, 6):  # the fake bucket, like GCS, cannot append: the file is rewritten
        reporter.log_metrics(step, "train", {"loss": float(step)})
    assert reporter.truncate_metrics(4) == 1
    reporter.log_metrics(6, "val", {"dice/mean": 0.5})
    reporter.save_panel(6, np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 1), np.uint8),
                        np.zeros((1, 8, 8, 1), np.float32), ["t"])
    reporter.write_summary({"status": "completed"})
    assert sorted(k for k in fake_gcs.store if "tfevents" not in k) == [
        "/bucket/runs/x/config.json", "/bucket/runs/x/metrics.jsonl", "/bucket/runs/x/panels/step_0000006.png",
        "/bucket/runs/x/summary.json"]
    run = epath.Path("gs://bucket/runs/x")
    assert [(r["step"], r["split"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [
        (2, "train"), (4, "train"), (6, "val")]
    assert json.loads((run / "config.json").read_text()) == {"a": 1}
    with (run / "panels" / "step_0000006.png").open("rb") as f:
        assert Image.open(f).format == "PNG"
    # A resumed run (new reporter) continues the file it finds.
    reporting.Reporter("gs://bucket/runs/x", is_main=True).log_metrics(8, "train", {"loss": 1.0})
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


def test_reporting_helpers(tmp_path):
    from anemia_jax.training import reporting

    assert jsonable({"a": np.float32(0.5), "b": (np.inf, np.nan), "c": np.arange(2)}) == {
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
    lazy = reporting.Reporter(tmp_path / "lazy", is_main=True)
    lazy.info("nothing written yet")
    assert not (tmp_path / "lazy").exists()
    # Rewriting the whole file (object stores) leaves the same file as appending.
    rewriting = reporting.Reporter(tmp_path / "rewrite", is_main=True, append=False)
    for step in (2, 4, 6):
        rewriting.log_metrics(step, "train", {"loss": np.float32(step)})
    assert rewriting.truncate_metrics(4) == 1
    rewriting.log_metrics(6, "val", {"dice/mean": 0.5})
    appending = reporting.Reporter(tmp_path / "append", is_main=True)
    for step, split, values in ((2, "train", {"loss": 2.0}), (4, "train", {"loss": 4.0}),
                                (6, "val", {"dice/mean": 0.5})):
        appending.log_metrics(step, split, values)
    assert rewriting.metrics_path.read_text() == appending.metrics_path.read_text()
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
