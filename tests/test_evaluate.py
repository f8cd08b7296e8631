"""Tests of the evaluate command, `anemia_jax.evaluation.evaluator` and `anemia_jax.runs.restore` on a tiny UNet++ run
(_tiny_run.py).

Checked: the summary statistics against hand-computed values (missing masks excluded and counted, infinite
distances counted, per-country breakdown); checkpoint choice (best / latest / step, and 'auto': latest on the
validation split that selected 'best', best elsewhere); that inference restores only the model variables; that
loading logs no Orbax or optax noise; that run and output paths on object storage (gs://) stay URLs; one forward
pass per evaluation batch; the CSV and summary files of the command line with test-time augmentation, config
overrides and ensembles; pruned UNet++ evaluation; and the errors for misuse. (That the trainer and the command score
identically through the same `Evaluator` is checked in test_train.py, on a trained run.)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from _fake_gcs import fake_gcs  # noqa: F401 -- pytest fixture
from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures
from absl import logging as absl_logging
from etils import epath

from anemia_jax import evaluate, models
from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import eval_report, evaluator, finished_runs
from anemia_jax.inference import probabilities
from anemia_jax.runs import checkpointing, model_factory, restore
from anemia_jax.training import experiment


class Collect(logging.Handler):
    """Every absl record (INFO and up) while installed, with absl's verbosity at INFO."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self._verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.INFO)
        absl_logging.get_absl_logger().addHandler(self)
        return self

    def __exit__(self, *exc_info):
        absl_logging.get_absl_logger().removeHandler(self)
        absl_logging.set_verbosity(self._verbosity)


def test_summarize_by_hand():
    # 4 images, 2 targets; image 2 lacks target 1's mask, image 3's target 0 distance is undefined (inf).
    per_image = {
        "country": np.array(["A", "A", "B", "B"], dtype=object),
        "weights": np.array([[1, 1], [1, 1], [1, 0], [1, 1]], np.float32),
        "tp": np.array([[3, 1], [1, 0], [0, 9], [0, 2]], np.float64),
        "fp": np.array([[1, 0], [1, 1], [0, 9], [2, 0]], np.float64),
        "fn": np.array([[0, 1], [0, 1], [0, 9], [0, 0]], np.float64),
        "dice": np.array([[0.8, 0.5], [0.6, 0.0], [1.0, 0.3], [0.0, 1.0]]),
        "iou": np.zeros((4, 2)), "precision": np.zeros((4, 2)), "recall": np.zeros((4, 2)),
        "hd95": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, np.inf], [np.inf, 6.0]]),
        "assd": np.ones((4, 2)),
    }
    s = evaluator.summarize(per_image, ("t0", "t1"))
    t0, t1 = s["targets"]["t0"], s["targets"]["t1"]
    assert (t0["num_images"], t0["num_missing_mask"]) == (4, 0)
    assert (t1["num_images"], t1["num_missing_mask"]) == (3, 1)
    assert t0["dice"]["mean"] == pytest.approx(0.6)
    assert t0["dice"]["std"] == pytest.approx(np.std([0.8, 0.6, 1.0, 0.0]))
    assert t1["dice"]["mean"] == pytest.approx(0.5)  # image 2's 0.3 is excluded
    # Pooled Dice from summed counts: 2*4 / (2*4 + 4 + 0) for t0; t1 over images 0, 1, 3 only.
    assert t0["pooled_dice"] == pytest.approx(8 / 12)
    assert t1["pooled_dice"] == pytest.approx(6 / (6 + 1 + 2))
    assert t0["hd95"]["count_infinite"] == 1 and t0["hd95"]["mean"] == pytest.approx(3.0)
    # Image 2's inf has no reference mask for t1: neither counted nor averaged.
    assert t1["hd95"]["count_infinite"] == 0 and t1["hd95"]["mean"] == pytest.approx(4.0)
    a, b = s["by_country"]["A"], s["by_country"]["B"]
    assert a["t0"]["dice"]["mean"] == pytest.approx(0.7) and b["t0"]["dice"]["mean"] == pytest.approx(0.5)
    assert (b["t1"]["num_images"], b["t1"]["num_missing_mask"]) == (1, 1)
    assert b["t0"]["hd95"]["count_infinite"] == 1
    text = eval_report.format_markdown(s)
    assert "| t0 | 4 | 0 | 0.6000 ± " in text and "## B" in text
    # One group (a dataset without countries): no per-country section repeating the table.
    single = dict(s, by_country={"(unknown)": s["targets"]})
    assert "## " not in eval_report.format_markdown(single)


