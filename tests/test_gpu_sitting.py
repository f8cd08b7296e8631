"""The GPU sitting's planner, bundle and table (experiments/gpu/sitting.py) on synthetic files made here.

The sitting itself is rehearsed end to end on a CPU by hand (experiments/gpu/NOTES.md); these check the arithmetic
that sizes the Kvasir-SEG runs to the time left, that the bundle keeps within what comes back from the device, and
that the table compares each figure with its target and labels a non-GPU sitting a rehearsal.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _sitting():
    spec = importlib.util.spec_from_file_location("experiments_gpu_sitting", REPO / "experiments/gpu/sitting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bench(model, ours_rate, eager, compile_, cold=40.0, warm=5.0):
    return [{"framework": "anemia_jax", "arch": model, "images_per_s": ours_rate, "batch": 32, "size": 256,
             "dtype": "bfloat16", "first_step_cold_s": cold, "first_step_warm_s": warm},
            {"framework": "torch", "images_per_s": eager}, {"framework": "torch+compile", "images_per_s": compile_}]


def test_plan_fits_the_time_left():
    s = _sitting()
    rows = _bench("unetpp", 1000.0, 500.0, 650.0, cold=40.0)
    kw = dict(batch=16, concurrent=2, rate_factor=0.35, eval_s=50.0, reserve_s=20.0, evals=10)
    plan = s.plan_kvasir("unetpp", 300.0, rows, **kw)
    # 300 s - 20 - 50 - (1.3 * 40 + 35) = 143 s at 350 img/s.
    assert plan["overhead_s"] == 87.0 and plan["train_s"] == 143.0
    assert plan["steps"] == int(143.0 * 350.0 / 16) and plan["rate_source"] == "this sitting's benchmark"
    assert plan["train_deadline_s"] == 230 and plan["eval_every"] == -(-plan["steps"] // 10)
    assert s.plan_kvasir("unetpp", 600.0, rows, **kw)["steps"] > plan["steps"]
    short = s.plan_kvasir("unetpp", 60.0, [], **kw)  # no benchmark row, no time: one epoch, assumed figures
    assert short["steps"] == 50 and short["rate_source"].startswith("H100") and short["train_deadline_s"] == 30
    assert s.plan_kvasir("unet", 300.0, rows, steps=7, **kw)["steps"] == 7


def test_bundle_leaves_out_checkpoints_and_old_panels(tmp_path):
    s = _sitting()
    run = tmp_path / "kvasir_unet"
    (run / "checkpoints/10").mkdir(parents=True)
    (run / "checkpoints/10/state").write_bytes(b"x" * 1000)
    (run / "panels").mkdir()
    for step in (5, 10):
        (run / f"panels/step_{step:07d}.png").write_bytes(b"png")
    (run / "eval_test").mkdir()
    (run / "eval_test/per_image.csv").write_text("index,dice/mask\n0,0.5\n")
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "train_unet.log").write_text("log\n")
    s.bundle(tmp_path, tmp_path / "k.tar.gz")
    names = set(tarfile.open(tmp_path / "k.tar.gz").getnames())
    assert names == {"train_unet.log", "kvasir_unet/metrics.jsonl", "kvasir_unet/eval_test/per_image.csv",
                     "kvasir_unet/panels/step_0000010.png"}


def test_table_compares_with_targets_and_labels_rehearsals(tmp_path):
    s = _sitting()
    record = {
        "env": {"platform": "gpu", "card": "NVIDIA H200, 143771 MiB", "versions": {"jax": "0.11.2"}},
        "benchmark": {"unetpp": _bench("unetpp", 1000.0, 500.0, 600.0, cold=70.0, warm=5.0),
                      "unet": _bench("unet", 1200.0, 1000.0, 1100.0)[:2]},
        "kvasir": {"unetpp": {"trainer": {"status": "completed", "step": 2000, "epochs": 40.0},
                              "test": {"dice": 0.87, "iou": 0.8, "checkpoint": {"chosen_as": "best"}}}},
    }
    targets, table = s.targets_and_table(record)
    by = {t["what"]: t for t in targets}
    assert by["UNet++ img/s >= 1.5x torch compile"]["met"] and by["UNet++ first step cold < 60 s"]["met"] is False
    assert by["U-Net img/s >= 1.3x torch eager"]["met"] is False  # 1.2x
    kvasir = by["Kvasir-SEG UNet++ test Dice >= 0.86"]
    assert kvasir["met"] and kvasir["epochs"] == 40
    assert "1.67x" in table and "0.8700" in table and "REHEARSAL" not in table
    assert table.splitlines()[-1].startswith("targets met: 5 of 7")
    record["env"]["platform"] = "cpu"
    assert "REHEARSAL" in s.targets_and_table(record)[1]
    json.dumps(targets)  # the record stays JSON


def test_git_record_falls_back_to_the_stamp_and_checks_it(tmp_path, monkeypatch):
    s = _sitting()
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(s, "REPO", tmp_path)
    monkeypatch.setattr(s, "STAMP", tmp_path / ".device/git_state.json")
    monkeypatch.setattr(s, "_provenance", lambda: type("P", (), {"git_state": staticmethod(
        lambda: {"git_commit": "unknown", "git_uncommitted_changes": None})}))
    assert "no .device/git_state.json" in s.git_record()["stamp"]
    (tmp_path / ".device").mkdir()
    s.STAMP.write_text(json.dumps({"git_commit": "abc", "files": ["a.py"], "tree_sha256": s.tree_digest(["a.py"])}))
    assert s.git_record()["git_commit"] == "abc" and s.git_record()["tree_matches_stamp"]
    (tmp_path / "a.py").write_text("x = 2\n")
    record = s.git_record()
    assert not record["tree_matches_stamp"] and record["git_commit"].startswith("unknown (files differ")
