"""The training loop: data-parallel steps over every device of every host, evaluation, checkpoints, outputs.

`train_and_evaluate(config, workdir)` is what ``python -m anemia_jax.main`` runs:

1. Validates the config, enables the persistent compilation cache, builds the 1-D ``data`` mesh.
2. Prepares the TFDS dataset (process 0 first), cuts the patient-level split, and puts train/validation(/test)
   examples into device memory (`input_pipeline.DeviceDataset`).
3. Builds model, loss, AdamW + warm-up/cosine, the `steps.TrainState`, and restores the latest checkpoint of
   ``<workdir>/checkpoints`` if there is one (the data position is the step: batches are a function of it).
4. Trains, logging a progress line every ``log_every_steps``, evaluating on the validation split every
   ``eval_every_*`` (per-image Dice/IoU/precision/recall per target, PNG panel), checkpointing every
   ``checkpoint_every_*`` and at each evaluation (keeping the latest plus the best by validation mean Dice).
5. At the end evaluates the final and the best state on validation (with HD95) and on the test split if the
   protocol has one, and writes ``summary.json``.

Stops: a non-finite loss or gradient raises `NonFiniteError` naming the step, after checking every step since the
last check, so nothing bad is ever saved and the last good checkpoint stays. SIGTERM (preemptible TPU VMs)
finishes the current step, saves a checkpoint and returns with ``status='preempted'``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

from anemia_jax import (augment, checkpointing, config_lib, datasets, input_pipeline, losses, metrics, models,
                        optim, parallel, reporting, splits, steps)


class DataNotFoundError(FileNotFoundError):
    """The dataset's source files are missing; the message says where they were looked for and how to provide them."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class Data:
    """The datasets of a run, resident on the devices."""

    train: input_pipeline.DeviceDataset
    val: input_pipeline.DeviceDataset
    test: input_pipeline.DeviceDataset | None
    description: str


# ------------------------------------------------------------------------------------------------- set-up


