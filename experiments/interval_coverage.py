"""Coverage of the clinical statistics' 95% intervals at small n, by simulation (`anemia_jax.screening.clinical_stats`).

    python -m experiments.interval_coverage --out=experiments/results/interval_coverage [--sims=400] [--seed=0]
        [--bootstrap=2000]

For each n, ``--sims`` data sets of n independent photos (one per patient) are drawn and every interval is checked
against the truth it estimates:

* limits of agreement: differences ~ Normal(0.3, 1.1^2) g/dL; the true upper limit is 0.3 + 1.96 x 1.1. Intervals:
  patient-bootstrap percentile (``--bootstrap`` replicates), Bland & Altman 1986, exact (Carkeet 2015).
* Pearson r: (estimate, reference) bivariate normal with correlation 0.8. Intervals: bootstrap, Fisher z.
* ROC AUC: scores Normal(0, 1) for n/2 negatives and Normal(1.19, 1) for n/2 positives (true AUC = Phi(1.19 /
  sqrt 2) = 0.800). Intervals: bootstrap, DeLong.

Coverage is the share of data sets whose interval contains the truth; its Monte Carlo standard error at 95% and 400
data sets is about 1.1 points. `simulate` is also what tests/test_clinical_stats.py runs (with fewer data sets).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from anemia_jax.screening import clinical_stats

__all__ = ["simulate"]

BIAS, SD, RHO, SEPARATION = 0.3, 1.1, 0.8, 1.19


def _covers(interval, truth: float) -> float:
    lo, hi = interval
    return float(lo <= truth <= hi) if np.isfinite(lo) and np.isfinite(hi) else float("nan")


def simulate(n: int, sims: int, *, seed: int = 0, bootstrap: int = 2000) -> dict[str, Any]:
    """Coverage of each 95% interval over ``sims`` simulated data sets of ``n`` photos (module docstring)."""
    rng = np.random.default_rng(seed)
    upper = BIAS + 1.96 * SD
    auc_true = float(scipy.stats.norm.cdf(SEPARATION / np.sqrt(2.0)))
    hits: dict[str, list[float]] = {k: [] for k in ("loa_bootstrap", "loa_ba86", "loa_exact", "r_bootstrap",
                                                    "r_fisher", "auc_bootstrap", "auc_delong")}
    for k in range(sims):
        ref = rng.normal(12.0, 1.5, n)
        est = ref + rng.normal(BIAS, SD, n)
        a = clinical_stats.agreement(est, ref, num_bootstrap=bootstrap, seed=k)
        hits["loa_bootstrap"].append(_covers(a.loa_hi_ci, upper))
        hits["loa_ba86"].append(_covers(a.loa_hi_ci_ba86, upper))
        hits["loa_exact"].append(_covers(a.loa_hi_ci_exact, upper))
        z = rng.multivariate_normal([0.0, 0.0], [[1.0, RHO], [RHO, 1.0]], n)
        r = clinical_stats.agreement(z[:, 0], z[:, 1], num_bootstrap=bootstrap, seed=k)
        hits["r_bootstrap"].append(_covers(r.pearson_r_ci, RHO))
        hits["r_fisher"].append(_covers(r.pearson_r_ci_fisher, RHO))
        labels = np.repeat([0, 1], [n - n // 2, n // 2])
        scores = rng.normal(labels * SEPARATION, 1.0)
        d = clinical_stats.detection(scores, labels, labels, num_bootstrap=bootstrap, seed=k)
        hits["auc_bootstrap"].append(_covers(d.auc_ci, auc_true))
        hits["auc_delong"].append(_covers(d.auc_ci_delong, auc_true))
    return {"n": n, "sims": sims, "seed": seed, "bootstrap": bootstrap,  # NaN: not measured (bootstrap=0)
            **{key: float(np.mean(np.asarray(v)[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
               for key, v in hits.items()}}


def parametric_loa(n: int, sims: int, *, seed: int = 0) -> dict[str, float]:
    """Coverage of the upper limit's exact and Bland-Altman 1986 intervals over ``sims`` data sets at once (closed
    forms, vectorised: enough data sets to see the exact interval's 95%)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(BIAS, SD, (sims, n))
    bias, sd = d.mean(axis=1), d.std(axis=1, ddof=1)
    truth = BIAS + 1.96 * SD
    q = scipy.stats.nct.ppf([0.025, 0.975], n - 1, 1.96 * np.sqrt(n))
    half = scipy.stats.t.ppf(0.975, n - 1) * np.sqrt(3.0 / n) * sd
    exact = (bias + sd * q[0] / np.sqrt(n) <= truth) & (truth <= bias + sd * q[1] / np.sqrt(n))
    ba86 = np.abs(bias + 1.96 * sd - truth) <= half
    return {"n": n, "sims": sims, "loa_exact": float(exact.mean()), "loa_ba86": float(ba86.mean())}


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = [("loa_bootstrap", "upper LoA, bootstrap"), ("loa_ba86", "upper LoA, Bland-Altman 1986"),
            ("loa_exact", "upper LoA, exact (Carkeet)"), ("r_bootstrap", "r, bootstrap"), ("r_fisher", "r, Fisher z"),
            ("auc_bootstrap", "AUC, bootstrap"), ("auc_delong", "AUC, DeLong")]
    lines = ["| n | " + " | ".join(label for _, label in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['n']} | " + " | ".join(f"{100 * row[k]:.1f}%" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    import argparse  # noqa: PLC0415

    from experiments import provenance  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m experiments.interval_coverage")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sims", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--n", default="10,20,50")
    parser.add_argument("--parametric_sims", type=int, default=20000)
    args = parser.parse_args(argv[1:])
    start = time.time()
    rows = [simulate(int(n), args.sims, seed=args.seed + i, bootstrap=args.bootstrap)
            for i, n in enumerate(args.n.split(","))]
    many = [parametric_loa(int(n), args.parametric_sims, seed=args.seed + 100 + i)
            for i, n in enumerate(args.n.split(","))]
    body = ("Coverage of nominal 95% intervals (module docstring of `experiments/interval_coverage.py`); Monte Carlo "
            f"standard error about 1.1 points at {args.sims} data sets.\n\n" + _markdown(rows)
            + f"\nThe two parametric intervals of the upper limit over {args.parametric_sims} data sets each "
            "(standard error about 0.15 points):\n\n| n | exact (Carkeet) | Bland-Altman 1986 |\n|---:|---:|---:|\n"
            + "".join(f"| {m['n']} | {100 * m['loa_exact']:.1f}% | {100 * m['loa_ba86']:.1f}% |\n" for m in many))
    prov = provenance.record(argv[1:], time.time() - start, "-m experiments.interval_coverage")
    print(body)
    print(provenance.write_results(args.out, "interval_coverage", "Coverage of 95% intervals at small n (simulation)",
                                   body, {"rows": rows, "parametric": many}, prov))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
