"""Tests of ensembles against their single runs: ``evaluate`` scores the ensemble and each run alone on the same
images and refuses images its runs trained on; ``calibrate_quality`` chooses and writes the verdict's thresholds
(per run on validation folds, or for the ensemble on a split none of them trained on)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import calibrate_quality, evaluate
from anemia_jax.data import input_pipeline, loading
from anemia_jax.evaluation import eval_report, evaluator, finished_runs
from anemia_jax.inference import temperature
from anemia_jax.runs import restore
from anemia_jax.screening import quality


@pytest.fixture(scope="module")
def second_run(workdir, tmp_path_factory):
    """A copy of the tiny run without its step-4 checkpoint: its 'latest' is step 2 (other parameters), same
    data and fold."""
    copy = tmp_path_factory.mktemp("second") / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "4")
    return copy


@pytest.fixture(scope="module")
def other_fold(workdir, tmp_path_factory):
    """A copy of the tiny run whose recorded config says fold 1: it trained on part of fold 0's validation images."""
    copy = tmp_path_factory.mktemp("fold1") / "run"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["split"]["fold"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_ensemble_and_each_member_on_the_same_images(workdir, second_run, tmp_path):
    out = tmp_path / "ens"
    assert evaluate.main(["evaluate", f"--workdir={workdir}", f"--workdir={second_run}", "--checkpoint=latest",
                          "--no_distances", f"--out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [m["step"] for m in summary["members"]] == [4, 2] and summary["training_overlap"] == [0, 0]
    # A member's scores are those of the run evaluated alone (the second member: step 2 of the same run).
    alone = finished_runs.evaluate_runs([restore.load_run(workdir, checkpoint=2)], split="val", distances=False).summary
    for t in alone["targets"]:
        assert summary["members"][1]["targets"][t]["dice"]["mean"] == pytest.approx(
            alone["targets"][t]["dice"]["mean"], abs=1e-6)
        assert summary["members"][0]["targets"][t] != summary["members"][1]["targets"][t]
    text = (out / "summary.md").read_text()
    assert "## Ensemble vs single runs" in text and "| mean of the single runs |" in text
    assert "| ensemble - mean of single runs |" in text and "Optimistic" not in text


def test_training_overlap_is_refused_for_ensembles(workdir, other_fold, tmp_path, capsys):
    config = restore.load_config(workdir)
    builder, split, val = loading.eval_split(config, "val")
    restored = restore.load_runs([workdir, other_fold], checkpoint="best")
    overlap = finished_runs.training_overlap(restored, builder, split, val)
    fold1_train = loading.split_indices(restore.load_config(other_fold), input_pipeline.read_metadata(
        builder, split))[0]
    assert overlap == [0, int(np.isin(val, fold1_train).sum())] and overlap[1] > 0
    args = ["evaluate", f"--workdir={workdir}", f"--workdir={other_fold}", "--no_distances",
            f"--out={tmp_path / 'x'}"]
    assert evaluate.main(args) == 2
    assert "trained on" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # Scoring another data set (here: another builder config) involves none of the runs' training images.
    moved = restored[0].config.copy_and_resolve_references()
    with moved.unlocked():
        moved.dataset.builder_config = "res64_other"
    restored[0].config = moved
    assert finished_runs.training_overlap(restored[:1], builder, split, val) == [0]


def test_format_members_table():
    stats = {"dice": {"mean": 0.8, "std": 0.1}}
    summary = {"targets": {"a": stats}, "members": [
        {"workdir": "/x/fold_0", "step": 3, "targets": {"a": {"dice": {"mean": 0.7, "std": 0.1}}}},
        {"workdir": "/x/fold_1", "step": 3, "targets": {"a": {"dice": {"mean": 0.76, "std": 0.1}}}}]}
    text = eval_report.format_members(summary)
    assert "| fold_0 | 3 | 0.7000 |" in text and "| mean of the single runs | - | 0.7300 |" in text
    assert "| ensemble - mean of single runs | - | +0.0700 |" in text
    # Scores of runs that trained on some of the images are flagged (evaluate --allow_training_overlap).
    ones = np.ones((2, 1))
    full = evaluator.summarize({"weights": ones, "tp": ones, "fp": ones, "fn": ones, "dice": ones * 0.5,
                                "iou": ones, "precision": ones, "recall": ones}, ["a"])
    assert "**Optimistic**" in eval_report.format_markdown({**full, "training_overlap": [0, 3], "num_images": 2})
    assert "Optimistic" not in eval_report.format_markdown({**full, "training_overlap": [0, 0]})


def test_calibrate_quality_per_run_and_ensemble(workdir, second_run, other_fold, tmp_path, capsys):  # noqa: F811
    # The untrained run's masks are poor: every photo counts as good at good_dice=0, so the rule keeps keep_good.
    out = tmp_path / "q.json"
    assert calibrate_quality.main(["calibrate_quality", f"--workdir={workdir}", f"--workdir={second_run}",
                                   "--good_dice=0", "--keep_good=0.8",
                                   f"--out={out}"]) == 0
    thresholds, record = quality.load_thresholds(out)
    assert record["mode"] == "per_run" and record["steps"] == [4, 2] and thresholds.target == "palpebral"
    report = record["report"]
    assert report["n"] == 2 * 7 and report["n_good"] == report["n"]
    # The temperature is fitted first and written beside the thresholds, where predict and evaluate find it.
    scale, scale_record = temperature.load(tmp_path / temperature.FILE, ["palpebral", "forniceal_palpebral"])
    assert all(t > 0 for t in scale) and scale_record["mode"] == "per_run"
    for t in ("palpebral", "forniceal_palpebral"):
        c = record["calibration"][t]
        assert c["after"]["ece"] <= c["before"]["ece"] + 1e-9  # fitted on these pixels: never worse
    # Retake shares by anemia status and Hb band, before and after the fairness constraint.
    fair = report["fairness"]
    assert fair["margin"] == 0.0 and fair["keep_good_used"] >= 0.8 and set(fair["before"]) >= {"anemic", "by_hgb"}
    assert sum(band["n"] for band in report["retake_share_by_hgb"].values()) == report["n"]
    printed = capsys.readouterr().out
    assert "expected calibration error" in printed and "Fairness:" in printed
    # The default place, where predict looks: beside a single run, or in the folder holding all the runs.
    assert calibrate_quality.default_out(["a/cv/fold_0"]) == f"a/cv/fold_0/{quality.THRESHOLDS_FILE}"
    assert calibrate_quality.default_out(["a/cv/fold_0", "a/cv/fold_1/"]) == f"a/cv/{quality.THRESHOLDS_FILE}"
    # The ensemble needs images none of its runs trained on.
    assert calibrate_quality.main(["calibrate_quality", f"--workdir={workdir}", f"--workdir={other_fold}",
                                   "--split=train", f"--out={tmp_path / 'e.json'}"]) == 2
    assert "trained on" in capsys.readouterr().err
