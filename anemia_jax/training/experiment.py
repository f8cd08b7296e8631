"""From a config to the objects of an experiment: data, splits, model, loss, optimizer, train state.

One place builds each object, so training (`anemia_jax.training.train`), evaluation and prediction of a finished run
(`anemia_jax.runs.restore`, `anemia_jax.evaluate`, `anemia_jax.predict`), the experiment scripts and the benchmark all
see exactly the same model, loss and data as the trainer did:

* `prepare_builder`: the prepared TFDS builder of ``config.dataset`` (process 0 prepares first), checked to have
  been prepared from the source the config names (`datasets.source_record`); `data_source` says which that was.
* `split_indices` / `eval_split`: the patient-level cut of the split protocol (K-fold, leave one country out,
  holdout), for training and for scoring a finished run.
* `load_data`: train / validation (/ test) examples resident on the devices (`input_pipeline.DeviceDataset`).
* `build_model`, `build_loss`, `build_optimizer`: the flax model (BatchNorm synced over the mesh axis), the
  per-example loss on a `models.SegmentationOutput` (deep supervision when the model has several heads), AdamW on a
  warm-up + cosine schedule.
* `init_train_state` / `abstract_train_state` / `abstract_variables`: a fresh replicated `steps.TrainState`, and
  shapes-only templates that checkpoints restore into (the variables template needs no optimizer).
* `enable_compilation_cache`: the persistent compilation cache the config asks for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from anemia_jax import losses, models
from anemia_jax.data import datasets, input_pipeline
from anemia_jax.runs import config_lib
from anemia_jax.training import optim, reporting
from anemia_jax.utils import errors, parallel
from anemia_jax.data import splits
from anemia_jax.training import steps
from anemia_jax.data.datasets import source_record

ConfigDict = ml_collections.ConfigDict
LossFn = Callable[[models.SegmentationOutput, jax.Array, jax.Array], jax.Array]

__all__ = ["Data", "DataNotFoundError", "abstract_train_state", "abstract_variables", "build_loss", "build_model",
           "build_optimizer", "data_source", "enable_compilation_cache", "eval_split", "init_train_state", "load_data",
           "prepare_builder", "split_indices"]


class DataNotFoundError(errors.DataError, FileNotFoundError):
    """The dataset's source files are missing; the message says where they were looked for and how to provide them."""


@dataclasses.dataclass
class Data:
    """The datasets of a run, resident on the devices."""

    train: input_pipeline.DeviceDataset
    val: input_pipeline.DeviceDataset
    test: input_pipeline.DeviceDataset | None
    description: str
    source: dict[str, Any] | None = None  # `data_source` of the prepared dataset


# ------------------------------------------------------------------------------------------------- runtime


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


# ---------------------------------------------------------------------------------------------------- data


def prepare_builder(config: ConfigDict):
    """The prepared TFDS builder of ``config.dataset``; prepares it if needed (process 0 first, then the others).

    A dataset already prepared in ``data_dir`` is reused only if it was built from the source (and with the options)
    that the config names now (`datasets.source_record.check`).

    Raises:
        DataNotFoundError: the source files are missing; the message names the flags that point at them.
        errors.DataError: the source is unusable, or the prepared data came from another source
            (`source_record.SourceMismatchError`, naming both).
        config_lib.ConfigError: a ``dataset.builder_kwargs`` value the builder rejects.
    """
    ds = config.dataset
    data_dir = os.path.expanduser(ds.data_dir) if ds.data_dir else None
    kwargs = {k: v for k, v in ds.builder_kwargs.items() if v != ""}
    try:
        builder = datasets.get_builder(ds.builder, data_dir=data_dir, config=ds.builder_config or None, **kwargs)
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"config.dataset.builder_kwargs ({', '.join(kwargs) or 'none'}) or "
                                     f"builder_config={ds.builder_config!r}: {e}") from None
    manual_dir = os.path.expanduser(ds.manual_dir) if ds.manual_dir else None
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)

    def prepare():
        try:
            source_record.check(builder, manual_dir)
            builder.download_and_prepare(file_format="array_record", download_config=download_config)
        except errors.DataError:
            raise
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
    _compare_with_trained(config, builder)
    return builder


def _compare_with_trained(config: ConfigDict, builder) -> None:
    """Warns when a finished run's recorded data (``config.data_source``, from its config.json) differ from the
    prepared data now in use, e.g. an evaluation on a re-prepared or other copy of the source."""
    trained = config.get("data_source", None)
    trained = trained.get("source", None) if trained is not None else None
    if not hasattr(trained, "get") or not trained.get("sha256"):
        return
    now = (source_record.read(builder.data_path) or {}).get("source") or {}
    if now.get("sha256") != trained.get("sha256"):
        logging.warning("This run was trained on data prepared from %s; the prepared data used now come from %s. "
                        "Scores may not be comparable with the run's own.", source_record.describe(dict(trained)),
                        source_record.describe(now or None))


def data_source(builder) -> dict[str, Any]:
    """What a prepared dataset was built from, for ``config.json`` (``data_source``): the prepared directory, and
    for builders that read user files the source's path, fingerprint and the options that shaped the data (None
    where the dataset predates these records)."""
    record = source_record.read(builder.data_path)
    out: dict[str, Any] = {"prepared_dir": str(builder.data_path), "builder": builder.name,
                           "builder_config": builder.builder_config.name if builder.builder_config else ""}
    if isinstance(builder, source_record.RecordsSource):
        out.update(source=(record or {}).get("source"), options=(record or {}).get("options"))
    else:
        out["source"] = "generated by the builder"
    return out


