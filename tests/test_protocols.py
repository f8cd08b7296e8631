"""Tests of experiments/protocols.py: the aggregation math on fabricated summary.json files, the fold runner's
jobs, workdirs, reuse and overrides with a fake trainer (no training here), its command line (the project's one
flag grammar), and the git state that every result record carries (experiments/provenance.py) in a throwaway
repository."""

from __future__ import annotations

import json
import math
import pathlib

import _children
import ml_collections
import numpy as np
import pytest

from anemia_jax.runs import config_lib
from experiments import protocols, provenance

REPO = pathlib.Path(__file__).resolve().parents[1]


def _summary(dice_a, dice_b, hd95="NaN", step=10, status="completed"):
    scores = {"dice/a": dice_a, "dice/b": dice_b, "dice/mean": (dice_a + dice_b) / 2, "iou/a": dice_a / 2,
              "iou/b": dice_b / 2, "hd95/a": hd95, "hd95/b": 1.0, "hd95_infinite/a": 0, "num_images/a": 5}
    return {"status": status, "step": step, "wall_time_s": 1.0, "final": {"step": step, "val": scores},
            "best": {"step": step - 1, "val": {**scores, "dice/a": 0.0}, "test": scores}}


def test_aggregate_mean_and_sample_std():
    records = [{"group": "unet", "run": f"fold_{k}", "summary": _summary(d, 0.5, hd95=h)}
               for k, (d, h) in enumerate([(0.4, 2.0), (0.5, "NaN"), (0.6, 4.0)])]
    records += [{"group": "unetpp", "run": "fold_0", "summary": _summary(0.9, 0.7, hd95="Infinity")}]
    agg = protocols.aggregate(records, which="final", split="val")
    assert agg["targets"] == ["a", "b"]
    a = agg["groups"]["unet"]["targets"]["a"]
    assert a["dice"]["mean"] == pytest.approx(0.5) and a["dice"]["n"] == 3
    assert a["dice"]["std"] == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
    assert a["iou"]["mean"] == pytest.approx(0.25)
    # The undefined (NaN) HD95 of fold 1 is left out of the mean and counted.
    assert a["hd95"]["mean"] == pytest.approx(3.0) and a["hd95"]["n"] == 2
    assert a["hd95"]["std"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(a["precision"]["mean"]) and a["precision"]["n"] == 0  # absent from the summaries
    single = agg["groups"]["unetpp"]["targets"]["a"]["dice"]
    assert single["mean"] == pytest.approx(0.9) and math.isnan(single["std"])
    table = protocols.format_table(agg)
    assert "| unet | a | 3 | 0.5000 ± 0.1000 | 0.2500 ± 0.0500 | n/a | n/a | 3.00 ± 1.41 (2/3) |" in table
    assert "| unetpp | a | 1 | 0.9000 |" in table
    assert "| unet | fold_1 | 10 | a | 0.5000 |" in table
    best = protocols.aggregate(records, which="best", split="test")
    assert best["groups"]["unet"]["targets"]["a"]["dice"]["mean"] == pytest.approx(0.5)
    assert protocols.aggregate(records, which="best", split="val")["groups"]["unet"]["targets"]["a"]["dice"][
        "mean"] == 0.0
    # Rows follow the config's target order when the records carry it (summary.json files have sorted keys).
    ordered = [{**r, "targets": ["b", "a", "not_scored"]} for r in records]
    assert protocols.aggregate(ordered)["targets"] == ["b", "a"]


def test_aggregate_refuses_unfinished_or_missing():
    with pytest.raises(ValueError, match="preempted"):
        protocols.aggregate([{"group": "g", "run": "r", "summary": _summary(0.1, 0.2, status="preempted")}])
    with pytest.raises(KeyError, match="test"):
        protocols.aggregate([{"group": "g", "run": "r", "summary": _summary(0.1, 0.2)}], which="final", split="test")
    with pytest.raises(ValueError, match="No runs"):
        protocols.aggregate([])


@pytest.fixture
def config():
    return config_lib.load_config_file(f"{REPO}/configs/unetpp.py:data=phantom,test")


def test_jobs_and_overrides(config):
    config = protocols.with_overrides(config, {"model.features": 8, "optimizer.learning_rate": 3e-4,
                                               "image_size": (64, 64), "dataset.data_dir": "/tmp/x",
                                               "loss.deep_supervision_weights": (0.3, 0.7)})
    assert (config.model.features, config.optimizer.learning_rate) == (8, 3e-4)
    assert tuple(config.image_size) == (64, 64) and config.dataset.data_dir == "/tmp/x"
    with pytest.raises(ValueError, match="model.features"):
        protocols.with_overrides(config, {"model.featurs": 8})
    jobs = protocols.kfold_jobs(config, "unetpp", 3)
    assert [(j.run, j.config.split.fold, j.config.split.num_folds) for j in jobs] == [
        ("fold_0", 0, 3), ("fold_1", 1, 3), ("fold_2", 2, 3)]
    assert config.split.fold == 0 and jobs[2].config.model.features == 8
    loco = protocols.loco_jobs(config, "unetpp", ["PhantomA", "PhantomB"])
    assert [(j.config.split.protocol, j.config.split.test_country) for j in loco] == [
        ("loco", "PhantomA"), ("loco", "PhantomB")]
    for j in jobs + loco:
        config_lib.validate(j.config)
    ft = protocols.with_loss(config, "focal_tversky")
    assert ft.loss.name == "focal_tversky" and tuple(ft.loss.deep_supervision_weights) == (0.3, 0.7)
    config_lib.validate(ft)
    with pytest.raises(ValueError, match="presets"):
        protocols.with_loss(config, "dice_only")


def test_run_jobs_trains_each_fold_once_and_reuses(config, tmp_path):
    calls = []

    def fake_train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
        calls.append((cfg.loss.name, cfg.split.fold, workdir))
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict()))
        summary = _summary(0.1 * (cfg.split.fold + 1), 0.5)
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    records = protocols.run_jobs(protocols.kfold_jobs(config, "unetpp", 3), tmp_path, train_fn=fake_train)
    assert [c[1] for c in calls] == [0, 1, 2]
    assert [pathlib.Path(r["workdir"]).relative_to(tmp_path).as_posix() for r in records] == [
        "unetpp/fold_0", "unetpp/fold_1", "unetpp/fold_2"]
    agg = protocols.aggregate(records)
    assert agg["groups"]["unetpp"]["targets"]["a"]["dice"]["mean"] == pytest.approx(0.2)
    # compare: the cross-entropy + Dice arm IS the config's own loss, so its folds are reused, not retrained.
    jobs = (protocols.kfold_jobs(protocols.with_loss(config, "ce_dice"), "unetpp ce_dice", 3)
            + protocols.kfold_jobs(protocols.with_loss(config, "focal_tversky"), "unetpp focal_tversky", 3))
    records = protocols.run_jobs(jobs, tmp_path, train_fn=fake_train)
    assert [c[0] for c in calls[3:]] == ["focal_tversky"] * 3
    assert [r["reused"] for r in records] == [True] * 3 + [False] * 3
    assert records[0]["workdir"].endswith("unetpp/fold_0")
    assert {r["group"] for r in protocols.load_records([tmp_path])} == {"unetpp", "unetpp-focal_tversky"}
    assert [r["group"] for r in protocols.load_records([tmp_path], ["unetpp"])] == ["unetpp"] * 3
    # A workdir holding another config's run is never overwritten.
    changed = protocols.kfold_jobs(protocols.with_overrides(config, {"batch_size": 16}), "unetpp", 1)
    with pytest.raises(FileExistsError, match="different config"):
        protocols.run_jobs(changed, tmp_path, train_fn=fake_train)


