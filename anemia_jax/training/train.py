"""The training loop: data-parallel steps over every device of every host, evaluation, checkpoints, outputs.

`train_and_evaluate(config, workdir)` is what ``python -m anemia_jax.main`` runs; everything it trains and scores is
built from the config by `anemia_jax.training.experiment`, and evaluated by `anemia_jax.evaluation.evaluator.Evaluator`:

1. Validates the config, enables the persistent compilation cache, builds the 1-D ``data`` mesh.
2. Loads the data (`loading.load_data`: patient-level split, examples resident on the devices).
3. Builds model, loss, optimizer and train state, and restores the latest checkpoint of ``<workdir>/checkpoints``
   if there is one (the data position is the step: batches are a function of it). Compiles the train step and logs
   the parameter count and the FLOPs of one training step (a finished run run again compiles nothing: its FLOPs are
   in the checkpoint's meta).
4. Trains, logging a progress line every ``log_every_steps``, evaluating on the validation split every
   ``eval_every_*`` (per-image Dice/IoU/precision/recall per target, PNG panel), checkpointing every
   ``checkpoint_every_*`` and at each evaluation (keeping the latest plus the best by validation mean Dice).
   ``profile_steps > 0`` records a `jax.profiler` trace of that many steps (after the first) in
   ``<workdir>/profile``.
5. At the end evaluates the final and the best state on validation (with HD95) and on the test split if the
   protocol has one, and writes ``summary.json``.

Outputs (`reporting.Reporter`): ``config.json``, ``metrics.jsonl``, TensorBoard event files, ``panels/``,
``checkpoints/``, ``summary.json``.

Stops: a non-finite loss or gradient raises `NonFiniteError` naming the step, after checking every step since the
last check, so nothing bad is ever saved and the last good checkpoint stays. SIGTERM (preemptible TPU VMs)
finishes the current step, saves a checkpoint and returns with ``status='preempted'``.

Reliability: one trainer per workdir (`workdir_lock.WorkdirLock`, taken before anything is written and released on
any exit; a second trainer stops with `errors.WorkdirBusyError` naming the holder); the resume restores the newest
intact checkpoint, setting damaged ones aside with a warning (`checkpointing.CheckpointManager.restore_latest_intact`);
``metrics.jsonl`` keeps each step once per split whatever was killed when (`reporting.Reporter.truncate_metrics`
drops the lines past the restored step, or every line when no checkpoint survives); ``config.json`` records the
data actually used (``data_source``: the prepared directory, its source and that source's fingerprint).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from anemia_jax.data import loading
from anemia_jax.evaluation import evaluator
from anemia_jax.inference import probabilities
from anemia_jax.runs import checkpointing, config_lib, model_factory
from anemia_jax.training import experiment, reporting, steps, workdir_lock
from anemia_jax.utils import compilation_cache, errors, parallel, paths
from anemia_jax.utils.conversions import jsonable, nested_diff

DataNotFoundError = loading.DataNotFoundError  # re-exported: what `main` reports for missing data


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the last good checkpoint."""


