"""Smoke tests of experiments/pruning_table.py, screening_run.py and training_curves.py on the tiny UNet++ run of
tests/_tiny_run.py (untrained parameters, so only the tables' structure and counts are checked, not their scores);
the log parsing of suite_time.py and the variants and table of compile_breakdown.py, which measure without a model."""

from __future__ import annotations

import json
import math

import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax.screening.features import FeatureSpec
from experiments import (
    compile_breakdown,
    pruning_table,
    screening_heldout,
    screening_run,
    suite_time,
    training_curves,
)


def test_pruning_table_rows(workdir, tmp_path):  # noqa: F811 -- the fixture
    assert pruning_table.main(["pruning_table", f"--workdir={workdir}", f"--out={tmp_path}", "--batch=8",
                               "--repeats=1"]) == 0
    record = json.loads((tmp_path / "pruning.json").read_text())
    rows = {r["network"]: r for r in record["rows"]}
    assert list(rows) == ["full", "L1", "L2"]  # the tiny config has depth 2
    assert all(r["images_per_s"] > 0 and r["parameters"] > 0 and r["num_images"] > 0 for r in rows.values())
    assert all(math.isfinite(r["gflops_per_image"]) and r["gflops_per_image"] > 0 for r in rows.values())
    # Every level adds nodes; the full network computes every node of L2 (plus the shallower heads).
    assert rows["L1"]["gflops_per_image"] < rows["L2"]["gflops_per_image"] <= rows["full"]["gflops_per_image"]
    assert rows["L1"]["parameters"] < rows["L2"]["parameters"] <= rows["full"]["parameters"]
    assert set(rows["L1"]["dice"]) == {"palpebral", "forniceal_palpebral"}
    text = (tmp_path / "pruning.md").read_text()
    assert "| full |" in text and "| L1 |" in text and "| L2 |" in text
    assert record["provenance"]["command"].startswith("python -m experiments.pruning_table --workdir=")


def test_screening_run_rows(workdir, tmp_path):  # noqa: F811 -- the fixture
    assert screening_run.main(["screening_run", f"--runs={workdir}", f"--out={tmp_path}", "--name=s",
                               "--bootstrap=50", "--constancy=none,grey_world", "--heldout_data=res64_heldout",
                               "--heldout_constancy=none", "--artifact_constancy=none"]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    rows = {r["source"]: r for r in record["rows"]}
    # The untrained model's masks may leave grey-world no reference pixels: such a source is dropped, with a reason.
    dropped = record["context"]["dropped_sources"]
    assert [*rows, *dropped] == ["ground-truth mask", "ground-truth mask, grey-world", "predicted mask",
                                 "predicted mask, grey-world"][:len(rows)] + list(dropped)
    assert {"ground-truth mask", "predicted mask"} <= set(rows) and set(rows).isdisjoint(dropped)
    photos = record["context"]["num_photos"]
    assert photos > 0 and record["target"] == "palpebral"
    for r in rows.values():
        # Every held-out photo is either used or counted as excluded for a named reason.
        assert 0 < r["n_hgb"] <= photos and 0 < r["n_anemia"] <= photos and 0 <= r["n_positive"] <= r["n_anemia"]
        assert r["n_hgb"] + r["n_unknown_hgb"] + r["n_missing_features"] <= photos
    # Both rows are on the same photos (common_examples): they differ only by the masks.
    assert rows["ground-truth mask"]["n_hgb"] == rows["predicted mask"]["n_hgb"]
    text = (tmp_path / "s.md").read_text()
    assert all(f"| {source} |" in text for source in rows)
    # The screening model beside the table loads and screens the photos it was fitted on.
    from anemia_jax.screening import screening_model  # noqa: PLC0415

    model = screening_model.load(tmp_path / "s_model.json")
    assert model.constancy == "none" and model.feature_spec.target == "palpebral"
    assert model.training["n_hgb"] == rows["predicted mask"]["n_hgb"] or model.training["n_excluded_no_features"]
    for figure in record["figures"] + record["heldout"]["figures"]:
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
    # The held-out photos (another phantom seed): ground truth, the single run and the "ensemble" (of that one run)
    # on the same 16 photos, and the saved model checked on them from each run's probabilities.
    held = record["heldout"]
    assert held["data"]["num_photos"] == 16 and held["data"]["builder_config"] == "res64_heldout"
    sources = [r["source"] for r in held["rows"]] + list(held["context"]["dropped_sources"])
    assert sorted(sources) == sorted(["ground-truth mask", "run mask", "fold ensemble mask"])
    assert [c["source"] for c in held["artifact_check"]] == ["run mask", "fold ensemble mask"]
    assert held["artifact_check"][0]["n"] == held["artifact_check"][1]["n"]
    assert "## Fold ensemble vs single folds, on held-out photos" in text
    # Photos the run trained on are not held out.
    with pytest.raises(ValueError, match="not held out"):
        screening_heldout.heldout_masks([workdir], FeatureSpec(feature_size=(32, 32)), builder_config="res64",
                                        tfds_split="train", checkpoint="latest")


def test_training_curves_of_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"split": "train", "step": s, "loss": 1.0 / s}) for s in (10, 20, 30)]
    lines += [json.dumps({"split": "val", "step": 30, "dice/mean": 0.5}), '{"split": "tra']  # cut short by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines))
    out = tmp_path / "curves.png"
    assert training_curves.main(["training_curves", f"--workdir={run}", "--labels=tiny", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert training_curves.main(["training_curves", f"--workdir={tmp_path}", f"--out={out}"]) == 2  # no run there
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_suite_time_reads_a_durations_log():
    log = """........ [100%]
============================= slowest durations =============================
30.50s call     tests/test_train.py::test_interrupted_runs_end_like_an_uninterrupted_one
20.00s setup    tests/test_train.py::test_run_leaves_outputs
4.25s call     tests/test_steps.py::test_eight_devices_match_one_device[unet-kwargs0]
0.25s teardown tests/test_steps.py::test_eight_devices_match_one_device[unet-kwargs0]
(3 durations < 0.005s hidden.  Use -vv to show these durations.)
====== 3 passed, 1 skipped, 2 warnings in 40.12s (0:00:40) ======
"""
    result = suite_time.parse(log)
    assert result["summary"] == "3 passed, 1 skipped, 2 warnings in 40.12s (0:00:40)"
    assert result["sum_of_test_seconds"] == 55.0
    assert result["files"] == [{"file": "tests/test_train.py", "seconds": 50.5, "tests": 1},
                               {"file": "tests/test_steps.py", "seconds": 4.5, "tests": 1}]
    assert result["longest"][0] == {"seconds": 30.5, "phase": "call",
                                    "test": "tests/test_train.py::test_interrupted_runs_end_like_an_uninterrupted_one"}
    assert result["longest"][-1]["test"].endswith("[unet-kwargs0]")


def test_compile_breakdown_variants_and_table():
    import pathlib

    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for variant in compile_breakdown.VARIANTS.values():  # every variant names a config and an optimizer it builds
        assert (configs / f"{variant['arch']}.py").exists()
        assert variant["optimizer"] in {"trainer", "adam", "sgd", "flat_trainer", "flat_adam"}
    row = {"variant": "unet_adam_no_fusion_emitters", "lower_s": 1.0, "compile_s": 4.3, "compile_cpu_s": 8.12,
           "fusions": 812}
    assert ("| unet_adam_no_fusion_emitters | adam | 1 | no | --xla_cpu_use_fusion_emitters=false | 1.00 | 4.30 | "
            "8.12 | 812 |") in compile_breakdown.table([row])
