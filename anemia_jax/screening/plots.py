"""PNG figures of a screening evaluation: Bland-Altman, ROC, calibration, predicted vs measured Hgb.

Every function takes ``{label: data}`` so that several sources (ground-truth vs predicted masks, with and without
colour constancy) share one figure, writes one PNG (`anemia_jax.utils.figures`: matplotlib is optional) and returns
its path. Inputs are per-photo arrays as produced by `anemia_jax.screening.cross_validation` (NaN / -1 entries, i.e.
photos not predicted, are left out); statistics drawn come from `anemia_jax.screening.clinical_stats`, so the figures
and the tables agree.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anemia_jax.screening import clinical_stats
from anemia_jax.utils import figures

__all__ = ["bland_altman", "calibration", "predicted_vs_measured", "roc", "screening_plots"]


def bland_altman(series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | pathlib.Path, *,
                 groups: Sequence | None = None, title: str = "", num_bootstrap: int = 1000) -> pathlib.Path:
    """One Bland-Altman panel per source: difference (estimate - measured) against the mean of the two, with the
    bias and the 95% limits of agreement (shaded: their patient-bootstrap 95% intervals).

    Args:
        series: ``{label: (estimate [N], measured [N])}`` in g/dL; groups: [N] patient ids for the intervals.
    """
    plt = figures.pyplot()
    fig, axes = figures.grid(plt, len(series))
    for ax, (label, (est, ref)) in zip(axes, series.items()):
        est, ref = np.asarray(est, np.float64), np.asarray(ref, np.float64)
        a = clinical_stats.agreement(est, ref, groups, num_bootstrap=num_bootstrap)
        keep = np.isfinite(est) & np.isfinite(ref)
        mean, diff = (est[keep] + ref[keep]) / 2.0, est[keep] - ref[keep]
        ax.scatter(mean, diff, s=10, alpha=0.6, color="tab:blue")
        for value, interval, style in ((a.bias, a.bias_ci, "-"), (a.loa[0], a.loa_lo_ci, "--"),
                                       (a.loa[1], a.loa_hi_ci, "--")):
            if np.isfinite(value):
                ax.axhline(value, color="tab:red", linestyle=style, linewidth=1)
                if np.all(np.isfinite(interval)):
                    ax.axhspan(*interval, color="tab:red", alpha=0.12)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"{label}\nbias {a.bias:.2f}, LoA {a.loa[0]:.2f} to {a.loa[1]:.2f} g/dL", fontsize=9)
        ax.set_xlabel("mean of estimate and measured Hgb (g/dL)", fontsize=8)
        ax.set_ylabel("estimate - measured (g/dL)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return figures.save(fig, path)


def roc(series: Mapping[str, tuple[np.ndarray, np.ndarray, Any]], path: str | pathlib.Path, *,
        title: str = "") -> pathlib.Path:
    """ROC curves of several sources in one axes, each with its operating point.

    Args:
        series: ``{label: (scores [N], labels [N] 1/0/-1, operating point (fpr, tpr) or None)}``.
    """
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for i, (label, (scores, labels, point)) in enumerate(series.items()):
        scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
        keep = np.isfinite(scores) & (labels >= 0)
        fpr, tpr, _ = clinical_stats.roc_curve(scores[keep], labels[keep])
        auc = clinical_stats.roc_auc(scores[keep], labels[keep])
        line, = ax.plot(fpr, tpr, linewidth=1.2, label=f"{label} (AUC {auc:.3f})", color=f"C{i}")
        if point is not None and np.all(np.isfinite(point)):
            ax.plot(*point, marker="o", markersize=6, color=line.get_color(), markeredgecolor="black")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("1 - specificity", fontsize=9)
    ax.set_ylabel("sensitivity", fontsize=9)
    ax.set_title(title or "ROC (dots: operating points chosen on training folds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return figures.save(fig, path)


def calibration(series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | pathlib.Path, *,
                num_bins: int = 10, title: str = "") -> pathlib.Path:
    """Reliability diagram: observed anemia rate against mean predicted probability in equal-width bins, per
    source (marker area grows with the bin's photo count), with the diagonal of perfect calibration."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for i, (label, (probs, labels)) in enumerate(series.items()):
        b = clinical_stats.calibration_bins(probs, np.asarray(labels, np.float64), num_bins)
        filled = b["count"] > 0
        ax.plot(b["mean_predicted"][filled], b["observed_rate"][filled], color=f"C{i}", linewidth=1,
                label=f"{label} (ECE {float(b['expected_calibration_error']):.3f})")
        ax.scatter(b["mean_predicted"][filled], b["observed_rate"][filled], s=8 + 2 * b["count"][filled],
                   color=f"C{i}", alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("predicted probability of anemia", fontsize=9)
    ax.set_ylabel("observed fraction anemic", fontsize=9)
    ax.set_title(title or "Calibration (out-of-fold)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return figures.save(fig, path)


def predicted_vs_measured(series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | pathlib.Path, *,
                          who_thresholds: Sequence[float] = (12.0, 13.0), title: str = "") -> pathlib.Path:
    """One panel per source: estimated against measured Hgb, the identity line and the WHO thresholds."""
    plt = figures.pyplot()
    fig, axes = figures.grid(plt, len(series))
    for ax, (label, (est, ref)) in zip(axes, series.items()):
        est, ref = np.asarray(est, np.float64), np.asarray(ref, np.float64)
        keep = np.isfinite(est) & np.isfinite(ref)
        ax.scatter(ref[keep], est[keep], s=10, alpha=0.6)
        if keep.any():
            lo = float(min(est[keep].min(), ref[keep].min())) - 0.5
            hi = float(max(est[keep].max(), ref[keep].max())) + 0.5
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        for t in who_thresholds:
            ax.axvline(t, color="tab:red", linewidth=0.6, linestyle=":")
            ax.axhline(t, color="tab:red", linewidth=0.6, linestyle=":")
        r = np.corrcoef(est[keep], ref[keep])[0, 1] if keep.sum() > 1 and np.ptp(est[keep]) > 0 else float("nan")
        ax.set_title(f"{label}\nr = {r:.3f}, n = {int(keep.sum())}", fontsize=9)
        ax.set_xlabel("measured Hgb (g/dL)", fontsize=8)
        ax.set_ylabel("estimated Hgb (g/dL)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return figures.save(fig, path)


def screening_plots(rows: Sequence[Mapping[str, Any]], *, hgb: np.ndarray, anemic: np.ndarray, out_dir: str |
                    pathlib.Path, name: str, groups: Sequence | None = None,
                    num_bootstrap: int = 1000) -> dict[str, pathlib.Path]:
    """The four figures of `anemia_jax.screening.cross_validation.screening_table` rows, written as
    ``<out_dir>/<name>_<kind>.png``.

    Returns:
        ``{'bland_altman': path, 'roc': path, 'calibration': path, 'hgb_scatter': path}``.
    """
    out_dir = pathlib.Path(out_dir)
    reg = {r["source"]: (r["regression"].predictions, hgb) for r in rows}
    det = {r["source"]: (r["detection"].scores, anemic,
                         (1.0 - r["screening"].specificity, r["screening"].sensitivity)) for r in rows}
    return {
        "bland_altman": bland_altman(reg, out_dir / f"{name}_bland_altman.png", groups=groups,
                                     num_bootstrap=num_bootstrap, title="Out-of-fold Hgb: Bland-Altman"),
        "roc": roc(det, out_dir / f"{name}_roc.png"),
        "calibration": calibration({k: v[:2] for k, v in det.items()}, out_dir / f"{name}_calibration.png"),
        "hgb_scatter": predicted_vs_measured(reg, out_dir / f"{name}_hgb_scatter.png",
                                             title="Out-of-fold Hgb estimate vs laboratory"),
    }