def _cost(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains and evaluates ``config``, writing everything under ``workdir``; resumes from its checkpoints.

    Args:
        config: a config from ``configs/`` (validated here).
        workdir: the run directory, local or on shared/cloud storage (``gs://bucket/runs/x``, used as given; see
            `paths.as_path`); holds ``checkpoints/``, ``metrics.jsonl``, ``config.json``, ``panels/``,
            TensorBoard event files and, at the end, ``summary.json``. It is created only once the data are loaded,
            so a run that fails on its config or its data leaves nothing behind; an existing one is resumed, never
            cleared.

    Returns:
        The summary dict (also written to ``summary.json`` when training completed); ``status`` is 'completed',
        or 'preempted' after a SIGTERM (a checkpoint was saved; rerun to resume).

    Raises:
        config_lib.ConfigError: invalid config, a batch larger than the training set, or more than the device's
        memory holds. errors.DataError (loading.DataNotFoundError...): missing or
        unusable data. errors.WorkdirBusyError: another trainer holds the workdir. errors.CheckpointError: no
        usable checkpoint, or checkpoints of another model. errors.OutputError: the workdir cannot be written.
        NonFiniteError: the loss or a gradient became non-finite.
    """
    workdir = paths.as_path(workdir)
    lock = workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0)
    try:
        return _train_and_evaluate(config, workdir, lock)
    except RuntimeError as e:  # XLA's errors (jax.errors.JaxRuntimeError) are RuntimeErrors
        memory = _out_of_memory(e, config)
        if memory is None:
            raise
        raise memory from e
    except (OSError, ValueError) as e:
        # Orbax and TensorStore report a full or read-only disk from their threads, naming no path a user knows
        # (TensorStore as a ValueError 'RESOURCE_EXHAUSTED ... No space left on device').
        cause = e if errors.is_output_failure(e) else (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if "No space left on device" in str(e) else None)
        if cause is None or isinstance(e, errors.OutputError):
            raise
        raise errors.OutputError(
            f"Could not write to the run directory {workdir}: {errors.describe_os_error(cause)}. "
            f"{errors.output_advice(cause)} The run resumes from its last complete checkpoint.") from e
    finally:
        lock.release()


def _take(lock: workdir_lock.WorkdirLock) -> None:
    """Takes the workdir lock on process 0 and stops every process if it is held elsewhere."""
    failure = None
    try:
        lock.acquire()
    except (errors.WorkdirBusyError, errors.OutputError) as e:
        failure = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        if int(multihost_utils.broadcast_one_to_all(np.int32(failure is not None))) and failure is None:
            failure = errors.WorkdirBusyError(f"Process 0 could not lock {lock.workdir} (see its message).")
    if failure is not None:
        raise failure


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir, lock: workdir_lock.WorkdirLock
                        ) -> dict[str, Any]:
    start_time = time.time()
    config_lib.validate(config, num_devices=jax.device_count())
    compilation_cache.enable(config.compilation_cache_dir)
    mesh = parallel.make_mesh()
    # The reporter creates the workdir at its first write, after the data have loaded.
    reporter = reporting.Reporter(workdir, is_main=jax.process_index() == 0)
    reporter.info("JAX %s: %d process(es), %d %s device(s); workdir %s", jax.__version__, jax.process_count(),
                  jax.device_count(), jax.devices()[0].platform, workdir)
    # An existing workdir is locked before the data load, so that a second trainer stops at once; a new one only
    # once the data have loaded (the lock creates it, and a run that fails on its data leaves nothing behind).
    if jax.process_count() == 1 and workdir.exists():  # (several processes might disagree on "exists")
        _take(lock)
    data = loading.load_data(config, mesh)
    _check_batch(config, data.train.num_examples)
    _take(lock)
    plan = _Durations.of(config, data.train.steps_per_epoch(config.batch_size))
    reporter.info("%s; %s", data.description, plan.describe(config.batch_size))

    if jax.devices()[0].platform == "cpu" and config.compute_dtype == "bfloat16":
        # XLA's CPU backend (jaxlib 0.10) widens bfloat16 convolutions and matmuls to float32 (convert, f32 kernel,
        # convert back): bf16 is no faster there and only less precise (experiments/results/cpu_bf16/).
        reporter.info("compute_dtype=bfloat16 on the CPU: XLA computes its convolutions in float32 here, so bfloat16 "
                      "is no faster than float32 (experiments/results/cpu_bf16/); pass dtype=float32 in the config "
                      "argument for full precision at the same speed.")
    model = model_factory.build_model(config)
    tx, schedule = experiment.build_optimizer(config, total_steps=plan.total, warmup_steps=plan.warmup)
    train_step = steps.make_train_step(model, tx, experiment.build_loss(config), mesh, augment_config=config.augment,
                                       compute_dtype=jnp.dtype(config.compute_dtype))
    targets = tuple(config.targets)
    probability = probabilities.probability_fn(model)

    def make_evaluator(dataset, *, distances=False, num_panel=0):
        return evaluator.Evaluator(dataset, probability, targets, batch_size=config.eval_batch_size or None,
                                   distances=distances, num_panel=num_panel)

    val_evaluator = make_evaluator(data.val, num_panel=config.max_panels)
    ckpt = checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                           cleanup_tmp=True)
    state, meta, resumed_from = _resume_or_init(config, model, tx, mesh, ckpt, reporter, data.source)
    step = start_step = int(parallel.fetch(state.step))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    compile_start = time.perf_counter()
    if step < plan.total or "train_step_gflops" not in meta:
        compiled_step, step_flops = _compile(train_step, state, data.train.train_batch(step), num_params, config,
                                             reporter)
    else:
        # A finished run run again (to evaluate it again, or by a script): nothing to train, so the train step is not
        # compiled (tens of seconds at full width on a CPU without the cache); its FLOPs are the ones recorded.
        compiled_step, step_flops = None, float(meta["train_step_gflops"]) * 1e9
        reporter.info("Nothing left to train (step %d of %d): the train step is not compiled.", step, plan.total)
    train_time = float(meta.get("train_time_s", 0.0))
    metrics = _StepMetrics(lambda n, m: _stop_non_finite(n, m, plan.total, config, ckpt, reporter, start_time))
    status = "completed"
    profile = _Profile(workdir / "profile", start_step, int(config.get("profile_steps", 0)), plan.total, reporter)
    try:
        # Multi-process runs leave SIGTERM to JAX's preemption service (`reached_preemption`), which makes every
        # process stop at the same step; a Python handler would take the signal away from it.
        with checkpointing.SigtermFlag(enabled=jax.process_count() == 1) as sigterm:
            segment_start = time.perf_counter()
            while step < plan.total:
                profile.before(step)
                state, step_metrics = compiled_step(state, data.train.train_batch(step))
                step += 1
                metrics.add(step, step_metrics)
                profile.after(step, state)
                if step == start_step + 1:
                    jax.block_until_ready(state)
                    reporter.info("First step (including compilation) took %.1f s.",
                                  time.perf_counter() - compile_start)
                    # Compilation is not training time: rates start after the first step.
                    segment_start = time.perf_counter()
                    metrics.restart_rate(step)
                is_log = step % config.log_every_steps == 0 or step == plan.total
                is_eval = step % plan.eval_every == 0 or step == plan.total
                preempted = sigterm.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step))
                is_ckpt = step % plan.ckpt_every == 0 or step == plan.total or is_eval or preempted
                if not (is_log or is_ckpt):
                    continue
                metrics.check()  # reading the finite flags syncs with the device: only before logs, evals, saves
                elapsed = time.perf_counter() - segment_start
                train_time += elapsed
                if is_log:
                    metrics.log(step, elapsed, lr=float(schedule(step)), total=plan.total,
                                batch_size=config.batch_size, targets=targets, reporter=reporter)
                else:
                    metrics.add_time(elapsed)
                results = _validate(val_evaluator, state, step, targets, reporter) if is_eval else None
                if is_ckpt and ckpt.save(step, state, meta={"train_time_s": train_time, "config_name": config.name,
                                                            "num_devices": jax.device_count(),
                                                            "model": config.model.to_dict(),
                                                            "train_step_gflops": step_flops / 1e9},
                                         metrics=None if results is None else {"dice/mean": results["dice/mean"]}):
                    reporter.info("Saving checkpoint step %d (asynchronously).", step)
                if preempted:
                    status = "preempted"
                    reporter.info("SIGTERM received: saved checkpoint step %d in %s; rerun the same command to "
                                  "resume.", step, ckpt.directory)
                    break
                segment_start = time.perf_counter()  # evaluation and saving are not training time
        ckpt.wait_until_finished()
        summary: dict[str, Any] = {
            "status": status, "config_name": config.name, "config_arg": config.arg, "workdir": str(workdir),
            # The order of the output channels, so that summary.json reads without config.json.
            "targets": list(targets), "step": step, "num_train_steps": plan.total,
            "steps_per_epoch": plan.steps_per_epoch, "global_batch_size": config.batch_size,
            "num_devices": jax.device_count(), "num_processes": jax.process_count(), "resumed_from_step": resumed_from,
            "steps_this_run": step - start_step, "train_time_s": train_time, "num_params": num_params,
            "train_step_gflops": step_flops / 1e9,
            "num_examples": {"train": data.train.num_examples, "val": data.val.num_examples,
                             "test": data.test.num_examples if data.test is not None else 0},
        }
        if status == "completed":
            splits = {"val": data.val, **({"test": data.test} if data.test is not None else {})}
            summary.update(_final_scores({k: make_evaluator(d, distances=True) for k, d in splits.items()},
                                         state, step, ckpt, targets, reporter))
        summary["wall_time_s"] = time.time() - start_time
        if status == "completed":
            reporter.write_summary(summary)
        return summary
    finally:
        ckpt.close()
        reporter.close()


# ------------------------------------------------------------------------------------------------- helpers


def _check_batch(config: ml_collections.ConfigDict, num_train: int) -> None:
    """A global batch larger than the training set repeats examples within a batch and costs memory for nothing
    (batch_size=100000 with 25 examples compiled for a minute, then ran out of memory): refused before compiling."""
    if config.batch_size > num_train:
        raise config_lib.ConfigError(
            f"batch_size={config.batch_size} is larger than the {num_train} training examples of "
            f"{config.dataset.name}; a batch cannot hold more examples than there are. Use --config.batch_size=N "
            f"with N <= {num_train} and a multiple of the {jax.device_count()} devices.")


def _out_of_memory(error: BaseException, config: ml_collections.ConfigDict) -> config_lib.ConfigError | None:
    """The message for a device that ran out of memory (XLA's RESOURCE_EXHAUSTED), else None: the config asks for
    more than the machine holds."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or "No space left on device" in text:
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    return config_lib.ConfigError(
        f"The device ran out of memory ({first}) at batch_size={config.batch_size}, image_size="
        f"{tuple(config.image_size)}, model {config.model.name}. Lower --config.batch_size or the image size (or use "
        "a device with more memory); a run with checkpoints resumes from its last complete one.")


@dataclasses.dataclass(frozen=True)
class _Durations:
    """The run's length and intervals in steps (`config_lib.resolve_steps`: epochs or steps, steps win)."""

    steps_per_epoch: int
    total: int
    warmup: int
    eval_every: int
    ckpt_every: int

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> _Durations:
        resolve = config_lib.resolve_steps
        return cls(steps_per_epoch, resolve(config, "num_train", steps_per_epoch),
                   resolve(config, "warmup", steps_per_epoch, required=False),
                   resolve(config, "eval_every", steps_per_epoch), resolve(config, "checkpoint_every", steps_per_epoch))

    def describe(self, batch_size: int) -> str:
        return (f"{self.steps_per_epoch} steps per epoch at global batch {batch_size}; {self.total} steps "
                f"({self.total / self.steps_per_epoch:.1f} epochs), evaluating every {self.eval_every} and "
                f"checkpointing every {self.ckpt_every} steps")


def _resume_or_init(config, model, tx, mesh, ckpt: checkpointing.CheckpointManager, reporter: reporting.Reporter,
                    data_source) -> tuple[steps.TrainState, dict[str, Any], int | None]:
    """``(state, checkpoint meta, restored step or None)``: the newest intact checkpoint restored (damaged ones set
    aside), else a fresh state; ``metrics.jsonl`` lines past it dropped; ``config.json`` written (a differing one
    kept first in ``config_history/``, `reporting.Reporter.write_config`, with a warning listing the changes)."""
    # config.json records the data actually used: the prepared directory and the source it was built from.
    config_dict = {**config.to_dict(), "data_source": data_source}
    # Restoring into shapes alone skips compiling the initialisation.
    resumed = ckpt.restore_latest_intact(experiment.abstract_train_state(model, tx, config.image_size, mesh),
                                         model_config=config.model.to_dict())
    resumed_from = None if resumed is None else resumed[0]
    # Lines past the restored step (or every line, starting afresh) belong to steps that run again.
    dropped = reporter.truncate_metrics(resumed_from or 0)
    meta: dict[str, Any] = {}
    if resumed is None:
        state = experiment.init_train_state(config, model, tx, mesh)
        if dropped:
            reporter.info("No checkpoint to resume from: dropped %d metrics lines of an earlier attempt.", dropped)
    else:
        _, state, meta = resumed
        reporter.info("Resumed from checkpoint step %d (%d later metrics lines dropped: those steps rerun).",
                      resumed_from, dropped)
    old_config = reporter.workdir / "config.json"
    changes = []
    if reporter.is_main and old_config.exists():
        try:
            changes = nested_diff(json.loads(old_config.read_text()), jsonable(config_dict))
        except ValueError:
            changes = ["(the old config.json is not readable JSON)"]
    kept = reporter.write_config(config_dict)
    if changes:
        logging.warning("The config differs from the one this workdir was %s with:\n  %s\nThe earlier config is "
                        "kept in %s; config.json now records this run's.", "started" if resumed is None else
                        "last run", "\n  ".join(changes), kept)
    reporter.write_hparams(config_dict)
    return state, meta, resumed_from


def _compile(train_step, state, batch, num_params: int, config, reporter: reporting.Reporter
             ) -> tuple[Callable, float]:
    """``(compiled step, FLOPs of one global step)``, logged with the parameter count."""
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    step_flops = _cost(compiled) * jax.device_count()
    reporter.info("%s: %.2f M parameters; %.1f GFLOP per training step (%.2f per image); train step compiled in "
                  "%.1f s.", config.model.name, num_params / 1e6, step_flops / 1e9,
                  step_flops / 1e9 / config.batch_size, time.perf_counter() - start)
    return compiled, step_flops


class _StepMetrics:
    """Step metrics on their way to the log: those whose ``finite`` flag is not yet read from the device, and the
    checked ones since the last progress line. ``on_non_finite(step, metrics)`` is called (and must raise) for the
    first non-finite step found."""

    def __init__(self, on_non_finite: Callable[[int, dict[str, Any]], None]):
        self._on_non_finite = on_non_finite
        self._unchecked: list[tuple[int, dict[str, jax.Array]]] = []
        self._window: list[dict[str, np.ndarray]] = []
        self._window_time, self._window_step = 0.0, 0

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._unchecked.append((step, metrics))

    def restart_rate(self, step: int) -> None:
        """Rates count from ``step`` (after the first step, whose time is mostly compilation)."""
        self._window_time, self._window_step = 0.0, step

    def check(self) -> None:
        fetched = parallel.fetch(self._unchecked)
        self._unchecked.clear()
        for n, m in fetched:
            if not bool(m["finite"]):
                self._on_non_finite(n, m)
            self._window.append(m)

    def add_time(self, seconds: float) -> None:
        self._window_time += seconds

    def log(self, step: int, seconds: float, *, lr: float, total: int, batch_size: int, targets,
            reporter: reporting.Reporter) -> None:
        """The progress line and the 'train' metrics record of the steps since the last one."""
        self._window_time += seconds
        if not self._window:
            return
        rate = (step - self._window_step) / max(self._window_time, 1e-9)
        dice = np.nanmean(np.stack([m["dice"] for m in self._window]), axis=0)
        extra = {f"dice/{t}": float(dice[c]) for c, t in enumerate(targets)}
        values = {"loss": float(np.mean([m["loss"] for m in self._window])), "lr": lr,
                  "grad_norm": float(np.mean([m["grad_norm"] for m in self._window])),
                  "steps_per_s": rate, "images_per_s": rate * batch_size, **extra}
        reporter.info(reporting.format_progress(step=step, total=total, loss=values["loss"], lr=lr,
                                                steps_per_s=rate, images_per_s=values["images_per_s"], extra=extra))
        reporter.log_metrics(step, "train", values)
        self._window.clear()
        self.restart_rate(step)


def _stop_non_finite(step: int, m: dict[str, Any], total: int, config, ckpt: checkpointing.CheckpointManager,
                     reporter: reporting.Reporter, start_time: float) -> None:
    """Records a non-finite step (metrics line, summary.json) and raises `NonFiniteError` saying what to do."""
    ckpt.wait_until_finished()
    last = ckpt.latest_step()
    where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
             else "no checkpoint had been saved yet")
    message = (f"Training stopped at step {step} of {total}: the loss or a gradient became non-finite "
               f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}). That update was skipped and nothing "
               f"after step {step - 1} was saved; {where}. Lower optimizer.learning_rate (now "
               f"{config.optimizer.learning_rate}), lengthen the warm-up or lower optimizer.grad_clip_norm, then "
               "rerun (it resumes from the last good checkpoint).")
    reporter.log_metrics(step, "train", {"event": "non_finite", "loss": float(m["loss"]),
                                         "grad_norm": float(m["grad_norm"])})
    reporter.write_summary({"status": "non_finite", "step": step, "message": message, "last_good_checkpoint": last,
                            "config_name": config.name, "wall_time_s": time.time() - start_time})
    raise NonFiniteError(message)


