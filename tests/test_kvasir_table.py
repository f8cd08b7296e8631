"""The Kvasir-SEG table's statistics (experiments.paired_stats) and the table command (experiments.kvasir_table) on
synthetic per-image scores: no training; the panel uses the shared tiny run of _tiny_run.py."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture
from scipy import stats

from experiments import kvasir_panel, kvasir_table, paired_stats

# ---------------------------------------------------------------------------------------------- statistics


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(200):
        x = rng.beta(5, 2, size=120)  # skewed like per-image Dice; true mean 5/7
        covered += not paired_stats.bootstrap_mean_ci(x, resamples=1000, seed=k).excludes(5 / 7)
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_interval_has_the_normal_width_and_is_reproducible():
    x = np.random.default_rng(2).normal(0.8, 0.2, size=120)
    ci = paired_stats.bootstrap_mean_ci(x, seed=3)
    assert ci.mean == pytest.approx(x.mean()) and ci.n == 120 and ci.low < ci.mean < ci.high
    half = 1.96 * x.std(ddof=1) / np.sqrt(120)
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.1)
    assert paired_stats.bootstrap_mean_ci(x, seed=3) == ci


def test_paired_comparison_resolves_a_shift_that_unpaired_intervals_cannot():
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.3, 1.0, size=120)  # what both models share per image
    b = difficulty
    a = difficulty + 0.02 + rng.normal(0, 0.02, size=120)
    ci_a, ci_b = paired_stats.bootstrap_mean_ci(a), paired_stats.bootstrap_mean_ci(b)
    assert ci_a.low < ci_b.high  # the separate intervals overlap...
    c = paired_stats.paired_comparison(a, b)
    assert c.difference.low > 0  # ...the paired one does not
    assert c.difference.mean == pytest.approx(np.mean(a - b))
    assert c.wilcoxon_p == pytest.approx(stats.wilcoxon(a, b).pvalue) and c.wilcoxon_p < 1e-6
    assert c.wins + c.ties + c.losses == 120 and c.wins > c.losses
    assert kvasir_table.verdict(c.difference, "U-Net").startswith("higher")


def test_paired_comparison_of_noise_contains_zero_and_of_identical_scores_is_p_one():
    rng = np.random.default_rng(5)
    b = rng.uniform(0.3, 1.0, size=120)
    c = paired_stats.paired_comparison(b + rng.normal(0, 0.03, size=120), b)
    assert not c.difference.excludes(0.0) and c.wilcoxon_p > 0.05
    assert kvasir_table.verdict(c.difference, "U-Net").startswith("not resolved")
    same = paired_stats.paired_comparison(b, b)
    assert same.wilcoxon_p == 1.0 and same.ties == 120 and same.difference.low == same.difference.high == 0.0


def test_holm_adjustment():
    assert paired_stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert paired_stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert paired_stats.holm([0.02]) == [0.02]


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        paired_stats.bootstrap_mean_ci([0.5, np.inf])
    with pytest.raises(ValueError, match="same images"):
        paired_stats.paired_comparison([0.5, 0.6], [0.5])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        paired_stats.holm([0.5, 1.5])


# ---------------------------------------------------------------------------------------------- the table


def _write_row(results, name, dice, *, index=None, step=99, cpu_s=(3600.0, 36.0), hd95=None, target="mask"):
    folder = results / name
    (folder / "test").mkdir(parents=True)
    index = np.arange(len(dice)) if index is None else index
    hd95 = np.full(len(dice), 5.0) if hd95 is None else hd95
    with open(folder / "test" / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "patient_id", "country", *(f"{k}/{target}" for k in ("has_mask", "dice", "iou", "hd95"))])
        for i, d, h in zip(index, dice, hd95):
            w.writerow([i, f"img{i}", "", 1, d, d / (2 - d), h])
    (folder / "test" / "summary.json").write_text(json.dumps(
        {"checkpoint": {"step": step}, "threshold": 0.5, "targets": {target: {"pooled_dice": float(np.mean(dice))}}}))
    (folder / "training_summary.json").write_text(json.dumps({"step": 198, "num_params": 2_000_000}))
    (folder / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": step, f"dice/{target}": 0.8}) + "\n")
    with open(folder / "runs.jsonl", "w") as f:
        for label, s in zip(("train", "evaluate"), cpu_s):
            f.write(json.dumps({"label": label, "cpu_s": s, "wall_s": 2 * s, "load_1min_mean": 3.0,
                                "git": {"git_commit": "abcdef123"}, "start_utc": "t0", "end_utc": "t1"}) + "\n")


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(6)
    base = rng.uniform(0.4, 1.0, size=40)
    _write_row(tmp_path, "unet", base, hd95=np.r_[np.full(39, 5.0), np.inf])
    worse = np.clip(base - 0.1 + rng.normal(0, 0.02, 40), 0, 1)
    order = rng.permutation(40)  # the same images in another order: aligned by index
    _write_row(tmp_path, "unetpp", worse[order], index=order)
    _write_row(tmp_path, "unet_dice", np.clip(base + rng.normal(0, 0.02, 40), 0, 1))
    return tmp_path


def _run_table(results, *extra):
    return kvasir_table.main(["kvasir_table", f"--results={results}", "--resamples=500", "--no_flops", *extra])


def test_table_reports_intervals_paired_verdicts_and_costs(results):
    assert _run_table(results) == 0
    out = json.loads((results / "table.json").read_text())
    rows, comparisons = {s["name"]: s for s in out["rows"]}, {c["row"]: c for c in out["comparisons"]}
    assert [s["name"] for s in out["rows"]] == ["unet", "unetpp", "unet_dice"]  # ROWS order
    assert rows["unet"]["hd95_undefined"] == 1 and rows["unet"]["hd95_median"] == 5.0
    assert rows["unetpp"]["dice_ci"][0] < rows["unetpp"]["dice_mean"] < rows["unetpp"]["dice_ci"][1]
    assert comparisons["unetpp"]["difference_ci"][1] < 0 and comparisons["unetpp"]["verdict"].startswith("lower")
    assert comparisons["unetpp"]["dice_difference"] == pytest.approx(-0.1, abs=0.01)
    assert comparisons["unet_dice"]["verdict"].startswith("not resolved")
    # one comparison per group: Holm leaves a family of one unchanged
    assert comparisons["unetpp"]["wilcoxon_p_holm"] == comparisons["unetpp"]["wilcoxon_p"]
    assert rows["unet"]["cost"]["cpu_h"] == pytest.approx(1.01) and rows["unet"]["cost"]["cpu_s_per_step"] == \
        pytest.approx(3600 / 198)
    assert rows["unet"]["best_val_dice"] == 0.8 and rows["unet"]["params"] == 2_000_000
    md = (results / "table.md").read_text()
    assert "UNet++ (deep supervision)" in md and "Recipe on U-Net" in md and "CPU-scale" in md
    assert (results / "dice_ci.png").stat().st_size > 0


def test_table_refuses_rows_scored_on_other_images_and_a_missing_reference(results, capsys):
    _write_row(results, "segformer", np.full(40, 0.5), index=np.arange(1, 41))
    assert _run_table(results) == 2
    assert "different test images" in capsys.readouterr().err
    assert _run_table(results, "--reference=attention_unet") == 2
    assert "No scored row 'attention_unet'" in capsys.readouterr().err
    assert _run_table(results / "nothing") == 2


def test_panel_draws_the_same_images_for_every_model(workdir, tmp_path):  # noqa: F811 -- fixture
    """Two model rows pointing at the tiny run, scored on its validation images: the panel restores both."""
    from anemia_jax.data import loading
    from anemia_jax.runs import restore

    config = restore.load_config(workdir)
    target = config.targets[0]
    _, _, val = loading.eval_split(config, "val")
    results, root = tmp_path / "results", tmp_path / "runs"
    root.mkdir()
    rng = np.random.default_rng(7)
    for name in ("unet", "unetpp"):
        _write_row(results, name, rng.uniform(0, 1, len(val)), index=val, step=2, target=target)
        os.symlink(workdir, root / name)
    rows = kvasir_table.find_rows(results, target)
    result = kvasir_table.analyse(rows, reference="unet", target=target, resamples=200, seed=0)
    chosen = kvasir_panel.choose_images(result, rows)
    assert [k for _, k in chosen] == ["best"] * 2 + ["median"] * 2 + ["worst"] * 2
    assert len({i for i, _ in chosen}) == 6 and {i for i, _ in chosen} <= set(val.tolist())
    mean = {int(i): (a + b) / 2 for i, a, b in zip(rows[0].index, rows[0].scores["dice"],
                                                    kvasir_table._aligned(rows[1], rows[0])[0])}
    assert mean[chosen[0][0]] == max(mean.values()) and mean[chosen[-1][0]] == min(mean.values())
    path = kvasir_panel.panel_figure(rows, result, root, results / "panel.png", target=target, split="val")
    assert path.stat().st_size > 0