def enable_compilation_cache(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path``, so that a rerun skips compilation.

    ``''`` leaves JAX's setting as it is. Otherwise ``path`` (local, created if missing, or a URL such as
    ``gs://bucket/jax_cache``) becomes the cache in effect even if another directory was set earlier in this process
    (another run, a library): JAX opens its cache once, at the first compilation, so it is reset to reopen here.
    """
    if not path:
        return
    target = reporting.as_path(path)
    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if current and str(reporting.as_path(current)) == str(target):
        return
    if current:
        logging.info("Switching the persistent compilation cache from %s to %s (config.compilation_cache_dir).",
                     current, target)
    if not reporting.is_url(target):
        target.mkdir(parents=True, exist_ok=True)
    compilation_cache.set_cache_dir(str(target))
    compilation_cache.reset_cache()


def get_builder(config: ml_collections.ConfigDict):
    """The prepared TFDS builder of ``config.dataset`` (process 0 prepares first, then the others)."""
    ds = config.dataset
    data_dir = os.path.expanduser(ds.data_dir) if ds.data_dir else None
    kwargs = {k: v for k, v in ds.builder_kwargs.items() if v != ""}
    builder = datasets.get_builder(ds.builder, data_dir=data_dir, config=ds.builder_config or None, **kwargs)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(ds.manual_dir) if ds.manual_dir else None)

    def prepare():
        try:
            builder.download_and_prepare(file_format="array_record", download_config=download_config)
        except FileNotFoundError as e:
            flags = [f"--config.dataset.builder_kwargs.{k}=PATH" for k in ds.builder_kwargs] + [
                "--config.dataset.manual_dir=DIR"]
            raise DataNotFoundError(f"Preparing dataset {ds.name!r} failed: {e}\nFrom the command line, point "
                                    f"the trainer at the files with {' or '.join(flags)}.") from e

    if jax.process_count() == 1:
        prepare()
    else:
        # On a shared data_dir the others then find it prepared; on per-host disks each prepares its own copy.
        if jax.process_index() == 0:
            prepare()
        multihost_utils.sync_global_devices("anemia_jax:dataset_prepared")
        if jax.process_index() != 0:
            prepare()
    return builder


def split_indices(config: ml_collections.ConfigDict, metadata: Mapping[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(train_idx, val_idx, test_idx or None)``: positions in ``config.dataset.split`` per the split protocol.

    kfold: validation is fold ``split.fold``. loco: test is ``split.test_country``; validation is a patient
    holdout of the other countries. holdout: validation is a patient holdout of the split (the test split, if the
    dataset has one, is a separate TFDS split, read elsewhere).
    """
    sp = config.split
    if sp.protocol == "kfold":
        train, val = splits.kfold_split(metadata, num_folds=sp.num_folds, fold=sp.fold, seed=sp.seed)
        return train, val, None
    if sp.protocol == "loco":
        rest, test = splits.leave_one_country_out(metadata, test_country=sp.test_country)
        keep, held = splits.holdout_split({k: v[rest] for k, v in metadata.items()}, fraction=sp.val_fraction,
                                          seed=sp.seed)
        return rest[keep], rest[held], test
    train, val = splits.holdout_split(metadata, fraction=sp.val_fraction, seed=sp.seed)
    return train, val, None


def load_data(config: ml_collections.ConfigDict, mesh) -> Data:
    """Prepares the dataset, cuts the split and puts every part into device memory."""
    builder = get_builder(config)
    ds = config.dataset
    metadata = input_pipeline.read_metadata(builder, ds.split)
    train_idx, val_idx, test_idx = split_indices(config, metadata)
    common = dict(image_size=tuple(config.image_size), targets=tuple(config.targets))
    eval_batch = config.eval_batch_size or config.batch_size
    make = input_pipeline.DeviceDataset.from_builder
    train = make(builder, ds.split, train_idx, mesh, batch_size=config.batch_size, seed=config.seed, **common)
    val = make(builder, ds.split, val_idx, mesh, batch_size=eval_batch, **common)
    test = None
    if test_idx is not None:
        test = make(builder, ds.split, test_idx, mesh, batch_size=eval_batch, **common)
    elif ds.test_split:
        n = builder.info.splits[ds.test_split].num_examples
        test = make(builder, ds.test_split, np.arange(n), mesh, batch_size=eval_batch, **common)
    description = (f"{ds.name} ({config.split.protocol}): {train.num_examples} train / {val.num_examples} val"
                   + (f" / {test.num_examples} test" if test is not None else "") + " examples")
    return Data(train, val, test, description)


def build_model(config: ml_collections.ConfigDict):
    """The flax model of ``config.model`` with one output channel per target and BatchNorm synced over 'data'."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    return models.get_model(config.model.name, num_classes=len(config.targets), dtype=config.compute_dtype,
                            bn_axis_name=parallel.DATA_AXIS, **kwargs)


def build_loss(config: ml_collections.ConfigDict) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``loss_fn(outputs, labels, weights) -> [B]`` from ``config.loss``; a model output with several heads (deep
    supervision) gets `losses.deep_supervision_loss` with ``loss.deep_supervision_weights`` (empty: the average)."""
    kwargs = {k: v for k, v in config.loss.items() if k not in ("name", "deep_supervision_weights")}
    base = losses.get_loss(config.loss.name, **kwargs)
    output_weights = tuple(config.loss.get("deep_supervision_weights", ())) or None

    def loss_fn(outputs, labels, weights):
        if len(outputs.heads) > 1:
            return losses.deep_supervision_loss(base, outputs.heads, labels, output_weights, pixel_weights=weights)
        return base(outputs.logits, labels, weights=weights)

    return loss_fn


def abstract_train_state(model, tx, image_size, mesh):
    """The `steps.TrainState` of ``model``/``tx`` as `jax.ShapeDtypeStruct`s replicated over ``mesh`` (no compute).

    What a checkpoint restores into, on any mesh: pass it to `checkpointing.CheckpointManager.restore`. Mirrors
    `steps.create_train_state` (same fields, shapes and dtypes; a test checks they agree).
    """

    def init():
        key = jax.random.key(0)
        variables = model.init({"params": key, "dropout": key}, jnp.zeros((1, *image_size, 3), jnp.float32),
                               train=False)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                                rng=jax.random.key_data(key))

    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(init))


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(state, dataset: input_pipeline.DeviceDataset, *, eval_step, predict_u8, targets, num_panel: int = 0,
             distances: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Scores ``state`` on every example of ``dataset`` (each exactly once).

    Returns:
        ``(results, panel)``. ``results``: ``<score>/<target>`` for dice, iou, precision, recall (mean over the
        images that have that mask), ``<score>/mean`` (mean over targets), ``pooled_dice/<target>``,
        ``num_images/<target>``; with ``distances``, also ``hd95/<target>`` and ``assd/<target>`` (mean over
        images with a finite distance), ``hd95_median/<target>`` and ``hd95_infinite/<target>`` (images where
        exactly one of prediction and truth is empty). ``panel``: the first ``num_panel`` examples' image,
        truth, probs, weights (None if ``num_panel`` is 0). Distances are computed on process 0 only.
    """
    acc = metrics.MetricsAccumulator()
    keys = ("tp", "fp", "fn", "tn", "weights", "index")
    panel: dict[str, list[np.ndarray]] = {"image": [], "truth": [], "probs": [], "weights": []}
    hd95, assd, include = [], [], []
    have = 0
    for batch in dataset.eval_batches():
        out = eval_step(state, batch)
        acc.add({k: out[k] for k in keys}, valid=out["valid"])
        if not (distances or have < num_panel):
            continue
        host = parallel.fetch({"probs": predict_u8(state, batch["image"]), "image": batch["image"],
                               "truth": batch["masks"], "weights": out["weights"], "valid": out["valid"]})
        valid = host.pop("valid")
        host = {k: v[valid] for k, v in host.items()}
        if have < num_panel:
            for k in panel:
                panel[k].append(host[k][: num_panel - have])
            have += min(len(host["image"]), num_panel - have)
        if distances and jax.process_index() == 0 and len(host["image"]):
            d = metrics.batch_surface_distances(host["probs"] > 0.5, host["truth"], percentile=95)
            hd95.append(d["hausdorff"])
            assd.append(d["assd"])
            include.append(host["weights"] > 0)
    values = acc.result()
    summary = metrics.summarize_counts(values, weights=values["weights"])
    results: dict[str, Any] = {}
    for name in ("dice", "iou", "precision", "recall"):
        for c, t in enumerate(targets):
            results[f"{name}/{t}"] = float(summary[name][c])
        per_target = summary[name][~np.isnan(summary[name])]
        results[f"{name}/mean"] = float(per_target.mean()) if per_target.size else math.nan
    for c, t in enumerate(targets):
        results[f"pooled_dice/{t}"] = float(summary["pooled_dice"][c])
        results[f"num_images/{t}"] = int(summary["num_images"][c])
    if hd95:
        hd95_all, assd_all, include_all = (np.concatenate(x) for x in (hd95, assd, include))
        for c, t in enumerate(targets):
            s = metrics.summarize_distances(hd95_all[:, c], include=include_all[:, c])
            results[f"hd95/{t}"] = s["mean"]
            results[f"hd95_median/{t}"] = s["median"]
            results[f"hd95_infinite/{t}"] = s["count_infinite"]
            results[f"assd/{t}"] = metrics.summarize_distances(assd_all[:, c], include=include_all[:, c])["mean"]
    return results, ({k: np.concatenate(v) for k, v in panel.items()} if num_panel else None)


# ------------------------------------------------------------------------------------------------ the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains and evaluates ``config``, writing everything under ``workdir``; resumes from its checkpoints.

    Args:
        config: a config from ``configs/`` (validated here).
        workdir: the run directory, local or on shared/cloud storage (``gs://bucket/runs/x``, used as given; see
            `reporting.as_path`); holds ``checkpoints/``, ``metrics.jsonl``, ``config.json``, ``panels/`` and, at
            the end, ``summary.json``. It is created only once the data are loaded, so a run that fails on its
            config or its data leaves nothing behind; an existing one is resumed, never cleared.

    Returns:
        The summary dict (also written to ``summary.json`` when training completed); ``status`` is 'completed',
        or 'preempted' after a SIGTERM (a checkpoint was saved; rerun to resume).

    Raises:
        config_lib.ConfigError: invalid config. NonFiniteError: the loss or a gradient became non-finite.
    """
    start_time = time.time()
    workdir = reporting.as_path(workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    enable_compilation_cache(config.compilation_cache_dir)
    mesh = parallel.make_mesh()
    # The reporter creates the workdir at its first write, after the data have loaded.
    reporter = reporting.Reporter(workdir, is_main=jax.process_index() == 0)
    reporter.info("JAX %s: %d process(es), %d %s device(s); workdir %s", jax.__version__, jax.process_count(),
                  jax.device_count(), jax.devices()[0].platform, workdir)

    data = load_data(config, mesh)
    steps_per_epoch = data.train.steps_per_epoch(config.batch_size)
    total = config_lib.resolve_steps(config, "num_train", steps_per_epoch)
    warmup = config_lib.resolve_steps(config, "warmup", steps_per_epoch, required=False)
    eval_every = config_lib.resolve_steps(config, "eval_every", steps_per_epoch)
    ckpt_every = config_lib.resolve_steps(config, "checkpoint_every", steps_per_epoch)
    reporter.info("%s; %d steps per epoch at global batch %d; %d steps (%.1f epochs), evaluating every %d and "
                  "checkpointing every %d steps", data.description, steps_per_epoch, config.batch_size, total,
                  total / steps_per_epoch, eval_every, ckpt_every)

    model = build_model(config)
    tx, schedule = optim.make_optimizer(config.optimizer, total_steps=total, warmup_steps=warmup)
    train_step = steps.make_train_step(model, tx, build_loss(config), mesh, augment_config=config.augment,
                                       compute_dtype=jnp.dtype(config.compute_dtype))
    eval_step = steps.make_eval_step(model, mesh)
    predict = steps.make_predict_fn(model, mesh)
    predict_u8 = jax.jit(lambda s, image: predict(s, augment.to_float(image)))
    targets = tuple(config.targets)
    do_eval = functools.partial(evaluate, eval_step=eval_step, predict_u8=predict_u8, targets=targets)

    ckpt = checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                           cleanup_tmp=True)
    meta: dict[str, Any] = {}
    resumed_from = ckpt.latest_step()
    config_dict = config.to_dict()
    if resumed_from is None:
        sample = np.zeros((1, *config.image_size, 3), np.float32)
        state = steps.create_train_state(model, tx, jax.random.key(config.seed), sample, mesh)
    else:
        # Restoring into shapes alone skips compiling the initialisation.
        state, meta = ckpt.restore(resumed_from, abstract_train_state(model, tx, config.image_size, mesh))
        dropped = reporter.truncate_metrics(resumed_from)
        reporter.info("Resumed from checkpoint step %d (%d later metrics lines dropped: those steps rerun).",
                      resumed_from, dropped)
        old_config = workdir / "config.json"
        if reporter.is_main and old_config.exists():
            changes = config_lib.config_diff(json.loads(old_config.read_text()), reporting.jsonable(config_dict))
            if changes:
                logging.warning("The config differs from the one this workdir was started with:\n  %s",
                                "\n  ".join(changes))
    reporter.write_config(config_dict)

    step = int(parallel.fetch(state.step))
    start_step = step
    train_time = float(meta.get("train_time_s", 0.0))
    unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # Steps whose `finite` flag is not yet read.
    window: list[dict[str, np.ndarray]] = []  # Checked step metrics since the last progress line.
    window_time, window_step = 0.0, step
    status = "completed"

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
                state, step_metrics = train_step(state, data.train.train_batch(step))
                step += 1
                unchecked.append((step, step_metrics))
                if step == start_step + 1:
                    jax.block_until_ready(state)
                    reporter.info("First step (including compilation) took %.1f s.",
                                  time.perf_counter() - segment_start)
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
                    results, panel = do_eval(state, data.val, num_panel=config.max_panels)
                    reporter.info(reporting.format_eval(step, "val", results, targets))
                    reporter.log_metrics(step, "val", results)
                    if panel is not None:
                        reporter.save_panel(step, panel["image"], panel["truth"], panel["probs"], targets,
                                            truth_weights=panel["weights"])
                if is_ckpt:
                    saved = ckpt.save(step, state, meta={"train_time_s": train_time, "config_name": config.name,
                                                         "num_devices": jax.device_count()},
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
            "steps_this_run": step - start_step, "train_time_s": train_time,
            "num_examples": {"train": data.train.num_examples, "val": data.val.num_examples,
                             "test": data.test.num_examples if data.test is not None else 0},
        }
        if status != "completed":
            summary["wall_time_s"] = time.time() - start_time
            return summary
        summary["final"] = _final_scores(state, data, step, do_eval)
        best_step = ckpt.best_step()
        if best_step is not None and best_step != step:
            best_state, _ = ckpt.restore(best_step, state)
            summary["best"] = _final_scores(best_state, data, best_step, do_eval)
        else:
            summary["best"] = summary["final"]
        for which in ("final", "best"):
            reporter.info(reporting.format_eval(summary[which]["step"], f"{which} val", summary[which]["val"],
                                                targets))
            if "test" in summary[which]:
                reporter.info(reporting.format_eval(summary[which]["step"], f"{which} test",
                                                    summary[which]["test"], targets))
        summary["wall_time_s"] = time.time() - start_time
        reporter.write_summary(summary)
        return summary
    finally:
        ckpt.close()


def _final_scores(state, data: Data, step: int, do_eval) -> dict[str, Any]:
    """Validation (and test) scores of ``state`` with boundary distances, for the summary."""
    scores = {"step": step, "val": do_eval(state, data.val, distances=True)[0]}
    if data.test is not None:
        scores["test"] = do_eval(state, data.test, distances=True)[0]
    return scores
