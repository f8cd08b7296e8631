"""Building, loading and validating the trainer's `ml_collections` configs.

The configs in ``configs/`` are big_vision-style Python files: ``get_config(arg)`` takes the string after the colon
of ``--config=configs/unetpp.py:data=phantom,size=256,fold=0,test`` (``key=value`` pairs and bare flags) and returns
a `ml_collections.ConfigDict`. This module holds what those files and the trainer share:

* `parse_arg`: the ``arg`` string -> typed values, against declared defaults (unknown keys fail, naming close ones).
* `dataset_config`: the ``config.dataset`` block of a registered dataset (`anemia_jax.data.datasets.DATASETS`).
* `validate`: every check the trainer needs before it touches data or devices, reported together.
* `resolve_steps`: durations and intervals given in epochs or in steps -> steps.
* `load_config_file` / `make_config_importable` / `unknown_keys` / `default_workdir`: what the command lines
  (`anemia_jax.cli`) need for their flags.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from anemia_jax.runs import loss_config
from anemia_jax.utils import errors
from anemia_jax.utils.registry import close_matches

ConfigDict = ml_collections.ConfigDict

COMPUTE_DTYPES = ("float32", "bfloat16")


# A config that cannot run (exit status 2); defined with the other failure kinds so that the data layer can raise it.
ConfigError = errors.ConfigError


# ------------------------------------------------------------------------------------------------ building


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a big_vision-style config argument against typed defaults.

    ``parse_arg('data=phantom,size=128,test', data='eyes', size=256, test=False)`` gives
    ``{'data': 'phantom', 'size': 128, 'test': True}``. A bare word sets a bool default to True; values are
    converted to the type of their default (bools accept true/false/1/0/yes/no).

    Args:
        arg: the text after the colon of ``--config=path:arg`` (None or '' for all defaults).
        **defaults: every accepted key with its default value (bool, int, float or str).

    Returns:
        A `ConfigDict` with every key of ``defaults``.

    Raises:
        ConfigError: an unknown key (with close matches and the valid keys) or a value of the wrong type.
    """
    values = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"Unknown config argument {key!r} in {arg!r}.{close_matches(key, list(defaults))} "
                              f"Valid arguments: {', '.join(sorted(defaults))}.")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"Config argument {key!r} needs a value ({key}=...); only bool flags may be bare.")
            values[key] = True
            continue
        raw = raw.strip()
        try:
            if isinstance(default, bool):
                lowered = raw.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                values[key] = lowered in ("true", "1", "yes")
            elif isinstance(default, int):
                values[key] = int(raw)
            elif isinstance(default, float):
                values[key] = float(raw)
            else:
                values[key] = raw
        except ValueError:
            raise ConfigError(f"Config argument {key}={raw!r} is not a valid {type(default).__name__}.") from None
    return ConfigDict(values)


def dataset_config(name: str, *, image_size: int, data_dir: str = "", manual_dir: str = "") -> ConfigDict:
    """The ``config.dataset`` block for dataset ``name`` (a name or alias of `anemia_jax.data.datasets.DATASETS`).

    Fields: ``name``; ``builder`` and ``builder_config`` (the TFDS builder and its named config, '' for the
    default; chosen to store images at least at ``image_size``); ``builder_kwargs`` (extra constructor
    arguments, '' meaning "not passed": ``archive_path`` for Eyes-defy-anemia, ``source_dir`` for Kvasir-SEG);
    ``data_dir`` (where TFDS writes prepared data, '' for ``~/tensorflow_datasets``); ``manual_dir`` (where a
    manually downloaded archive lies, '' for TFDS's default ``<data_dir>/downloads/manual``); ``split`` (the TFDS
    split that training and validation are cut from); ``test_split`` (evaluated once at the end, never used for
    selection; '' for none).
    """
    spec = dataset_spec(name)
    return ConfigDict({
        "name": spec.name,
        "builder": spec.builder,
        "builder_config": spec.builder_config_for(image_size),
        "builder_kwargs": ConfigDict(dict(spec.builder_kwargs)),
        "data_dir": data_dir,
        "manual_dir": manual_dir,
        "split": "train",
        "test_split": spec.test_split,
    })