class _Profile:
    """A `jax.profiler` trace of ``num_steps`` steps after the first (``config.profile_steps``; 0: none)."""

    def __init__(self, where, start_step: int, num_steps: int, total: int, reporter: reporting.Reporter):
        self._where, self._reporter = where, reporter
        self._range = (start_step + 2, min(start_step + 2 + num_steps, total)) if num_steps > 0 else None

    def before(self, step: int) -> None:
        if self._range and step == self._range[0]:
            jax.profiler.start_trace(str(self._where))

    def after(self, step: int, state) -> None:
        if self._range and step == self._range[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self._reporter.info("Wrote a profile of steps %d-%d to %s.", self._range[0] + 1, step, self._where)
            self._range = None


def _validate(val_evaluator: evaluator.Evaluator, state, step: int, targets, reporter: reporting.Reporter
              ) -> dict[str, float]:
    """Scores the validation split, logs it, draws its panel; returns the scalars (``dice/mean`` ranks checkpoints)."""
    result = val_evaluator.run(steps.model_variables(state))
    reporter.info(reporting.format_eval(step, "val", result.scalars, targets))
    reporter.log_metrics(step, "val", result.scalars)
    if result.panel is not None:
        panel = result.panel
        reporter.save_panel(step, panel["image"], panel["truth"], panel["probs"], targets,
                            truth_weights=panel["weights"])
    return result.scalars


def _final_scores(final_evaluators: dict[str, evaluator.Evaluator], state, step: int,
                  ckpt: checkpointing.CheckpointManager, targets, reporter: reporting.Reporter) -> dict[str, Any]:
    """``{'final': ..., 'best': ...}``: the final and the best checkpoint scored on every split (distances too)."""

    def scores(scored_state, scored_step: int) -> dict[str, Any]:
        variables = steps.model_variables(scored_state)
        return {"step": scored_step, **{split: e.run(variables).scalars for split, e in final_evaluators.items()}}

    out = {"final": scores(state, step)}
    best_step = ckpt.best_step()
    out["best"] = scores(ckpt.restore(best_step, state)[0], best_step) if best_step not in (None, step) \
        else out["final"]
    for which in ("final", "best"):
        for split in final_evaluators:
            reporter.info(reporting.format_eval(out[which]["step"], f"{which} {split}", out[which][split], targets))
    return out
