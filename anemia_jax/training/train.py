"""The training loop: data-parallel steps over every device of every host, evaluation, checkpoints, outputs.

`train_and_evaluate(config, workdir)` is what ``python -m anemia_jax.main`` runs; everything it trains and scores is
built from the config by `anemia_jax.training.experiment`, and evaluated by `anemia_jax.evaluation.evaluator.Evaluator`:

1. Validates the config, enables the persistent compilation cache, builds the 1-D ``data`` mesh.
2. Loads the data (`experiment.load_data`: patient-level split, examples resident on the devices).
3. Builds model, loss, optimizer and train state, and restores the latest checkpoint of ``<workdir>/checkpoints``
   if there is one (the data position is the step: batches are a function of it). Logs the parameter count and the
   FLOPs of one training step.
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

import errno
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from anemia_jax.evaluation import evaluator
from anemia_jax.inference import probabilities
from anemia_jax.runs import checkpointing, config_lib
from anemia_jax.training import experiment, reporting, steps
from anemia_jax.utils import errors, parallel
from anemia_jax.training import workdir_lock

DataNotFoundError = experiment.DataNotFoundError  # re-exported: what `main` reports for missing data


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
            `reporting.as_path`); holds ``checkpoints/``, ``metrics.jsonl``, ``config.json``, ``panels/``,
            TensorBoard event files and, at the end, ``summary.json``. It is created only once the data are loaded,
            so a run that fails on its config or its data leaves nothing behind; an existing one is resumed, never
            cleared.

    Returns:
        The summary dict (also written to ``summary.json`` when training completed); ``status`` is 'completed',
        or 'preempted' after a SIGTERM (a checkpoint was saved; rerun to resume).

    Raises:
        config_lib.ConfigError: invalid config. errors.DataError (experiment.DataNotFoundError...): missing or
        unusable data. errors.WorkdirBusyError: another trainer holds the workdir. errors.CheckpointError: no
        usable checkpoint, or checkpoints of another model. errors.OutputError: the workdir cannot be written.
        NonFiniteError: the loss or a gradient became non-finite.
    """
    workdir = reporting.as_path(workdir)
    lock = workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0)
    try:
        return _train_and_evaluate(config, workdir, lock)
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
    experiment.enable_compilation_cache(config.compilation_cache_dir)
    mesh = parallel.make_mesh()
    # The reporter creates the workdir at its first write, after the data have loaded.
    reporter = reporting.Reporter(workdir, is_main=jax.process_index() == 0)
    reporter.info("JAX %s: %d process(es), %d %s device(s); workdir %s", jax.__version__, jax.process_count(),
                  jax.device_count(), jax.devices()[0].platform, workdir)
    # An existing workdir is locked before the data load, so that a second trainer stops at once; a new one only
    # once the data have loaded (the lock creates it, and a run that fails on its data leaves nothing behind).
    if jax.process_count() == 1 and workdir.exists():  # (several processes might disagree on "exists")
        _take(lock)
    data = experiment.load_data(config, mesh)
    _take(lock)
    steps_per_epoch = data.train.steps_per_epoch(config.batch_size)
    total = config_lib.resolve_steps(config, "num_train", steps_per_epoch)
    warmup = config_lib.resolve_steps(config, "warmup", steps_per_epoch, required=False)
    eval_every = config_lib.resolve_steps(config, "eval_every", steps_per_epoch)
    ckpt_every = config_lib.resolve_steps(config, "checkpoint_every", steps_per_epoch)
    reporter.info("%s; %d steps per epoch at global batch %d; %d steps (%.1f epochs), evaluating every %d and "
                  "checkpointing every %d steps", data.description, steps_per_epoch, config.batch_size, total,
                  total / steps_per_epoch, eval_every, ckpt_every)

    model = experiment.build_model(config)
    tx, schedule = experiment.build_optimizer(config, total_steps=total, warmup_steps=warmup)
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
    meta: dict[str, Any] = {}
    # config.json records the data actually used: the prepared directory and the source it was built from.
    config_dict = {**config.to_dict(), "data_source": data.source}
    # Restoring into shapes alone skips compiling the initialisation; damaged checkpoints are set aside.
    resumed = ckpt.restore_latest_intact(experiment.abstract_train_state(model, tx, config.image_size, mesh),
                                         model_config=config.model.to_dict())
    resumed_from = None if resumed is None else resumed[0]
    # Lines past the restored step (or every line, starting afresh) belong to steps that run again.
    dropped = reporter.truncate_metrics(resumed_from or 0)
    if resumed is None:
        state = experiment.init_train_state(config, model, tx, mesh)
        if dropped:
            reporter.info("No checkpoint to resume from: dropped %d metrics lines of an earlier attempt.", dropped)
    else:
        _, state, meta = resumed
        reporter.info("Resumed from checkpoint step %d (%d later metrics lines dropped: those steps rerun).",
                      resumed_from, dropped)
        old_config = workdir / "config.json"
        if reporter.is_main and old_config.exists():
            changes = config_lib.config_diff(json.loads(old_config.read_text()), reporting.jsonable(config_dict))
            if changes:
                logging.warning("The config differs from the one this workdir was started with:\n  %s",
                                "\n  ".join(changes))
    reporter.write_config(config_dict)
    reporter.write_hparams(config_dict)

    step = int(parallel.fetch(state.step))
    start_step = step
    compile_start = time.perf_counter()
    compiled_step = train_step.lower(state, data.train.train_batch(step)).compile()
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    step_flops = _cost(compiled_step) * jax.device_count()
    reporter.info("%s: %.2f M parameters; %.1f GFLOP per training step (%.2f per image); train step compiled in "
                  "%.1f s.", config.model.name, num_params / 1e6, step_flops / 1e9,
                  step_flops / 1e9 / config.batch_size, time.perf_counter() - compile_start)
    train_time = float(meta.get("train_time_s", 0.0))
    unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # Steps whose `finite` flag is not yet read.
    window: list[dict[str, np.ndarray]] = []  # Checked step metrics since the last progress line.
    window_time, window_step = 0.0, step
    status = "completed"
    profile_steps = int(config.get("profile_steps", 0))
    profile_range = (start_step + 2, start_step + 2 + profile_steps) if profile_steps > 0 else None

    def check_finite() -> None:
        # Reading the flags syncs with the device, so it happens only before logs, evaluations and saves.
        fetched = parallel.fetch(unchecked)
        unchecked.clear()
        for n, m in fetched:
            if not bool(m["finite"]):
                ckpt.wait_until_finished()
                last = ckpt.latest_step()
                where = (f"the last good checkpoint is step {last} in {ckpt.directory}"
                         if last is not None else "no checkpoint had been saved yet")
                message = (
                    f"Training stopped at step {n} of {total}: the loss or a gradient became non-finite "
                    f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}). That update was skipped and "
                    f"nothing after step {n - 1} was saved; {where}. Lower optimizer.learning_rate (now "
                    f"{config.optimizer.learning_rate}), lengthen the warm-up or lower optimizer.grad_clip_norm, "
                    f"then rerun (it resumes from the last good checkpoint).")
                reporter.log_metrics(n, "train", {"event": "non_finite", "loss": float(m["loss"]),
                                                  "grad_norm": float(m["grad_norm"])})
                reporter.write_summary({"status": "non_finite", "step": n, "message": message,
                                        "last_good_checkpoint": last, "config_name": config.name,
                                        "wall_time_s": time.time() - start_time})
                raise NonFiniteError(message)
            window.append(m)

    try:
        # Multi-process runs leave SIGTERM to JAX's preemption service (`reached_preemption`), which makes every
        # process stop at the same step; a Python handler would take the signal away from it.
        with checkpointing.SigtermFlag(enabled=jax.process_count() == 1) as sigterm:
            segment_start = time.perf_counter()
            while step < total:
                if profile_range and step == profile_range[0]:
                    jax.profiler.start_trace(str(workdir / "profile"))
                state, step_metrics = compiled_step(state, data.train.train_batch(step))
                step += 1
                unchecked.append((step, step_metrics))
                if profile_range and step == min(profile_range[1], total):
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    reporter.info("Wrote a profile of steps %d-%d to %s.", profile_range[0] + 1, step,
                                  workdir / "profile")
                    profile_range = None
                if step == start_step + 1:
                    jax.block_until_ready(state)
                    reporter.info("First step (including compilation) took %.1f s.",
                                  time.perf_counter() - compile_start)
                    # Compilation is not training time: rates start after the first step.
                    segment_start, window_step = time.perf_counter(), step
                is_log = step % config.log_every_steps == 0 or step == total
                is_eval = step % eval_every == 0 or step == total
                preempted = sigterm.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step))
                is_ckpt = step % ckpt_every == 0 or step == total or is_eval or preempted
                if not (is_log or is_ckpt):
                    continue
                check_finite()
                elapsed = time.perf_counter() - segment_start
                window_time += elapsed
                train_time += elapsed
                if is_log and window:
                    rate = (step - window_step) / max(window_time, 1e-9)
                    dice = np.nanmean(np.stack([m["dice"] for m in window]), axis=0)
                    extra = {f"dice/{t}": float(dice[c]) for c, t in enumerate(targets)}
                    values = {"loss": float(np.mean([m["loss"] for m in window])), "lr": float(schedule(step)),
                              "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
                              "steps_per_s": rate, "images_per_s": rate * config.batch_size, **extra}
                    reporter.info(reporting.format_progress(
                        step=step, total=total, loss=values["loss"], lr=values["lr"], steps_per_s=rate,
                        images_per_s=values["images_per_s"], extra=extra))
                    reporter.log_metrics(step, "train", values)
                    window.clear()
                    window_time, window_step = 0.0, step
                results = None
                if is_eval:
                    result = val_evaluator.run(steps.model_variables(state))
                    results = result.scalars
                    reporter.info(reporting.format_eval(step, "val", results, targets))
                    reporter.log_metrics(step, "val", results)
                    if result.panel is not None:
                        panel = result.panel
                        reporter.save_panel(step, panel["image"], panel["truth"], panel["probs"], targets,
                                            truth_weights=panel["weights"])
                if is_ckpt:
                    saved = ckpt.save(step, state, meta={"train_time_s": train_time, "config_name": config.name,
                                                         "num_devices": jax.device_count(),
                                                         "model": config.model.to_dict()},
                                      metrics=None if results is None else {"dice/mean": results["dice/mean"]})
                    if saved:
                        reporter.info("Saving checkpoint step %d (asynchronously).", step)
                if preempted:
                    status = "preempted"
                    reporter.info("SIGTERM received: saved checkpoint step %d in %s; rerun the same command to "
                                  "resume.", step, ckpt.directory)
                    break
                # Evaluation and saving are not training time.
                segment_start = time.perf_counter()
        ckpt.wait_until_finished()
        summary: dict[str, Any] = {
            "status": status, "config_name": config.name, "config_arg": config.arg, "workdir": str(workdir),
            # The order of the output channels, so that summary.json reads without config.json.
            "targets": list(targets), "step": step, "num_train_steps": total, "steps_per_epoch": steps_per_epoch,
            "global_batch_size": config.batch_size, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "resumed_from_step": resumed_from,
            "steps_this_run": step - start_step, "train_time_s": train_time, "num_params": num_params,
            "train_step_gflops": step_flops / 1e9,
            "num_examples": {"train": data.train.num_examples, "val": data.val.num_examples,
                             "test": data.test.num_examples if data.test is not None else 0},
        }
        if status != "completed":
            summary["wall_time_s"] = time.time() - start_time
            return summary
        final_evaluators = {"val": make_evaluator(data.val, distances=True)}
        if data.test is not None:
            final_evaluators["test"] = make_evaluator(data.test, distances=True)

        def final_scores(scored_state, scored_step: int) -> dict[str, Any]:
            variables = steps.model_variables(scored_state)
            return {"step": scored_step, **{split: e.run(variables).scalars for split, e in final_evaluators.items()}}

        summary["final"] = final_scores(state, step)
        best_step = ckpt.best_step()
        if best_step is not None and best_step != step:
            best_state, _ = ckpt.restore(best_step, state)
            summary["best"] = final_scores(best_state, best_step)
        else:
            summary["best"] = summary["final"]
        for which in ("final", "best"):
            for split in final_evaluators:
                reporter.info(reporting.format_eval(summary[which]["step"], f"{which} {split}",
                                                    summary[which][split], targets))
        summary["wall_time_s"] = time.time() - start_time
        reporter.write_summary(summary)
        return summary
    finally:
        ckpt.close()
        reporter.close()