def dataset_spec(name: str):
    """The registered `anemia_jax.data.datasets.DatasetSpec` of ``name`` (or an alias).

    Raises:
        ConfigError: an unknown dataset, naming the close and the valid names.
    """
    from anemia_jax.data import datasets  # noqa: PLC0415 -- builders register on import; keep `import config_lib` light

    try:
        return datasets.DATASETS.get(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def default_cache_dir() -> str:
    """The persistent compilation cache directory under the user's cache dir (``$XDG_CACHE_HOME`` or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "anemia_jax", "jax_cache")


def make_config_importable(path: str | os.PathLike) -> None:
    """Lets the config file ``path`` import its own package (``from configs import common``) from any directory.

    Config files live in a package (``configs/`` holds an ``__init__.py``); Python finds that package only when the
    folder above it is on ``sys.path``, which is true when commands run from the repository root. For a config
    given by another path, that folder is appended (last, so it never shadows installed packages).
    """
    folder = pathlib.Path(path).expanduser().resolve().parent
    if (folder / "__init__.py").is_file() and str(folder.parent) not in sys.path:
        sys.path.append(str(folder.parent))


def load_config_file(spec: str) -> ConfigDict:
    """Loads ``path[:arg]`` the way ``--config=path[:arg]`` does: ``get_config(arg)`` of the file."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"Config file {path!r} does not exist (looked at {file.absolute()}).")
    make_config_importable(file)
    module_spec = importlib.util.spec_from_file_location(f"_anemia_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config(arg=None); it is not a config file.")
    return module.get_config(arg) if arg else module.get_config()


# --------------------------------------------------------------------------------------------- flag helpers


def flat_keys(config: ConfigDict | Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a nested config, e.g. ``['batch_size', 'optimizer.learning_rate', ...]``."""
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, (ConfigDict, dict)):
            keys.extend(flat_keys(value, full + "."))
    return keys


def unknown_keys(config: ConfigDict, dotted: Sequence[str]) -> list[str]:
    """Explains each dotted key (of ``--config.<key>=...`` overrides) that ``config`` does not have.

    Returns:
        One message per unknown key, naming the closest existing keys (difflib) or, failing that, the keys that
        exist at that level.
    """
    known = flat_keys(config)
    messages = []
    for key in dotted:
        if key in known:
            continue
        parent, _, leaf = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
        # Same level first (a typo in the last part), then anywhere (a wrong or misspelt parent).
        near = [siblings[k] for k in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.6)]
        near += [k for k in difflib.get_close_matches(key, known, n=3, cutoff=0.6) if k != parent]
        where = f"under {parent!r}" if parent else "at the top level"
        if near:
            hint = f"close keys: {', '.join(dict.fromkeys(near))}"
        else:
            hint = f"keys {where}: {', '.join(s.rpartition('.')[2] for s in siblings) or '(none)'}"
        messages.append(f"config has no key {key!r}; {hint}.")
    return messages


def default_workdir(name: str, arg: str = "", root: str = "runs") -> str:
    """``runs/<name>`` or, for a parametrised config, ``runs/<name>_<arg>`` with the arg made path-friendly.

    ``default_workdir('unetpp', 'data=phantom,size=128,test')`` is ``'runs/unetpp_data-phantom_size-128_test'``.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", arg.replace("=", "-").replace(",", "_")).strip("-_")
    return os.path.join(root, f"{name}_{slug}" if slug else name)


# ----------------------------------------------------------------------------------------------- durations


def resolve_steps(config: ConfigDict, prefix: str, steps_per_epoch: int, *, required: bool = True) -> int:
    """Steps of a duration or interval given as ``<prefix>_steps`` or ``<prefix>_epochs`` (steps win if both > 0).

    Args:
        config: the config holding the fields.
        prefix: e.g. 'eval_every' reads ``eval_every_steps`` and ``eval_every_epochs``; 'num_train' reads
            ``num_train_steps`` and ``num_epochs``.
        steps_per_epoch: training steps per epoch (ceil(train examples / global batch)).
        required: raise if neither is set (> 0); otherwise return 0.
    """
    steps_key = f"{prefix}_steps"
    epochs_key = "num_epochs" if prefix == "num_train" else f"{prefix}_epochs"
    steps = config.get(steps_key, 0) or 0
    epochs = config.get(epochs_key, 0) or 0
    if steps < 0 or epochs < 0:
        raise ConfigError(f"{steps_key}={steps} and {epochs_key}={epochs} must be >= 0.")
    if steps > 0:
        return int(steps)
    if epochs > 0:
        return max(1, round(epochs * steps_per_epoch))
    if required:
        raise ConfigError(f"Set {steps_key} or {epochs_key} to a positive value.")
    return 0


# ---------------------------------------------------------------------------------------------- validation


def _model_depth(config: ConfigDict) -> int:
    return int(config.model.get("depth", 4))


def validate(config: ConfigDict, *, num_devices: int | None = None) -> None:
    """Checks a trainer config; raises `ConfigError` listing every problem with what to do about it.

    Args:
        config: a config from ``configs/``.
        num_devices: the device count the run will use (the global batch must divide evenly); None skips that check.
    """
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    ds = config.dataset
    try:
        spec = dataset_spec(ds.name)
        check(spec.name == ds.name, f"dataset.name={ds.name!r} is an alias; configs store the canonical name "
                                    f"{spec.name!r}.")
    except ConfigError as e:
        spec = None
        errors.append(f"dataset.name: {e}")
    targets = tuple(config.targets)
    check(len(targets) > 0, "targets is empty; name at least one mask to segment.")
    check(len(set(targets)) == len(targets), f"targets {targets} repeats a mask.")
    if spec is not None:
        for t in targets:
            check(t in spec.masks, f"target {t!r} is not a mask of dataset {ds.name!r}.{close_matches(t, spec.masks)} "
                                   f"Its masks: {', '.join(spec.masks)}.")
        check(ds.builder == spec.builder, f"dataset.builder={ds.builder!r} does not match dataset {ds.name!r} "
                                          f"(expects {spec.builder!r}).")
        protocol = config.split.protocol
        check(protocol in spec.protocols, f"split.protocol={protocol!r} does not apply to {ds.name!r}; "
                                          f"use one of {', '.join(spec.protocols)}.")
    sp = config.split
    if sp.protocol == "kfold":
        check(sp.num_folds >= 2, f"split.num_folds={sp.num_folds} must be >= 2.")
        check(0 <= sp.fold < sp.num_folds, f"split.fold={sp.fold} must lie in [0, {sp.num_folds}).")
    if sp.protocol == "loco":
        check(bool(sp.test_country), "split.protocol='loco' needs split.test_country (e.g. 'Italy').")
    if sp.protocol in ("loco", "holdout"):
        check(0.0 < sp.val_fraction < 1.0, f"split.val_fraction={sp.val_fraction} must lie in (0, 1).")

    # The registries, read where they are declared (imported here: loading a config file needs no JAX).
    from anemia_jax import models  # noqa: PLC0415

    name = config.model.name
    check(name in models.MODELS, f"model.name={name!r} is unknown.{close_matches(name, models.MODELS.all_names())} "
                                 f"Valid: {', '.join(models.MODELS.names())}.")
    errors.extend(loss_config.problems(config.loss))
    model = None
    if config.model.name in models.MODELS:
        fields = {k: v for k, v in config.model.items() if k not in ("name", "pretrained")}
        try:  # Constructing a flax module runs its field checks only: no parameters, no compute.
            model = models.get_model(config.model.name, num_classes=max(1, len(tuple(config.targets))), **fields)
        except (TypeError, ValueError) as e:
            errors.append(f"model: {e}")
    size = tuple(config.image_size)
    check(len(size) == 2 and all(int(s) > 0 for s in size), f"image_size={size} must be (height, width) > 0.")
    if model is not None and len(size) == 2:
        multiple = int(getattr(model, "input_multiple", 1))
        check(all(int(s) % multiple == 0 for s in size),
              f"image_size={size} must be a multiple of {multiple} for model {config.model.name!r} (e.g. "
              f"{max(multiple, round(int(size[0]) / multiple) * multiple)}).")
    if config.model.get("deep_supervision", False):
        depth = _model_depth(config)
        weights = tuple(config.loss.get("deep_supervision_weights", ()))
        check(len(weights) in (0, depth), f"loss.deep_supervision_weights has {len(weights)} entries; UNet++ with "
                                          f"depth {depth} has {depth} outputs (or leave it empty to average).")
    check(config.compute_dtype in COMPUTE_DTYPES,
          f"compute_dtype={config.compute_dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}.")

    opt = config.optimizer
    check(opt.learning_rate > 0, f"optimizer.learning_rate={opt.learning_rate} must be > 0.")
    check(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay} must be >= 0.")
    check(opt.grad_clip_norm >= 0, f"optimizer.grad_clip_norm={opt.grad_clip_norm} must be >= 0 (0 disables).")
    check(0.0 <= opt.end_lr_ratio <= 1.0, f"optimizer.end_lr_ratio={opt.end_lr_ratio} must lie in [0, 1].")

    check(config.batch_size > 0, f"batch_size={config.batch_size} must be > 0.")
    check(config.eval_batch_size >= 0, f"eval_batch_size={config.eval_batch_size} must be >= 0 (0: batch_size).")
    if num_devices:
        for key in ("batch_size", "eval_batch_size"):
            value = config[key]
            if value > 0 and value % num_devices:
                suggestion = max(num_devices, round(value / num_devices) * num_devices)
                errors.append(f"{key}={value} is not divisible by the {num_devices} devices; the global batch is "
                              f"split evenly over them: use a multiple of {num_devices} (e.g. {suggestion}).")
    # A negative duration would silently fall back to its epochs/steps twin (`resolve_steps`): rejected here.
    for key, meaning in (("num_train_steps", "0: use num_epochs"), ("num_epochs", "0: use num_train_steps"),
                         ("warmup_steps", "0: use warmup_epochs"), ("warmup_epochs", "0: no warm-up"),
                         ("eval_every_steps", "0: use eval_every_epochs"),
                         ("eval_every_epochs", "0: use eval_every_steps"),
                         ("checkpoint_every_steps", "0: use checkpoint_every_epochs"),
                         ("checkpoint_every_epochs", "0: use checkpoint_every_steps"),
                         ("profile_steps", "0: no profile")):
        value = config.get(key, 0)
        check(value >= 0, f"{key}={value} must be >= 0 ({meaning}); a negative duration has no meaning.")
    freeze = config.optimizer.get("freeze_encoder_steps", 0)
    check(freeze >= 0, f"optimizer.freeze_encoder_steps={freeze} must be >= 0 (0: never frozen).")
    check(config.num_train_steps > 0 or config.num_epochs > 0,
          "Set num_train_steps or num_epochs to a positive value (the run length).")
    for prefix in ("eval_every", "checkpoint_every"):
        check(config[f"{prefix}_steps"] > 0 or config[f"{prefix}_epochs"] > 0,
              f"Set {prefix}_steps or {prefix}_epochs to a positive value.")
    check(config.log_every_steps > 0, f"log_every_steps={config.log_every_steps} must be > 0.")
    check(config.keep_checkpoints >= 1, f"keep_checkpoints={config.keep_checkpoints} must be >= 1.")
    check(config.max_panels >= 0, f"max_panels={config.max_panels} must be >= 0.")
    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
