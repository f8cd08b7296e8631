"""From a config to its data: the prepared TFDS builder, the patient-level split, device-resident examples.

One place cuts every split, so training, evaluation of a finished run, quality calibration, screening and the
experiment scripts all see exactly the examples the trainer saw:

* `prepare_builder`: the prepared TFDS builder of ``config.dataset`` (process 0 prepares first), checked to have
  been prepared from the source the config names (`datasets.source_record`); `data_source` says which that was.
* `split_indices` / `eval_split`: the patient-level cut of the split protocol (K-fold, leave one country out,
  holdout), for training and for scoring a finished run.
* `load_data`: train / validation (/ test) examples resident on the devices (`input_pipeline.DeviceDataset`), after
  checking that the training and validation examples carry labels for every target (`check_labels`): a source
  without usable masks is a data error before anything trains, never a run with loss 0 and Dice NaN.

A preparation that fails leaves nothing behind: the folders TFDS created for it in ``data_dir`` are removed again
when they hold nothing (`_remove_created`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from anemia_jax.data import datasets, input_pipeline, splits
from anemia_jax.data.datasets import source_record
from anemia_jax.utils import errors, paths

ConfigDict = ml_collections.ConfigDict

__all__ = ["Data", "DataNotFoundError", "check_labels", "data_source", "eval_split", "load_data", "prepare_builder",
           "split_indices"]

# Builder keywords that name a file or folder (the only ones a "point the trainer at the files" message suggests).
_PATH_SUFFIXES = ("_dir", "_path", "_file")


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


def prepare_builder(config: ConfigDict):
    """The prepared TFDS builder of ``config.dataset``; prepares it if needed (process 0 first, then the others).

    A dataset already prepared in ``data_dir`` is reused only if it was built from the source (and with the options)
    that the config names now (`datasets.source_record.check`).

    Raises:
        DataNotFoundError: the source files are missing; the message names the flags that point at them.
        errors.DataError: the source is unusable, or the prepared data came from another source
            (`source_record.SourceMismatchError`, naming both).
        errors.ConfigError: a ``dataset.builder_kwargs`` value the builder rejects.
    """
    ds = config.dataset
    data_dir = os.path.expanduser(ds.data_dir) if ds.data_dir else None
    kwargs = {k: v for k, v in ds.builder_kwargs.items() if v != ""}
    try:
        builder = datasets.get_builder(ds.builder, data_dir=data_dir, config=ds.builder_config or None, **kwargs)
    except (TypeError, ValueError) as e:
        raise errors.ConfigError(f"config.dataset.builder_kwargs ({', '.join(kwargs) or 'none'}) or "
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
            flags = [f"--config.dataset.builder_kwargs.{k}=PATH" for k in ds.builder_kwargs
                     if k.endswith(_PATH_SUFFIXES)] + ["--config.dataset.manual_dir=DIR"]
            raise DataNotFoundError(f"Preparing dataset {ds.name!r} failed: {e}\nFrom the command line, point "
                                    f"the trainer at the files with {' or '.join(flags)}.") from e

    def prepare_or_clean_up():
        root, prepared = pathlib.Path(os.fspath(builder.data_dir_root)), pathlib.Path(os.fspath(builder.data_path))
        created = [p for p in (root, root / "downloads", root / "downloads" / "extracted", root / builder.name,
                               prepared.parent, prepared) if not p.exists()]
        if paths.is_url(os.fspath(builder.data_dir_root)):
            created = []  # object stores have no empty folders to leave behind
        try:
            prepare()
        except BaseException:
            _remove_created(created, root / builder.name / ".config" / "metadata.json")
            raise

    if jax.process_count() == 1:
        prepare_or_clean_up()
    else:
        # On a shared data_dir the others then find it prepared; on per-host disks each prepares its own copy.
        if jax.process_index() == 0:
            prepare_or_clean_up()
        multihost_utils.sync_global_devices("anemia_jax:dataset_prepared")
        if jax.process_index() != 0:
            prepare_or_clean_up()
    _compare_with_trained(config, builder)
    return builder


def _remove_created(created: list[pathlib.Path], bookkeeping: pathlib.Path) -> None:
    """Removes the folders of ``created`` (which did not exist before a failed preparation) where they hold nothing
    but empty folders and TFDS's ``bookkeeping`` file: a run that failed on its data leaves ``data_dir`` as it was."""
    for top in reversed(created):  # the data_dir root last
        if not top.is_dir():
            continue
        if bookkeeping.is_relative_to(top) and bookkeeping.is_file():
            bookkeeping.unlink()
        for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):  # deepest first
            try:
                os.rmdir(folder)  # only succeeds when empty: nothing anyone wrote is ever removed
            except OSError:
                pass


def _compare_with_trained(config: ConfigDict, builder) -> None:
    """Warns when a finished run's recorded data (``config.data_source``, from its config.json) differ from the
    prepared data now in use, e.g. an evaluation on a re-prepared or other copy of the source."""
    trained = config.get("data_source", None)
    trained = trained.get("source", None) if trained is not None else None
    if not hasattr(trained, "get") or not trained.get("sha256"):
        return
    now = (source_record.read(builder.data_path) or {}).get("source") or {}
    if not source_record.same_data(dict(trained), now):
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


def check_labels(config: ConfigDict, metadata: Mapping[str, np.ndarray], parts: Mapping[str, np.ndarray],
                 where: str = "") -> None:
    """Raises unless every target has a mask in at least one example of each part (e.g. ``{'train': train_idx,
    'val': val_idx}``): training without labels ends with loss 0, zero gradients, Dice NaN and a "best" checkpoint.

    Args:
        config: the run's config (``targets``, ``dataset``).
        metadata: `input_pipeline.read_metadata` of the split (``has_<target>`` [N] bool).
        parts: part name -> int indices into the split.
        where: the prepared dataset's directory, for the message.

    Raises:
        errors.DataError: a target without a single mask in one of the parts (exit status 3).
    """
    problems = []
    for part, indices in parts.items():
        for target in config.targets:
            labelled = metadata.get(f"has_{target}")
            if labelled is None or len(indices) == 0:
                continue
            if not np.asarray(labelled)[np.asarray(indices)].any():
                problems.append(f"none of the {len(indices)} {part} examples has a usable {target!r} mask")
    if problems:
        kwargs = "".join(f" --config.dataset.builder_kwargs.{k}" for k in config.dataset.builder_kwargs
                         if not k.endswith(_PATH_SUFFIXES))
        raise errors.DataError(
            f"No usable labels in {config.dataset.name}: {'; '.join(problems)}. Training would learn nothing (loss 0, "
            f"Dice undefined). Check that the source holds its masks (an image/mask folder needs masks/ beside "
            f"images/, with the images' names), and read the preparation's warnings or its build summary"
            f"{f' in {where}' if where else ''} for why masks were unusable"
            + (f" (the options{kwargs} change how masks are read)" if kwargs else "")
            + "; then delete the prepared folder and run again, or train on the targets that have masks "
            "(--config.targets=...).")


def load_data(config: ConfigDict, mesh: Mesh) -> Data:
    """Prepares the dataset, checks its labels (`check_labels`), cuts the split and puts every part into device
    memory."""
    builder = prepare_builder(config)
    ds = config.dataset
    metadata = input_pipeline.read_metadata(builder, ds.split)
    train_idx, val_idx, test_idx = split_indices(config, metadata)
    check_labels(config, metadata, {"training": train_idx, "validation": val_idx}, str(builder.data_path))
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
