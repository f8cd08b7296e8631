"""What a health worker reads: one answer per photo, the interval in one sentence, the model's origin, the notice.

Every output of the screening (``predict``'s CSV and overlays, the page) takes its words from here, so they say the
same thing everywhere.

One answer per photo (`answer`), from the verdict, the Hb interval, the WHO threshold for the subject's sex and the
anemia classifier's call, so that they never contradict each other:

* 'retake': the photo is not usable; no estimate is reported at all.
* 'likely_anemic': the whole Hb interval lies below the WHO threshold AND the classifier calls anemia.
* 'likely_not_anemic': the whole interval lies at or above the threshold AND the classifier does not call anemia.
* 'unclear': anything else, with why: the interval crosses the threshold (the usual case for a colour estimate of
  about +-2 g/dL), or the interval and the classifier disagree. The advice is a blood test.

Sex enters through the WHO threshold the interval is compared with (12 g/dL women, 13 men, 13 when unknown); the
classifier's probability is read from colour alone and does not use sex, and the outputs say so.

The model's origin (`provenance`) comes from the screening model file's ``training`` record (`anemia_jax.screening.
fit`): a model fitted on synthetic phantom photos is labelled PHANTOM on every output; a file that does not record
its data is labelled as of unknown origin, never as real.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ANSWERS", "NOTICE", "REASONS", "WITHHELD", "answer", "interval_sentence", "provenance"]

NOTICE = "Research use only: not a diagnosis. Confirm anemia with a blood test."
WITHHELD = "not reported: the photo must be retaken"

# Why a photo gets no estimate (`screening_model.ScreeningPredictions.flag`), in plain words.
REASONS = {
    "too_dark": "photo too dark for the Hb estimate: retake with more light",
    "too_bright": "photo too bright for the Hb estimate: retake in softer light, without flash glare",
    "unusual_colour": "unusual colour / lighting: retake under the device's light",
    "no_mask": "no conjunctiva to read the colour from: retake with the inner eyelid in view",
    "no_reference": "the light could not be checked (nothing white or grey beside the eyelid): retake with the "
                    "white of the eye in view",
    "missing": "no colour could be read from the photo",
}

ANSWERS = {
    "retake": "Retake the photo",
    "likely_anemic": "Likely anemic: confirm with a blood test",
    "likely_not_anemic": "Likely not anemic",
    "unclear": "Unclear: confirm with a blood test",
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def answer(screening: Mapping[str, Any], usable: bool) -> tuple[str, str]:
    """``(code, why)``: the photo's one answer (module docstring; ``ANSWERS[code]`` is its headline) and one plain
    sentence saying why. ``screening`` is a `photo_report.PhotoReport` screening row (hgb, hgb_lo, hgb_hi, anemic,
    who_threshold, hgb_vs_who, reason)."""
    s = screening
    if not usable or not _finite(s.get("hgb")):
        return "retake", s.get("reason") or "the photo cannot be read"
    threshold, vs, called = s["who_threshold"], s["hgb_vs_who"], int(s["anemic"]) == 1
    limit = f"the anemia threshold ({threshold:g} g/dL)"
    if vs == "below" and called:
        return "likely_anemic", f"The whole Hb range is below {limit}, and the colour model agrees."
    if vs == "above" and not called:
        return "likely_not_anemic", f"The whole Hb range is above {limit}, and the colour model agrees."
    if vs == "straddles":
        return "unclear", f"The Hb range ({s['hgb_lo']:.1f} to {s['hgb_hi']:.1f} g/dL) crosses {limit}."
    side = "below" if vs == "below" else "above"
    model = "likely anemic" if called else "likely not anemic"
    return "unclear", f"The Hb range is {side} {limit}, but the colour model says {model}."


def interval_sentence(coverage: float) -> str:
    """What the interval means, in one sentence."""
    return (f"For about {round(100 * coverage)} in 100 photos like this one, the blood test's Hb lies in this "
            "range.")


def provenance(training: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where a screening model came from, from its file's ``training`` record: ``kind`` ('phantom', 'real' or
    'unknown'), ``dataset``, ``subjects``, ``photos``, ``protocol``, ``fitted`` (date), ``commit``, and the labels
    ``short`` (a line: overlays, CSV cells) and ``long`` (a sentence: the page's banner)."""
    t = dict(training or {})
    data = t.get("data") if isinstance(t.get("data"), Mapping) else {}
    synthetic = data.get("synthetic_photos")
    kind = {True: "phantom", False: "real"}.get(synthetic, "unknown")
    dataset = (data.get("dataset") or {}).get("name") if isinstance(data.get("dataset"), Mapping) else None
    protocol = (data.get("split") or {}).get("protocol") if isinstance(data.get("split"), Mapping) else None
    subjects, photos = t.get("num_subjects"), t.get("num_photos")
    fitted, commit = t.get("date_utc"), t.get("git_commit")
    count = f"{subjects} subjects" if subjects is not None else "an unrecorded number of subjects"
    if kind == "phantom":
        short = f"PHANTOM MODEL (synthetic photos, {count}): not valid for patients"
        long = (f"PHANTOM MODEL: the Hb model was fitted on synthetic phantom photos ({count}, data set {dataset}), "
                "not on photos of people. Its numbers show how the tool works; they say nothing about a patient.")
    elif kind == "real":
        short = f"Hb model fitted on photos of {count} ({dataset})"
        long = (f"The Hb model was fitted on {photos} photos of {count} (data set {dataset}, {protocol} split, "
                f"fitted {fitted}, commit {str(commit)[:12]}).")
    else:
        short = "Hb model of UNKNOWN ORIGIN: its file does not say what it was fitted on"
        long = ("The Hb model's file does not record what it was fitted on (re-fit it with python -m "
                "anemia_jax.fit_screening): treat its numbers as untested.")
    return {"kind": kind, "dataset": dataset, "subjects": subjects, "photos": photos, "protocol": protocol,
            "fitted": fitted, "commit": commit, "short": short, "long": long}
