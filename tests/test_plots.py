"""Tests of anemia_jax.screening.plots and anemia_jax.evaluation.plots: the four screening figures and the training curves are written as valid PNGs
(skipped without matplotlib)."""

import numpy as np
import pytest
from PIL import Image

from anemia_jax.evaluation import plots as run_plots
from anemia_jax.screening import cross_validation
from anemia_jax.screening import plots as screening_plots


def test_screening_plots_are_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    n = 60
    groups = np.repeat([f"P{i}" for i in range(30)], 2)
    hgb = np.repeat(rng.uniform(8, 16, 30), 2)
    anemic = (hgb < 12.5).astype(np.int64)
    good = (hgb + rng.normal(0, 0.8, n))[:, None] + rng.normal(0, 0.1, (n, 2))
    noisy = good + rng.normal(0, 2.0, (n, 2))
    noisy[0] = np.nan  # an excluded photo must not break the figures
    rows = cross_validation.screening_table({"ground truth": good, "predicted": noisy}, hgb=hgb, anemic=anemic,
                                     folds=cross_validation.grouped_folds(groups, 3), groups=groups, num_bootstrap=50)
    paths = screening_plots.screening_plots(rows, hgb=hgb, anemic=anemic, out_dir=tmp_path / "figs", name="s",
                                  groups=groups, num_bootstrap=50)
    assert set(paths) == {"bland_altman", "roc", "calibration", "hgb_scatter"}
    for kind, path in paths.items():
        assert path == tmp_path / "figs" / f"s_{kind}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 200 and image.size[1] > 200
            assert np.asarray(image.convert("L")).std() > 5  # something was drawn


def test_missing_matplotlib_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"anemia_jax\[report\]"):
        screening_plots.roc({"x": (np.array([0.1, 0.9]), np.array([0, 1]), None)}, "unused.png")


def test_training_curves_draw_each_run(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"split": "train", "step": s, "loss": 1.0 / s} for s in range(10, 200, 10)]
    records += [{"split": "val", "step": s, "dice/mean": 1 - 1.0 / s} for s in (50, 100, 150)]
    no_val = [r for r in records if r["split"] == "train"]  # a run stopped before its first evaluation
    path = run_plots.training_curves({"a": records, "b": no_val}, tmp_path / "curves.png", title="t")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"))
    assert gray.shape[1] > gray.shape[0] > 200 and gray.std() > 5
    blank = run_plots.training_curves({}, tmp_path / "blank.png")  # no run: empty axes, still a figure
    with Image.open(blank) as image:
        assert np.asarray(image.convert("L")).std() < gray.std()