def test_checkpoint_choice(workdir, best_run):
    assert (best_run.step, best_run.checkpoint) == (2, "best")
    latest = restore.load_run(workdir, checkpoint="latest")
    assert latest.step == 4
    delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), latest.variables["params"],
                         best_run.variables["params"])
    assert max(jax.tree.leaves(delta)) == pytest.approx(0.05, abs=1e-6)
    assert restore.load_run(workdir, checkpoint="4").step == 4
    with pytest.raises(FileNotFoundError, match="available"):
        restore.load_run(workdir, checkpoint=7)
    with pytest.raises(ValueError, match="best"):
        restore.load_run(workdir, checkpoint="newest")
    with pytest.raises(FileNotFoundError, match="not a training run"):
        restore.load_run(workdir / "checkpoints")


def test_auto_checkpoint_is_latest_on_the_selection_split_and_best_elsewhere(workdir):
    # 'best' (step 2) was selected on the validation split: scoring it there is optimistic, so 'auto' takes the
    # latest (step 4); on the test split (and train) nothing was selected and 'auto' takes the best.
    with Collect() as log:
        on_val = restore.load_run(workdir, checkpoint="auto", split="val")
    assert (on_val.step, on_val.checkpoint) == (4, "latest") and "optimistic" in on_val.checkpoint_reason
    assert any("--checkpoint=auto: using the latest checkpoint" in line and "optimistic" in line
               for line in log.lines), log.lines
    with Collect() as log:
        on_test = restore.load_run(workdir, checkpoint="auto", split="test")
    assert (on_test.step, on_test.checkpoint) == (2, "best") and "'test'" in on_test.checkpoint_reason
    assert any("--checkpoint=auto: using the best checkpoint" in line for line in log.lines), log.lines
    assert restore.auto_checkpoint("train")[0] == "best" and restore.auto_checkpoint(None)[0] == "best"
    cmd = evaluate._command()
    assert cmd.flags["checkpoint"].default == "auto"
    assert "'auto' (default): 'latest' on --split=val" in " ".join(cmd.flags.get_help().split())
    assert "--checkpoint=auto" in evaluate.__doc__


def test_loading_logs_no_library_noise(workdir):
    # As in a fresh `python -m anemia_jax.evaluate`: no Orbax read-only warning (the filter must be in place before
    # the first manager exists) and no optax message about a zero-length schedule phase.
    absl_logging.get_absl_logger().removeFilter(checkpointing._EXPECTED_WARNINGS_FILTER)
    with Collect() as log:
        restore.load_run(workdir, checkpoint="latest")
    noise = [line for line in log.lines if "read only" in line or "transition_steps" in line]
    assert not noise and any(line.startswith("Restored latest checkpoint step 4") for line in log.lines), noise


def test_run_paths_on_object_storage_stay_urls(workdir, fake_gcs):
    bucket_run = epath.Path("gs://bucket/runs/tiny")
    bucket_run.mkdir(parents=True)
    (bucket_run / "config.json").write_text((workdir / "config.json").read_text())
    assert restore.load_config("gs://bucket/runs/tiny").to_dict() == restore.load_config(workdir).to_dict()
    with pytest.raises(FileNotFoundError, match="gs://bucket/runs/missing/config.json"):
        restore.load_config("gs://bucket/runs/missing")
    per_image = {"index": np.array([0]), "patient_id": np.array(["P/1"], object), "country": np.array(["A"], object),
                 "weights": np.ones((1, 1)), **{k: np.ones((1, 1)) for k in ("tp", "fp", "fn")},
                 **{k: np.full((1, 1), 0.5) for k in evaluator.SCORES}}
    summary = evaluator.summarize(per_image, ("t",))
    out = eval_report.write_outputs("gs://bucket/runs/tiny/eval/val_step4", per_image, summary, ("t",))
    assert str(out) == "gs://bucket/runs/tiny/eval/val_step4"
    assert {"/bucket/runs/tiny/eval/val_step4/" + n for n in ("per_image.csv", "summary.json", "summary.md")} <= set(
        fake_gcs.store)
    assert (out / "per_image.csv").read_text().splitlines()[1] == "0,P/1,A,1,0.5,0.5,0.5,0.5"


