"""A config's ``loss`` block: the chosen loss and exactly its own hyper-parameters.

``config.loss`` holds ``name`` (a loss of `anemia_jax.losses.LOSSES`), that loss's hyper-parameters with their
values, and ``deep_supervision_weights`` (how the heads of a deep-supervised model are weighted; any loss). The
hyper-parameters and their defaults are declared once, by the loss itself: the keyword-only arguments of its
function (`losses.loss_hyperparameters`). So a researcher switches and tunes the loss from the command line::

    python -m anemia_jax.main --config=configs/unetpp.py --config.loss.name=focal_tversky --config.loss.alpha=0.7

`apply_overrides` does what those flags ask: a new ``name`` replaces the block with that loss's own defaults (the
old loss's hyper-parameters go, the deep-supervision weights stay), then each ``--config.loss.<hyper>`` sets one of
the chosen loss's hyper-parameters, typed like its default. A hyper-parameter the chosen loss does not take is a
`errors.ConfigError` (exit status 2) listing the ones it takes, raised while the command line is read, before any
data. `problems` is the same check for config validation (a config file or a recorded config).

A loss of one's own needs no change to the package: register it in one's own module and import that module from
the config file (config files are Python), e.g. ``configs/my_loss.py``::

    from anemia_jax import losses
    from configs import unet

    @losses.register_loss("my_loss")
    def my_loss(logits, labels, *, weights=None, margin=0.1):   # -> [B]
        ...

    def get_config(arg=None):
        config = unet.get_config(arg)
        config.loss = loss_config.loss_config("my_loss")        # from anemia_jax.runs import loss_config
        return config

and ``--config=configs/my_loss.py --config.loss.margin=0.2`` trains with it.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import ml_collections

from anemia_jax.utils import errors
from anemia_jax.utils.registry import close_matches

__all__ = ["WRAPPER_KEYS", "apply_overrides", "hyperparameters", "loss_config", "problems"]

# Keys of the loss block that are not hyper-parameters of the loss function: how deep-supervision heads are weighted.
WRAPPER_KEYS = ("deep_supervision_weights",)


def hyperparameters(name: str) -> dict[str, Any]:
    """``{hyper-parameter: default}`` of the registered loss ``name`` (`losses.loss_hyperparameters`).

    Raises:
        errors.ConfigError: an unknown loss (naming the close and the valid ones).
    """
    from anemia_jax import losses  # noqa: PLC0415 -- JAX loads only when a loss is named

    if name not in losses.LOSSES:
        raise errors.ConfigError(f"loss.name={name!r} is unknown.{close_matches(name, losses.LOSSES.all_names())} "
                                 f"Valid: {', '.join(losses.LOSSES.names())}.")
    return losses.loss_hyperparameters(name)


def loss_config(name: str, **values: Any) -> ml_collections.ConfigDict:
    """The loss block of loss ``name``: every hyper-parameter at its default, ``values`` (hyper-parameters or
    `WRAPPER_KEYS`) replacing them.

    Raises:
        errors.ConfigError: an unknown loss, or a value for a hyper-parameter the loss does not take.
    """
    from anemia_jax import losses  # noqa: PLC0415

    defaults = hyperparameters(name)
    _check_keys(name, values, defaults)
    return ml_collections.ConfigDict({"name": losses.LOSSES.canonical(name), **defaults, **values})


def _check_keys(name: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    unknown = [k for k in values if k not in defaults and k not in WRAPPER_KEYS and k != "name"]
    if unknown:
        raise errors.ConfigError("; ".join(_unknown_message(name, k, defaults) for k in unknown))


def _unknown_message(name: str, key: str, defaults: Mapping[str, Any]) -> str:
    takes = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items()) or "no hyper-parameters"
    return (f"loss {name!r} has no hyper-parameter {key!r}.{close_matches(key, list(defaults))} It takes: {takes}; "
            f"set them with --config.loss.<name>=<value>, or choose another loss with --config.loss.name=...")


def _typed(key: str, raw: Any, default: Any) -> Any:
    """``raw`` (a command-line string, or already a value) as the type of ``default``."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if text.lower() == "none":
            return None
        return ast.literal_eval(text)  # a default of None: a number (e.g. pos_weight=2.0) or a tuple
    except (ValueError, SyntaxError):
        kind = type(default).__name__ if default is not None else "Python literal"
        raise errors.ConfigError(f"--config.loss.{key}={raw!r} is not a valid {kind}.") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Applies ``{key: value}`` overrides of ``config.loss`` (``name`` and hyper-parameters; command-line strings
    or typed values) in place, as the module docstring describes. ``config`` may be locked: it is relocked.

    Raises:
        errors.ConfigError: an unknown loss, a hyper-parameter the chosen loss does not take, a value of the wrong
            type.
    """
    overrides = dict(overrides)
    block = config.loss.to_dict()
    name = str(overrides.pop("name", block["name"]))
    if name.lower() != str(block["name"]).lower():
        kept = {k: block[k] for k in WRAPPER_KEYS if k in block}
        block = loss_config(name).to_dict() | kept
    defaults = hyperparameters(name)
    _check_keys(name, overrides, defaults)
    for key, raw in overrides.items():
        block[key] = _typed(key, raw, defaults.get(key))
    locked = config.is_locked
    with config.unlocked():
        config.loss = ml_collections.ConfigDict(block)
    if locked:
        config.lock()


def problems(loss: Mapping[str, Any]) -> list[str]:
    """What is wrong with a loss block (unknown loss, hyper-parameters the loss does not take); empty if nothing."""
    name = loss.get("name", "")
    try:
        defaults = hyperparameters(name)
    except errors.ConfigError as e:
        return [str(e)]
    return [_unknown_message(name, k, defaults) for k in loss if k != "name" and k not in defaults
            and k not in WRAPPER_KEYS]
