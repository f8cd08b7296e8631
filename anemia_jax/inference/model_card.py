"""The model card that travels with every exported model: what goes in, what comes out, and where the model came from.

`build` assembles it from the restored runs (`anemia_jax.runs.restore.Run`): the input (uint8 RGB ``[N, H, W, 3]`` at
the training size, how photos are resized to it), the normalisation inside the model (`anemia_jax.data.normalization`),
the output (sigmoid probabilities per target) and the thresholds that make masks of it, how the members are combined,
and for each run its checkpoint, training data and protocol (from ``config.json``), and validation metrics of the
exported checkpoint (from ``summary.json``, when the trainer recorded them for that step). The exporting checkout's git
state comes from `anemia_jax.utils.provenance` when the package runs from a source checkout; the trainer does not record
the commit a run was trained at, and the card says so rather than guessing.

`write` saves it as ``<artifact file name>.card.json`` beside the artifact (`card_path`: ``model.onnx.card.json``,
``model.stablehlo.card.json``, so that two exports of one stem keep one card each), with the artifact's size and
SHA-256. This module imports only the standard library at import time, so the ONNX conversion environment
(`anemia_jax.inference.export_onnx`, which has no Orbax, TFDS or ml_collections) uses it too.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pathlib
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from anemia_jax.utils import provenance

__all__ = ["FORMAT", "SCHEMA_VERSION", "artifact_entry", "build", "card_path", "exporter_git_state", "write"]

FORMAT = "anemia_jax.model_card"
SCHEMA_VERSION = 1


def _plain(value: Any) -> Any:
    """Strict-JSON Python: mappings and sequences recursively, NumPy scalars to Python, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def exporter_git_state() -> dict[str, Any]:
    """The git state of the checkout this package runs from (`anemia_jax.utils.provenance`), or why unknown."""
    return provenance.checkout_git_state()


