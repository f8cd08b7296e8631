"""What the screening tells a health worker about new, bad, colour-cast and dimmed photos: the measurements behind
issue 19's fixes, on phantom photos with a fold ensemble and two screening models.

    python -m experiments.screening_robustness --workdir=CV/fold_0 ... --workdir=CV/fold_4 --checkpoint=latest \
        --screening=model.json --screening_before=model_none.json --quality=quality.json \
        --quality_before=quality_plain.json --out=DIR [--count=60] [--seed=2]

Photos: ``--count`` new phantom photos of set ``--seed`` (no run or model saw them; 256 px), four bad photos (one
overexposed to white, a random texture, a black photo, one dimmed to x0.25), and the first ten new photos again with a
warm cast (R x1.15, B x0.85 on the encoded values) and dimmed to x0.45. Segmented by the runs (the probabilities
calibrated by the temperature file beside them, as ``predict`` does) and assessed as ``predict`` assesses them
(`photo_report.PhotoAssessor`), sex from the phantom's metadata. Reported:

* the warm cast: ``--screening_before`` (no colour constancy; before the fixes nothing flagged a photo, so its shift
  is what a health worker saw) against ``--screening`` (grey-world constancy and the colour domain): photos flagged
  and the Hb shift of those not flagged;
* the dimmed photos and the bad photos: their verdicts and reasons, and that none shows an Hb estimate;
* the new photos' retake shares by anemia status with ``--quality_before`` (thresholds chosen without the fairness
  constraint) and ``--quality`` (with it), and the answers (likely anemic / not anemic / unclear / retake) with how
  often the interval straddles the WHO threshold.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from anemia_jax import cli
from anemia_jax.data.datasets.conjunctiva_phantom import phantom


def _warm(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * np.array([1.15, 1.0, 0.85])), 0, 255).astype(np.uint8)


def _dim(image: np.ndarray, factor: float) -> np.ndarray:
    return np.round(image * factor).astype(np.uint8)


def _shares(reports, anemic: np.ndarray) -> dict[str, Any]:
    retake = np.array([not r.verdict.usable for r in reports])
    return {label: {"retake": int(retake[anemic == flag].sum()), "n": int((anemic == flag).sum()),
                    "share": float(retake[anemic == flag].mean())}
            for label, flag in (("anemic", 1), ("not_anemic", 0))}


def run(args) -> tuple[str, dict[str, Any]]:
    from anemia_jax.inference import segmenter, temperature  # noqa: PLC0415
    from anemia_jax.runs import restore
    from anemia_jax.screening import photo_report, quality, screening_model

    runs = restore.load_runs(args.workdir, checkpoint=args.checkpoint)
    scale, scale_source = temperature.for_runs(args.workdir, None, runs[0].targets)
    seg = segmenter.Segmenter(runs, temperature=scale, batch_size=8)
    after, before = screening_model.load(args.screening), screening_model.load(args.screening_before)
    fair, _ = quality.load_thresholds(args.quality)
    plain, _ = quality.load_thresholds(args.quality_before)
    examples = list(phantom.generate(args.seed, args.count, long_side=256))
    photos = [e.image for e in examples]
    sexes = [e.gender for e in examples]
    anemic = np.array([e.anemic for e in examples])
    bad = {"overexposed": np.full_like(photos[0], 255), "random texture":
           np.random.default_rng(0).integers(0, 256, photos[0].shape, dtype=np.uint8),
           "black": np.zeros_like(photos[0]), "dimmed x0.25": _dim(photos[1], 0.25)}
    warm = [_warm(p) for p in photos[:10]]
    dim = [_dim(p, 0.45) for p in photos[:10]]
    segs = seg.segment(photos + list(bad.values()) + warm + dim)
    n, b = len(photos), len(bad)
    s_new, s_bad, s_warm, s_dim = segs[:n], segs[n:n + b], segs[n + b:n + b + 10], segs[n + b + 10:]
    assess = photo_report.PhotoAssessor(runs[0].targets, fair, after)
    new_fair = assess.assess(photos, s_new, sexes)
    new_plain = photo_report.PhotoAssessor(runs[0].targets, plain, after).assess(photos, s_new, sexes)
    bad_reports = assess.assess(list(bad.values()), s_bad)
    dim_reports = assess.assess(dim, s_dim, sexes[:10])

    def estimates(model, images, segments):
        return model.predict(photo_report.screening_features(model, images, segments, runs[0].targets))

    warm_result = {}
    for label, model in (("before (no constancy, no colour domain)", before), ("after", after)):
        base, cast = estimates(model, photos[:10], s_new[:10]), estimates(model, warm, s_warm)
        kept = (cast.flag == "") if model is after else np.ones(10, bool)
        shift = (cast.hgb - base.hgb)[kept]
        warm_result[label] = {"flagged": int((~kept).sum()), "shift_mean": float(np.mean(shift)) if kept.any() else None,
                              "shift_min": float(np.min(shift)) if kept.any() else None,
                              "shift_max": float(np.max(shift)) if kept.any() else None,
                              "calls_changed": int(np.sum((cast.anemic != base.anemic) & kept))}
    base, dimmed = estimates(after, photos[:10], s_new[:10]), estimates(after, dim, s_dim)
    kept = np.array([r.verdict.usable for r in dim_reports])
    dim_shift = (dimmed.hgb - base.hgb)[kept]
    answers = collections.Counter(r.screening["answer"] for r in new_fair)
    usable = [r for r in new_fair if r.verdict.usable]
    straddle = sum(r.screening["hgb_vs_who"] == "straddles" for r in usable)
    truth = np.array([e.hgb for e in examples])
    covered = [r.screening["hgb_lo"] <= t <= r.screening["hgb_hi"] for r, t in zip(new_fair, truth)
               if r.verdict.usable]
    data = {
        "runs": [str(w) for w in args.workdir], "temperature": scale, "temperature_source": scale_source,
        "count": n, "seed": args.seed, "warm_cast": warm_result,
        "dimmed_x0.45": collections.Counter(r.verdict.codes[0] if r.verdict.codes else "usable" for r in dim_reports),
        "dimmed_x0.45_usable_shift": [float(v) for v in dim_shift],
        "bad_photos": {k: {"verdict": r.verdict.label, "reasons": list(r.verdict.reasons),
                           "hb_shown": r.screening["hgb"] == r.screening["hgb"]} for k, r in zip(bad, bad_reports)},
        "retake_by_anemia": {"thresholds without the fairness constraint": _shares(new_plain, anemic),
                             "thresholds with it": _shares(new_fair, anemic)},
        "answers": dict(answers), "usable": len(usable), "interval_straddles_threshold": int(straddle),
        "interval_coverage_usable": float(np.mean(covered)) if covered else None,
        "retake_reasons": dict(collections.Counter(c for r in new_fair for c in r.verdict.codes)),
    }
    lines = [f"{n} new phantom photos (set {args.seed}), the 5-fold ensemble, temperature {scale} ({scale_source}).", "",
             "| warm cast on 10 photos | flagged (retake: unusual colour) | Hb shift of the others, mean (range) "
             "g/dL | anemia calls changed |", "|---|---:|---:|---:|"]
    for label, w in warm_result.items():
        rng = "-" if w["shift_mean"] is None else f"{w['shift_mean']:+.2f} ({w['shift_min']:+.2f} to {w['shift_max']:+.2f})"
        lines.append(f"| {label} | {w['flagged']} | {rng} | {w['calls_changed']} |")
    lines += ["", "| photos | verdict and first reason | Hb shown |", "|---|---|---|"]
    for k, r in data["bad_photos"].items():
        lines.append(f"| {k} | {r['verdict']}: {'; '.join(r['reasons'])} | {'yes' if r['hb_shown'] else 'no'} |")
    shifts = ", ".join(f"{v:+.2f}" for v in dim_shift)
    lines.append(f"| 10 dimmed x0.45 | first reasons: {dict(data['dimmed_x0.45'])} | only the usable ones' "
                 f"({'Hb shift ' + shifts + ' g/dL' if len(dim_shift) else 'none'}) |")
    lines += ["", "| thresholds | anemic sent to retake | not anemic sent to retake |", "|---|---:|---:|"]
    for label, s in data["retake_by_anemia"].items():
        lines.append(f"| {label} | {s['anemic']['retake']}/{s['anemic']['n']} ({s['anemic']['share']:.1%}) | "
                     f"{s['not_anemic']['retake']}/{s['not_anemic']['n']} ({s['not_anemic']['share']:.1%}) |")
    lines += ["", f"Answers ({n} photos, thresholds with the constraint): {dict(answers)}; the interval straddles the "
                  f"WHO threshold for {straddle} of {len(usable)} usable photos; it covered the phantom's Hb for "
                  f"{sum(covered)} of {len(covered)}. Retake reasons: {data['retake_reasons']}."]
    return "\n".join(lines) + "\n", data


def main(argv: Sequence[str]) -> int:
    cmd = cli.Command("python -m experiments.screening_robustness", __doc__)
    fv = cmd.flags
    cmd.run_flags(verb="segment with", tta=False)
    for name, text in (("screening", "the screening model (after)"), ("screening_before", "the model without "
                       "constancy (before)"), ("quality", "thresholds with the fairness constraint"),
                       ("quality_before", "thresholds without it"), ("out", "result folder")):
        flags.DEFINE_string(name, None, text, flag_values=fv)
        flags.mark_flag_as_required(name, flag_values=fv)
    flags.DEFINE_integer("count", 60, "New phantom photos.", flag_values=fv)
    flags.DEFINE_integer("seed", 2, "Phantom set of the new photos.", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    try:
        if cmd.parse_runs(argv) is None:
            return cli.EXIT_OK
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    from experiments import provenance  # noqa: PLC0415

    start = time.time()
    body, data = run(cmd)
    prov = provenance.record(argv[1:], time.time() - start, "-m experiments.screening_robustness")
    print(body)
    print(provenance.write_results(cmd.out, "screening_robustness", "Screening robustness (phantom, CPU-scale)", body,
                                   data, prov, note=cmd.note))
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