def test_aggregate_command_writes_table_and_record(config, tmp_path):
    for k, d in enumerate([0.2, 0.4]):
        workdir = tmp_path / "runs" / "unet" / f"fold_{k}"
        workdir.mkdir(parents=True)
        (workdir / "summary.json").write_text(json.dumps(_summary(d, 0.5)))
    assert protocols.main(["protocols", "--mode=aggregate", f"--runs={tmp_path / 'runs'}",
                           f"--out={tmp_path / 'out'}", "--name=t", "--note=fabricated"]) == 0
    text = (tmp_path / "out" / "t.md").read_text()
    assert "| unet | a | 2 | 0.3000 ± 0.1414 |" in text
    assert "git commit:" in text and "wall time:" in text and "fabricated" in text
    record = json.loads((tmp_path / "out" / "t.json").read_text())
    assert record["provenance"]["command"].startswith("python -m experiments.protocols --mode=aggregate")
    assert record["provenance"]["machine"]["cpu_count"] >= 1
    assert {"git_commit", "git_uncommitted_changes", "git_changed_paths", "git_changed_paths_total"} <= set(
        record["provenance"])
    assert np.isclose(record["aggregate"]["groups"]["unet"]["targets"]["a"]["dice"]["mean"], 0.3)


def test_command_line_configs_models_and_overrides(tmp_path, capsys, monkeypatch):
    # Parsing only: the configs --mode=cv would train, with the overrides applied to each of them.
    seen = []
    monkeypatch.setattr(protocols, "run_jobs", lambda jobs, root: seen.extend(jobs) or [])
    monkeypatch.setattr(protocols, "aggregate", lambda *a, **k: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        protocols.main(["protocols", "--mode=cv", f"--config={REPO}/configs/unet.py:data=phantom,test",
                        "--models=unetpp", "--folds=2", "--config.model.features=8", f"--out={tmp_path}"])
    assert [(j.group, j.run) for j in seen] == [("unet", "fold_0"), ("unet", "fold_1"), ("unetpp", "fold_0"),
                                                 ("unetpp", "fold_1")]
    assert {j.config.model.features for j in seen} == {8} and seen[2].config.model.name == "unetpp"
    assert tuple(seen[2].config.loss.deep_supervision_weights) == (0.5, 0.5)  # the model's own loss fields
    assert protocols.main(["protocols", "--mode=cv", f"--config={REPO}/configs/unet.py:data=phantom,test",
                           "--config.model.features=2.5", f"--out={tmp_path}"]) == 2
    assert "features" in capsys.readouterr().err
    assert protocols.main(["protocols", "--mode=cv", f"--config={REPO}/configs/unet.py:data=phantom,test",
                           "--config.model.featurs=8", f"--out={tmp_path}"]) == 2
    assert "close keys: model.features" in capsys.readouterr().err
    assert protocols.main(["protocols", "--mode=cv", f"--out={tmp_path}"]) == 2
    assert "--config=configs/<model>.py" in capsys.readouterr().err


def _git(repo: pathlib.Path, *args: str) -> None:
    result = _children.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                            *args], cwd=repo, budget_s=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_git_state_counts_untracked_not_ignored(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("ignored/\n*.log\n")
    (repo / "a.py").write_text("a = 1\n")
    (repo / "b.py").write_text("b = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    head = _children.run(["git", "rev-parse", "HEAD"], cwd=repo, text=True, budget_s=60).stdout.strip()
    clean = provenance.git_state(repo)
    assert clean == {"git_commit": head, "git_uncommitted_changes": False, "git_changed_paths": [],
                     "git_changed_paths_total": 0}
    # Ignored files (environments, run outputs) are not code changes.
    (repo / "ignored").mkdir()
    (repo / "ignored" / "x.py").write_text("")
    (repo / "run.log").write_text("")
    assert provenance.git_state(repo)["git_uncommitted_changes"] is False
    # An untracked new module IS a change: a rerun from the commit would not have it.
    (repo / "new module.py").write_text("")
    state = provenance.git_state(repo)
    assert state["git_uncommitted_changes"] is True and state["git_changed_paths"] == ["?? new module.py"]
    # A modified tracked file and a staged rename (one entry, not two).
    (repo / "a.py").write_text("a = 2\n")
    _git(repo, "mv", "b.py", "c.py")
    state = provenance.git_state(repo)
    assert state["git_changed_paths"] == [" M a.py", "?? new module.py", "R  c.py"]
    assert state["git_changed_paths_total"] == 3 and state["git_commit"] == head
    capped = provenance.git_state(repo, max_paths=1)
    assert capped["git_changed_paths"] == [" M a.py"] and capped["git_changed_paths_total"] == 3
    machine = {"platform": "p", "cpu_count": 1, "load_average_1_5_15min": None, "jax": "0", "num_devices": 1,
               "backend": "cpu", "device_kind": "cpu"}
    record = {"command": "c", "date_utc": "d", "machine": machine, "wall_time_s": 1.0}
    text = provenance.to_markdown({**record, **capped})
    assert f"{head} plus uncommitted changes to 3 path(s): ` M a.py`" in text
    # Outside a repository the state is unknown, never reported as clean.
    (tmp_path / "plain").mkdir()
    unknown = provenance.git_state(tmp_path / "plain")
    assert unknown["git_commit"] == "unknown" and unknown["git_uncommitted_changes"] is None
    assert "state unknown" in provenance.to_markdown({**record, **unknown})