def split_indices(config: ConfigDict, metadata: Mapping[str, np.ndarray]
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


def eval_split(config: ConfigDict, split: str, builder=None) -> tuple[Any, str, np.ndarray]:
    """``(builder, tfds_split, indices)`` of a run's ``split`` ('train', 'val' or 'test'), cut as training cut it.

    'val' and 'train' are the trainer's split of ``config.dataset.split`` (K-fold fold, leave-one-country-out
    validation holdout, or patient holdout); 'test' is the left-out country (loco) or the dataset's own test split
    (e.g. Kvasir-SEG's 120 images).

    Raises:
        ValueError: an unknown split, or 'test' for a run that has none.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    builder = builder if builder is not None else prepare_builder(config)
    source_split = config.dataset.split
    metadata = input_pipeline.read_metadata(builder, source_split)
    train_idx, val_idx, test_idx = split_indices(config, metadata)
    if split == "train":
        return builder, source_split, train_idx
    if split == "val":
        return builder, source_split, val_idx
    if test_idx is not None:
        return builder, source_split, test_idx
    if config.dataset.get("test_split", ""):
        n = builder.info.splits[config.dataset.test_split].num_examples
        return builder, config.dataset.test_split, np.arange(n)
    raise ValueError(f"This run ({config.dataset.name}, protocol {config.split.protocol!r}) has no test split: "
                     "K-fold runs are scored on their validation fold (--split=val); leave-one-country-out runs "
                     "and datasets with a test split (Kvasir-SEG) have one.")


def load_data(config: ConfigDict, mesh: Mesh) -> Data:
    """Prepares the dataset, cuts the split and puts every part into device memory."""
    builder = prepare_builder(config)
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
    return Data(train, val, test, description, data_source(builder))


# ------------------------------------------------------------------------------------------ model and loss


def build_model(config: ConfigDict):
    """The flax model of ``config.model`` with one output channel per target and BatchNorm synced over 'data'."""
    # `pretrained` is where the encoder's weights come from (`init_train_state`), not a field of the model.
    kwargs = {k: v for k, v in config.model.items() if k not in ("name", "pretrained")}
    return models.get_model(config.model.name, num_classes=len(config.targets), dtype=config.compute_dtype,
                            bn_axis_name=parallel.DATA_AXIS, **kwargs)


def build_loss(config: ConfigDict) -> LossFn:
    """``loss_fn(outputs, labels, weights) -> [B]`` from ``config.loss``; a model output with several heads (deep
    supervision) gets `losses.deep_supervision_loss` with ``loss.deep_supervision_weights`` (empty: the average)."""
    kwargs = {k: v for k, v in config.loss.items() if k not in ("name", "deep_supervision_weights")}
    base = losses.get_loss(config.loss.name, **kwargs)
    output_weights = tuple(config.loss.get("deep_supervision_weights", ())) or None

    def loss_fn(outputs: models.SegmentationOutput, labels: jax.Array, weights: jax.Array) -> jax.Array:
        if len(outputs.heads) > 1:
            return losses.deep_supervision_loss(base, outputs.heads, labels, output_weights, pixel_weights=weights)
        return base(outputs.logits, labels, weights=weights)

    return loss_fn


def build_optimizer(config: ConfigDict, *, total_steps: int, warmup_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` of ``config.optimizer`` for a run of ``total_steps`` (`optim.make_optimizer`)."""
    return optim.make_optimizer(config.optimizer, total_steps=total_steps, warmup_steps=warmup_steps)


# ------------------------------------------------------------------------------------------------- states


def _sample_images(config: ConfigDict) -> np.ndarray:
    return np.zeros((1, *config.image_size, 3), np.float32)


def init_train_state(config: ConfigDict, model, tx: optax.GradientTransformation, mesh: Mesh) -> steps.TrainState:
    """A fresh `steps.TrainState` (seeded by ``config.seed``), replicated over ``mesh``; with
    ``config.model.pretrained`` set, its encoder holds those weights (`anemia_jax.training.pretrained`)."""
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), _sample_images(config), mesh)
    if not config.model.get("pretrained", ""):
        return state
    from anemia_jax.training import pretrained  # noqa: PLC0415 -- only runs that start from pretrained weights need it

    variables = pretrained.apply_to_variables(config.model, parallel.fetch(steps.model_variables(state)),
                                              model=model)
    params = parallel.replicate(variables["params"], mesh)
    logging.info("Encoder initialised from %s.", config.model.pretrained)
    return state.replace(params=params, batch_stats=parallel.replicate(variables.get("batch_stats", {}), mesh),
                         opt_state=jax.jit(tx.init)(params))


def _abstract(tree, mesh: Mesh):
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _init_variables(model, image_size) -> dict[str, Any]:
    key = jax.random.key(0)
    return model.init({"params": key, "dropout": key}, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)


def abstract_train_state(model, tx: optax.GradientTransformation, image_size, mesh: Mesh):
    """The `steps.TrainState` of ``model``/``tx`` as `jax.ShapeDtypeStruct`s replicated over ``mesh`` (no compute).

    What a checkpoint restores into, on any mesh: pass it to `checkpointing.CheckpointManager.restore`. Mirrors
    `steps.create_train_state` (same fields, shapes and dtypes; a test checks they agree).
    """

    def init():
        variables = _init_variables(model, image_size)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                                rng=jax.random.key_data(jax.random.key(0)))

    return _abstract(jax.eval_shape(init), mesh)


def abstract_variables(model, image_size, mesh: Mesh) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``model`` as replicated `jax.ShapeDtypeStruct`s: what inference restores
    from a checkpoint (`checkpointing.CheckpointManager.restore_variables`), with no optimizer involved."""
    variables = jax.eval_shape(lambda: _init_variables(model, image_size))
    return _abstract({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, mesh)