def _read_json(path: Any) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _validation(summary: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    """The metrics ``summary.json`` holds for checkpoint ``step`` ('best' or 'final' entry), or why there are none."""
    if summary is None:
        return {"note": "no summary.json in the run directory (the run did not finish, or it was removed)"}
    for which in ("best", "final"):
        entry = summary.get(which)
        if isinstance(entry, Mapping) and entry.get("step") == step:
            splits = {k: v for k, v in entry.items() if k != "step" and isinstance(v, Mapping)}
            return {"step": step, "summary_entry": which, **splits}
    steps = {w: summary[w].get("step") for w in ("best", "final") if isinstance(summary.get(w), Mapping)}
    return {"note": f"summary.json records metrics for steps {steps}, not for the exported step {step}; score it "
                    "with `python -m anemia_jax.evaluate --checkpoint=<step>`"}


def _run_entry(run) -> dict[str, Any]:
    config = run.config
    summary = _read_json(run.workdir / "summary.json")
    return {
        "workdir": str(run.workdir),
        "checkpoint": {"step": run.step, "chosen_as": run.checkpoint, "reason": run.checkpoint_reason},
        "training_commit": (summary or {}).get("git_commit", "not recorded by the trainer"),
        "model": _plain(config.model.to_dict()),
        "training": {
            "config_name": config.get("name"), "config_arg": config.get("arg"),
            "dataset": _plain(config.dataset.to_dict()), "split": _plain(config.split.to_dict()),
            "num_examples": _plain((summary or {}).get("num_examples")),
            "num_train_steps": (summary or {}).get("num_train_steps", config.get("num_train_steps")),
            "global_batch_size": config.get("batch_size"), "compute_dtype": config.get("compute_dtype"),
            "loss": _plain(config.loss.to_dict()), "seed": config.get("seed"),
            "num_params": (summary or {}).get("num_params"), "status": (summary or {}).get("status", "unknown"),
        },
        "validation": _plain(_validation(summary, run.step)),
        "config": _plain(config.to_dict()),
    }


def _training_data(runs: Sequence[Any]) -> dict[str, Any]:
    """What the runs were trained on, and whether those photos are synthetic (the phantom): from the dataset
    registry of each run's recorded data set."""
    from anemia_jax.data import datasets  # noqa: PLC0415 -- the registry (TFDS builders); export only

    names = sorted({str(run.config.dataset.get("name", "")) for run in runs})
    flags = {datasets.DATASETS.get(n).synthetic if n in datasets.DATASETS else None for n in names}
    kind = "phantom" if flags == {True} else "real" if flags == {False} else "unknown"
    label = {"phantom": "PHANTOM: trained on synthetic phantom photos, not on photos of people; for testing the "
                        "software only",
             "real": f"trained on photos of people ({', '.join(names)})",
             "unknown": "the runs' training data could not be identified as real or synthetic"}[kind]
    return {"datasets": names, "kind": kind, "label": label,
            "intended_use": "research use only: not a medical device and not a diagnosis"}


def build(runs: Sequence[Any], *, threshold: float, compute_dtype: str, prune_level: int | None = None,
          transforms: Sequence[Any] | None = None, command: str = "", temperature: Sequence[float] | None = None,
          temperature_source: str = "") -> dict[str, Any]:
    """The model card of an export of ``runs`` (one run, or the members of an ensemble averaged).

    Args:
        runs: restored `anemia_jax.runs.restore.Run` s (same targets and training size, as `restore.load_runs` checks).
        threshold: the probability above which a pixel is in a mask (``p > threshold``).
        compute_dtype: the dtype the exported model computes in.
        prune_level, transforms: the UNet++ pruned network and the TTA views exported, if any.
        command: the export command line, for the record.
        temperature, temperature_source: the per-target temperatures inside the exported function
            (`anemia_jax.inference.temperature`; None: none) and the file they came from.
    """
    from anemia_jax.data import normalization  # noqa: PLC0415 -- imports JAX; the ONNX environment has it too

    first = runs[0]
    h, w = first.image_size
    targets = list(first.targets)
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "training_data": _training_data(runs),
        "input": {
            "name": "images", "shape": ["N", h, w, 3], "dtype": "uint8", "layout": "NHWC",
            "channels": "RGB, 0..255, the photo upright (EXIF orientation applied)",
            "batch": "symbolic: any N >= 1",
            "preprocessing": f"resize the photo to {h}x{w} (height x width) with Lanczos, aspect ratio not kept "
                             "(anemia_jax.utils.image_io.resize_image, as training photos were)",
        },
        "normalization": {"inside_model": True, "formula": "((x / 255) - mean) / std per RGB channel",
                          "mean": list(normalization.IMAGE_MEAN), "std": list(normalization.IMAGE_STD)},
        "output": {"name": "probabilities", "shape": ["N", h, w, len(targets)], "dtype": "float32",
                   "meaning": "per-pixel sigmoid probability of each target (multi-label: channels are independent)",
                   "postprocessing": "resize the probabilities to the photo's size bilinearly, then threshold"},
        "targets": [{"name": t, "channel": c, "threshold": threshold, "rule": "mask = probability > threshold"}
                    for c, t in enumerate(targets)],
        "inference": {
            "members": len(runs),
            "combination": "single model" if len(runs) == 1 else "mean of the members' probabilities",
            "compute_dtype": compute_dtype, "prune_level": prune_level,
            "tta": None if not transforms else [{"flip": t.flip, "scale": t.scale} for t in transforms],
            "temperature": None if temperature is None else {
                "values": {t: float(v) for t, v in zip(targets, temperature)}, "source": temperature_source,
                "rule": "probability = sigmoid(logit / temperature), per member, before averaging"},
        },
        "runs": [_run_entry(run) for run in runs],
        "export": {"command": command, **exporter_git_state(),
                   "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "python": platform.python_version()},
    }


def card_path(artifact: str | pathlib.Path) -> pathlib.Path:
    """Where the card of ``artifact`` lives: ``<folder>/<artifact file name>.card.json`` (the full name, suffix
    included: ``model.onnx`` and ``model.stablehlo`` side by side each keep their own card)."""
    artifact = pathlib.Path(artifact)
    return artifact.with_name(f"{artifact.name}.card.json")


def artifact_entry(artifact: str | pathlib.Path, **info: Any) -> dict[str, Any]:
    """``{'file', 'bytes', 'sha256', **info}`` of a written artifact."""
    artifact = pathlib.Path(artifact)
    digest = hashlib.sha256()
    with artifact.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": artifact.name, "bytes": artifact.stat().st_size, "sha256": digest.hexdigest(), **_plain(info)}


def write(card: Mapping[str, Any], artifact: str | pathlib.Path, **info: Any) -> pathlib.Path:
    """Writes ``card`` plus the ``artifact`` entry (`artifact_entry` with ``info``) to `card_path`; returns it."""
    out = card_path(artifact)
    full = {**_plain(card), "artifact": artifact_entry(artifact, **info)}
    out.write_text(json.dumps(full, indent=1, allow_nan=False) + "\n")
    return out