def test_load_run_opens_checkpoints_read_only(workdir, tmp_path):
    # A run still training: its trainer is writing step 6 (Orbax's temporary directory) while we restore.
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
    in_progress = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    in_progress.mkdir()
    (in_progress / "partial").write_text("being written")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert restore.load_run(run_dir, checkpoint="latest").step == 4
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    # A run that has not saved yet: a clear error, and no checkpoints/ created on its behalf.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run_dir / "config.json", fresh / "config.json")
    with pytest.raises(FileNotFoundError, match="has the run saved one yet"):
        restore.load_run(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json"]


def test_mesh_batch_size(best_run):
    assert best_run.mesh.size == 8
    assert [probabilities.mesh_batch_size(b, best_run.mesh) for b in (None, 0, 1, 8, 9, 16)] == [8, 8, 8, 8, 16, 16]


def test_inference_restores_variables_only(workdir, best_run):
    # No optimizer is built and its state is never read: the variables are the checkpoint's params and statistics.
    assert set(best_run.variables) == {"params", "batch_stats"}
    with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=2, read_only=True) as manager:
        model = model_factory.build_model(best_run.config)
        tx, _ = experiment.build_optimizer(best_run.config, total_steps=2, warmup_steps=1)
        full, _ = manager.restore(2, experiment.abstract_train_state(model, tx, best_run.image_size, best_run.mesh))
    tree_equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), best_run.variables,
                              {"params": full.params, "batch_stats": full.batch_stats})
    assert all(jax.tree.leaves(tree_equal))


def test_one_forward_pass_per_batch(best_run):
    """The evaluator's batch program holds the model once: metrics, distances and panels share that pass."""
    config = best_run.config
    builder, split, idx = loading.eval_split(config, "val")
    dataset = input_pipeline.DeviceDataset.from_builder(builder, split, idx, best_run.mesh, batch_size=8,
                                                        image_size=best_run.image_size, targets=best_run.targets)
    probability, variables = probabilities.probability_of(best_run)
    ev = evaluator.Evaluator(dataset, probability, best_run.targets, distances=True, num_panel=3)
    batch = next(dataset.eval_batches(8))
    scored = ev._score.lower(variables, batch).as_text().count("stablehlo.convolution")
    images = jax.ShapeDtypeStruct((1, *best_run.image_size, 3), np.uint8)
    one_pass = jax.jit(probability).lower(variables, images).as_text().count("stablehlo.convolution")
    assert scored == one_pass > 0
    calls = []
    ev._score = (lambda fn: lambda *a: calls.append(1) or fn(*a))(ev._score)
    result = ev.run(variables)
    assert len(calls) == dataset.num_eval_batches(8)
    assert result.panel["image"].shape == (3, *best_run.image_size, 3) and "hd95" in result.per_image
    assert sorted(result.per_image["index"].tolist()) == sorted(idx.tolist())


