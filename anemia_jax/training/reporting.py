"""What a training run leaves for people to read: progress lines, metrics.jsonl, config.json, summary.json, panels.

Everything here writes only on the main process (`Reporter(is_main=...)`, normally ``jax.process_index() == 0``),
so multi-host runs produce one set of files. Files under the workdir:

* ``config.json``: the resolved config; when a rerun brings another config, the one it replaces is kept first as
  ``config_history/config_<n>.json`` (n = 1, 2, ... in order), so that no run's settings are ever lost.
* ``metrics.jsonl``: one JSON object per line, ``{"step": ..., "split": "train"|"val"|..., <name>: <value>}``;
  non-finite numbers are written as strings ("NaN", "Infinity") so every line is strict JSON.
* ``panels/step_<step>.png``: one row per validation example: image | ground truth | prediction, each mask
  drawn as a coloured overlay (one colour per target, legend on top).
* ``summary.json``: final and best metrics, wall time, steps.
* ``events.out.tfevents.*``: the same for TensorBoard (``tensorboard --logdir runs/``), written with tensorboardX
  (no TensorFlow): every number of ``metrics.jsonl`` as a scalar ``<split>/<name>``, the panels as images, the
  config as hyper-parameters and text.

The workdir may be local or on shared/cloud storage (``gs://bucket/runs/x``): every path is an `etils.epath.Path`
(`paths.as_path`), which reads and writes either. Object stores cannot append to a file, so there ``metrics.jsonl`` is
rewritten whole at each log call; locally it is appended to. The workdir itself is created by the first write, so a
run that fails before writing anything (e.g. missing data) leaves no empty directory behind.

Every file but the appended ``metrics.jsonl`` is written atomically (`anemia_jax.utils.atomic`: a temporary file renamed
over the final name), so a kill or a full disk never leaves a truncated ``config.json``, ``summary.json`` or panel;
``metrics.jsonl`` rewrites (`truncate_metrics`, object stores) are atomic too, and a line cut short by a kill is
dropped by the next `truncate_metrics`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from anemia_jax.utils import atomic, conversions, paths
from anemia_jax.utils.image_io import COLORS, overlay

_MIN_TILE = 128  # Pixels; smaller images are enlarged to at least this.
def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``65`` -> ``'1m05s'``; ``4.2`` -> ``'4s'``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_progress(*, step: int, total: int, loss: float, lr: float, steps_per_s: float, images_per_s: float,
                    extra: Mapping[str, float] | None = None) -> str:
    """The progress line: ``step 120/2000 (6%) | loss 0.4321 | lr 9.80e-04 | 12.3 steps/s | 197 img/s | ETA 2m33s``.

    ``extra`` (e.g. per-target train Dice) is appended as ``name value`` pairs.
    """
    eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)", f"loss {loss:.4f}", f"lr {lr:.2e}",
             f"{steps_per_s:.2f} steps/s", f"{images_per_s:.1f} img/s", f"ETA {format_duration(eta)}"]
    for name, value in (extra or {}).items():
        parts.append(f"{name} {value:.4f}")
    return " | ".join(parts)


def format_eval(step: int, split: str, results: Mapping[str, Any], targets: Sequence[str]) -> str:
    """One line per evaluation: mean Dice, then Dice/IoU per target and how many images each mean covers."""
    per_target = [f"{t}: dice {results.get(f'dice/{t}', math.nan):.4f} iou {results.get(f'iou/{t}', math.nan):.4f}"
                  f" (n={results.get(f'num_images/{t}', 0)})" for t in targets]
    line = f"{split} @ step {step}: mean dice {results.get('dice/mean', math.nan):.4f} | " + " | ".join(per_target)
    if any(f"hd95/{t}" in results for t in targets):
        line += " | hd95 " + ", ".join(
            f"{t} {results.get(f'hd95/{t}', math.nan):.2f} ({results.get(f'hd95_infinite/{t}', 0)} inf)"
            for t in targets)
    return line


def make_panel(images: np.ndarray, truth: np.ndarray, probs: np.ndarray, targets: Sequence[str], *,
               threshold: float = 0.5, truth_weights: np.ndarray | None = None, title: str = "") -> Image.Image:
    """A grid with one row per example: image | ground truth overlay | prediction overlay.

    Args:
        images: uint8 [N, H, W, 3].
        truth: {0, 1} [N, H, W, C] reference masks.
        probs: float [N, H, W, C] predicted probabilities, thresholded at ``threshold``.
        targets: the C target names (legend).
        truth_weights: optional [N, C]; a 0 marks a missing reference mask, left out of the truth overlay.
        title: text at the top (e.g. the step).

    Returns:
        An RGB `PIL.Image.Image`.
    """
    n, h, w, _ = images.shape
    # Small training resolutions are enlarged (nearest neighbour) so the panel stays readable.
    scale = max(1, math.ceil(_MIN_TILE / max(h, w)))
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    pad, header = 4, 30
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading = f"{title}  image | truth | prediction (p>{threshold:g})".strip()
    legend_width = sum(16 + int(probe.textlength(t, font=font)) for t in targets)
    width = max(3 * tw + 4 * pad, int(probe.textlength(heading, font=font)) + 2 * pad, legend_width + 2 * pad)
    canvas = Image.new("RGB", (width, header + n * (th + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), heading, fill=(230, 230, 230), font=font)
    x = pad
    for c, t in enumerate(targets):
        draw.rectangle((x, 17, x + 8, 25), fill=COLORS[c % len(COLORS)])
        draw.text((x + 11, 15), t, fill=(230, 230, 230), font=font)
        x += 16 + int(draw.textlength(t, font=font))
    pred = (np.asarray(probs) > threshold).astype(np.uint8)
    for i in range(n):
        top = header + i * (th + pad)
        truth_i = np.asarray(truth[i]).copy()
        if truth_weights is not None:
            truth_i[..., np.asarray(truth_weights[i]) <= 0] = 0
        for col, tile in enumerate((images[i], overlay(images[i], truth_i), overlay(images[i], pred[i]))):
            tile = Image.fromarray(np.asarray(tile, np.uint8))
            if scale > 1:
                tile = tile.resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + col * (tw + pad), top))
    return canvas


class Reporter:
    """Writes a run's logs and files under ``workdir`` (no-ops, apart from returning values, off the main process).

    Nothing is created until the first write (`write_config`, `log_metrics`, `save_panel`, `write_summary`).

    Args:
        workdir: the run directory, local or a URL (see `paths.as_path`).
        is_main: whether this process writes (normally ``jax.process_index() == 0``).
        append: how ``metrics.jsonl`` grows: True appends each line (local files); False rewrites the whole file
            at each call (object stores, where "append" is unsupported or silently overwrites). None: False for
            URLs, True otherwise.
        tensorboard: also write TensorBoard event files (scalars, panels, hyper-parameters) into the workdir.
    """

    def __init__(self, workdir: str | os.PathLike, *, is_main: bool, append: bool | None = None,
                 tensorboard: bool = True):
        self.workdir = paths.as_path(workdir)
        self.is_main = is_main
        self._append = (not paths.is_url(self.workdir)) if append is None else append
        self._lines: list[str] | None = None  # metrics.jsonl as written so far, when rewriting it whole.
        self._created = False
        self._tensorboard = tensorboard and is_main
        self._writer = None  # tensorboardX.SummaryWriter, opened at the first write.

    @property
    def metrics_path(self) -> epath.Path:
        return self.workdir / "metrics.jsonl"

    def info(self, message: str, *args: Any) -> None:
        """Logs a line (absl INFO) on the main process."""
        if self.is_main:
            logging.info(message, *args)

    def _ensure_workdir(self) -> None:
        if not self._created:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._created = True

    def _events(self):
        """The TensorBoard writer (None when disabled or unavailable for this workdir)."""
        if not self._tensorboard:
            return None
        if self._writer is None:
            self._ensure_workdir()
            if paths.is_url(self.workdir) and not _has_module("google.cloud.storage"):
                logging.warning("TensorBoard event files are off for %s: writing them to a bucket needs the "
                                "google-cloud-storage package (metrics.jsonl is written as usual).", self.workdir)
                self._tensorboard = False
                return None
            try:
                self._writer = _EventFile(str(self.workdir))
            except Exception as e:  # noqa: BLE001 -- e.g. gs:// without google-cloud-storage: keep training
                logging.warning("TensorBoard event files are off for %s: %s (metrics.jsonl is written as usual).",
                                self.workdir, e)
                self._tensorboard = False
                return None
        return self._writer

    def write_hparams(self, config_dict: Mapping[str, Any]) -> None:
        """Records the config in TensorBoard: its scalar fields as hyper-parameters, the whole as JSON text."""
        writer = self._events()
        if writer is None:
            return
        import tensorboardX.summary  # noqa: PLC0415

        flat = _flatten(conversions.jsonable(dict(config_dict)))
        hparams = {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}
        for summary in tensorboardX.summary.hparams(hparams, {"val/dice/mean": math.nan}):
            writer.add_summary(summary, 0)
        writer.add_text("config", "```\n" + json.dumps(conversions.jsonable(dict(config_dict)), indent=2, sort_keys=True)
                        + "\n```", 0)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (the other files are complete after each call)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_json(self, name: str, value: Any) -> epath.Path:
        self._ensure_workdir()
        path = self.workdir / name
        atomic.write_json(path, value)  # readers never see a half-written file
        return path

    def write_config(self, config_dict: Mapping[str, Any]) -> epath.Path | None:
        """Writes ``config.json`` (the resolved config as a plain dict). An existing ``config.json`` that differs is
        first copied to ``config_history/config_<n>.json`` (the next free n); returns that copy's path, else None."""
        if not self.is_main:
            return None
        kept = None
        old = self.workdir / "config.json"
        if old.exists():
            text = old.read_text()
            try:
                same = json.loads(text) == json.loads(json.dumps(conversions.jsonable(dict(config_dict))))
            except ValueError:  # an unreadable config.json is kept too
                same = False
            if not same:
                history = self.workdir / "config_history"
                n = 1
                while (history / f"config_{n}.json").exists():
                    n += 1
                kept = history / f"config_{n}.json"
                atomic.ensure_dir(history)
                atomic.write_text(kept, text)
        self._write_json("config.json", config_dict)
        return kept

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Writes ``summary.json``."""
        if self.is_main:
            path = self._write_json("summary.json", summary)
            logging.info("Wrote %s", path)

    def _read_metrics_lines(self) -> list[str]:
        if not self.metrics_path.exists():
            return []
        return [line + "\n" for line in self.metrics_path.read_text().splitlines()]

    def log_metrics(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Appends ``{"step", "split", **values}`` as one line of ``metrics.jsonl``."""
        if not self.is_main:
            return
        record = {"step": int(step), "split": split, **conversions.jsonable(dict(values))}
        line = json.dumps(record, sort_keys=True) + "\n"
        self._ensure_workdir()
        writer = self._events()
        if writer is not None:
            for name, value in values.items():
                if isinstance(value, (bool, int, float, np.number)) and math.isfinite(float(value)):
                    writer.add_scalar(f"{split}/{name}", float(value), int(step))
            writer.flush()
        if self._append:
            with self.metrics_path.open("a") as f:
                f.write(line)
            return
        if self._lines is None:
            self._lines = self._read_metrics_lines()  # A resumed run continues the file it finds.
        self._lines.append(line)
        atomic.write_text(self.metrics_path, "".join(self._lines))

    def truncate_metrics(self, after_step: int) -> int:
        """Drops ``metrics.jsonl`` lines with a step beyond ``after_step`` (left by a run that died after its last
        checkpoint: a resumed run recomputes those steps; 0 when it starts afresh), lines cut short by a kill, and
        repeats of a (split, step) already kept, rewriting the file atomically. Returns how many lines were dropped.
        """
        if not self.is_main or not self.metrics_path.exists():
            return 0
        kept, dropped, last = [], 0, {}
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
                step, split = int(record["step"]), str(record.get("split", ""))
            except (ValueError, KeyError, TypeError):
                dropped += 1  # A line cut short by a kill.
                continue
            if step > after_step or step <= last.get(split, -1):
                dropped += 1  # a rerun step, or an earlier writer's repeat: each (split, step) once, ascending
            else:
                kept.append(line + "\n")
                last[split] = step
        if dropped:
            atomic.write_text(self.metrics_path, "".join(kept))
        if not self._append:
            self._lines = kept
        return dropped

    def save_panel(self, step: int, images: np.ndarray, truth: np.ndarray, probs: np.ndarray,
                   targets: Sequence[str], *, truth_weights: np.ndarray | None = None) -> epath.Path | None:
        """Writes ``panels/step_<step>.png`` (see `make_panel`); returns its path on the main process."""
        if not self.is_main or len(images) == 0:
            return None
        self._ensure_workdir()
        path = self.workdir / "panels" / f"step_{int(step):07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        panel = make_panel(images, truth, probs, targets, truth_weights=truth_weights, title=f"step {step}")
        with atomic.open_atomic(path, "wb") as f:
            panel.save(f, format="PNG")
        writer = self._events()
        if writer is not None:
            writer.add_image("val/panel", np.asarray(panel), int(step), dataformats="HWC")
        return path


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _has_module(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class _EventFile:
    """TensorBoard events written synchronously, in the caller's thread (tensorboardX's protobufs and file format).

    tensorboardX's own `SummaryWriter` hands events to a background thread through a queue of ten: when that thread
    dies on a full disk, the eleventh event (or closing the writer) waits forever, and a trainer that should stop
    with "no space left" hangs instead. Written here, a failed write raises where it happens, like every other
    output of the run.
    """

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter  # noqa: PLC0415 -- with the first event

        self._file = EventsWriter(os.path.join(logdir, "events"))

    def add_summary(self, summary, step: int) -> None:
        from tensorboardX.proto import event_pb2  # noqa: PLC0415

        self._file.write_event(event_pb2.Event(summary=summary, wall_time=time.time(), step=int(step)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX import summary  # noqa: PLC0415

        self.add_summary(summary.scalar(tag, value), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX import summary  # noqa: PLC0415

        self.add_summary(summary.text(tag, text), step)

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        from tensorboardX import summary  # noqa: PLC0415

        self.add_summary(summary.image(tag, image, dataformats=dataformats), step)
        self.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