def test_command_line_with_tta(workdir, tmp_path):
    out = tmp_path / "eval"
    # The default checkpoint, on the validation split: 'auto' -> the latest.
    assert evaluate.main(["evaluate", f"--workdir={workdir}", "--split=val", "--tta", "--tta_flips=none,h",
                          "--tta_scales=1,0.5", f"--out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"]["step"] == 4 and summary["checkpoint"]["chosen_as"] == "latest"
    assert summary["checkpoint"]["reason"].startswith("--checkpoint=auto: 'best' was selected")
    assert summary["tta"] == ["flip=none,scale=1", "flip=h,scale=1", "flip=none,scale=0.5", "flip=h,scale=0.5"]
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["num_images"] > 0
    for t in ("palpebral", "forniceal_palpebral"):
        dice = [float(r[f"dice/{t}"]) for r in rows]
        assert np.mean(dice) == pytest.approx(summary["targets"][t]["dice"]["mean"], abs=1e-5)
        assert all(r[f"has_mask/{t}"] == "1" and r[f"hd95/{t}"] for r in rows)
    assert rows[0]["patient_id"].startswith("Phantom") and rows[0]["country"] in ("PhantomA", "PhantomB")
    markdown = (out / "summary.md").read_text()
    assert "| palpebral |" in markdown and "- checkpoint: step 4 (latest: --checkpoint=auto:" in markdown


def test_pruned_unetpp(best_run):
    full, pruned, deepest = (finished_runs.evaluate_runs([best_run], split="val", prune_level=k, distances=False).summary
                             for k in (None, 1, 2))
    assert pruned["prune_level"] == 1 and "hd95" not in pruned["targets"]["palpebral"]
    # L^depth is the full network's deepest head: the same scores.
    for t in best_run.targets:
        assert deepest["targets"][t]["dice"]["mean"] == pytest.approx(full["targets"][t]["dice"]["mean"], abs=1e-6)
    with pytest.raises(ValueError, match="1..2"):
        finished_runs.evaluate_runs([best_run], split="val", prune_level=3, distances=False)
    unet = dataclasses.replace(best_run, model=models.get_model("unet", depth=2), config=ml_collections.ConfigDict(
        {**best_run.config.to_dict(), "model": {"name": "unet", "depth": 2}}))
    with pytest.raises(ValueError, match="no pruning \\(UNet\\+\\+ only\\)"):
        probabilities.probability_of(unet, prune_level=1)


def test_split_errors(best_run):
    with pytest.raises(ValueError, match="no test split"):
        loading.eval_split(best_run.config, "test")
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        loading.eval_split(best_run.config, "validation")
    train_idx = loading.eval_split(best_run.config, "train")[2]
    val_idx = loading.eval_split(best_run.config, "val")[2]
    assert (len(train_idx), len(val_idx)) == (25, 7) and not set(train_idx) & set(val_idx)


def test_command_line_overrides_and_ensembles(workdir, tmp_path, capsys):
    config = json.loads((workdir / "config.json").read_text())
    moved = tmp_path / "moved_tfds"
    shutil.copytree(config["dataset"]["data_dir"], moved)
    single, twice = tmp_path / "single", tmp_path / "twice"
    # The recorded data_dir overridden on the command line (the prepared data moved), as for training.
    assert evaluate.main(["evaluate", f"--workdir={workdir}", "--checkpoint=best", "--no_distances",
                          f"--config.dataset.data_dir={moved}", f"--out={single}"]) == 0
    # The same run twice is an ensemble of two identical members: the same scores.
    assert evaluate.main(["evaluate", f"--workdir={workdir}", f"--workdir={workdir}", "--checkpoint=best",
                          "--no_distances", f"--out={twice}"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, twice))
    assert a["ensemble"] is None and b["ensemble"] == [str(workdir)] * 2
    for t in ("palpebral", "forniceal_palpebral"):
        assert a["targets"][t]["dice"]["mean"] == pytest.approx(b["targets"][t]["dice"]["mean"], abs=1e-6)
    assert "ensemble of 2 runs" in (twice / "summary.md").read_text()
    capsys.readouterr()
    assert evaluate.main(["evaluate", f"--workdir={workdir}", "--config.dataset.data_dirr=x"]) == 2
    err = capsys.readouterr().err
    assert "config has no key 'dataset.data_dirr'" in err and "dataset.data_dir" in err and "Traceback" not in err
    assert evaluate.main(["evaluate", "--split=val"]) == 2
    assert "--workdir=RUN" in capsys.readouterr().err
    assert evaluate.main(["evaluate", f"--workdir={workdir}", "--split=validation"]) == 2
    assert "--split" in capsys.readouterr().err
