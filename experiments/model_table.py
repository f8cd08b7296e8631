"""Parameters and forward GFLOPs per image of every model config (and encoder variant), as a markdown table.

    python -m experiments.model_table [--size=256] [--configs=unet,unetpp]

Each row's model is built as training builds it, by `anemia_jax.training.experiment.build_model` from a config file of
configs/ (`ROWS`: each file, and the encoder/variant swaps its docstring names), with one output channel (the first
target) and float32; a registered model that no config builds gets a row of its defaults. The ``fields`` column is
what the model's config sets differently from the model class's defaults (`model_label`; e.g. UNet++'s deep
supervision), so rows are told apart by what is built, not by file names.

FLOPs are XLA's count for one 1x3xSxS forward pass in evaluation mode (the final head's logits), read from
``jax.jit(apply).lower(...).cost_analysis()`` on abstract variables: nothing is compiled or run, so the table costs
seconds on a CPU. A multiply-add counts as 2 FLOPs (papers quoting "GFLOPs" as multiply-adds give half).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from anemia_jax import cli
from anemia_jax.runs import config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# (config file stem, config.model fields changed): every config, then the swaps the config files document.
ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("unet", {}),
    ("unet_resnet34", {"encoder": "resnet18"}), ("unet_resnet34", {}), ("unet_resnet34", {"encoder": "resnet50"}),
    ("unetpp", {}),
    ("unetpp_resnet34", {"encoder": "resnet18"}), ("unetpp_resnet34", {}),
    ("unetpp_resnet34", {"encoder": "resnet50"}),
    ("attention_unet", {}),
    ("segformer", {}), ("segformer", {"variant": "b1"}), ("segformer", {"variant": "b2"}),
    ("transunet", {}),
)
_NOT_MODEL_FIELDS = ("name", "pretrained")  # the registry key, and where the encoder's weights come from


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of ``config.model`` whose values differ from the registered model class's defaults (in the
    config's order; ``name`` and ``pretrained`` left out)."""
    from anemia_jax import models  # noqa: PLC0415 -- JAX loads only once the command line looks right

    defaults = {f.name: f.default for f in dataclasses.fields(models.MODELS.get(config.model.name))
                if f.default is not dataclasses.MISSING}
    return {k: v for k, v in config.model.items() if k not in _NOT_MODEL_FIELDS
            and (k not in defaults or _comparable(defaults[k]) != _comparable(v))}


def model_label(config: ml_collections.ConfigDict) -> str:
    """``'<model> <field>=<value> ...'``: the registered model and `model_fields`, e.g. ``'unetpp encoder=resnet34'``
    (the benchmark's ``arch``)."""
    return " ".join([config.model.name, *(f"{k}={v}" for k, v in model_fields(config).items())])


def table_config(stem: str, changes: Mapping[str, Any], size: int) -> ml_collections.ConfigDict:
    """``configs/<stem>.py`` at ``size``, float32, one target, with ``config.model`` fields ``changes``."""
    config = config_lib.load_config_file(f"{CONFIGS / stem}.py:size={size},dtype=float32")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked: `changes` may add fields
    config.targets = tuple(config.targets)[:1]
    for key, value in changes.items():
        config.model[key] = value
    return config


def default_config(name: str, size: int) -> ml_collections.ConfigDict:
    """A config whose model is registered model ``name`` with its defaults (for models that no config file builds)."""
    config = table_config("unet", {}, size)
    config.model = ml_collections.ConfigDict({"name": name})
    return config


def measure(config: ml_collections.ConfigDict) -> tuple[int, float]:
    """``(parameters, forward GFLOPs per image)`` of ``model_factory.build_model(config)`` at ``config.image_size``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from anemia_jax.runs import model_factory


    model = model_factory.build_model(config)
    images = jax.ShapeDtypeStruct((1, *config.image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False).logits).lower(variables, images)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return params, float(cost["flops"]) / 1e9


def table_configs(size: int, stems: Sequence[str] = ()) -> list[ml_collections.ConfigDict]:
    """The configs of the table's rows: `ROWS`, then any other config file of configs/, then a row of defaults per
    registered model that none of those builds; only the files ``stems`` if given (no default rows then)."""
    from anemia_jax import models  # noqa: PLC0415

    files = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "common"))
    unknown = sorted(set(stems) - set(files))
    if unknown:
        raise cli.CommandLineError(f"--configs: no configs/{unknown[0]}.py; the config files are {', '.join(files)}.")
    rows = list(ROWS) + [(stem, {}) for stem in files if stem not in {s for s, _ in ROWS}]
    configs = [table_config(stem, changes, size) for stem, changes in rows if not stems or stem in stems]
    if not stems:
        built = {models.MODELS.canonical(c.model.name) for c in configs}
        configs += [default_config(name, size) for name in models.MODELS.names() if name not in built]
    return configs


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.model_table", __doc__)
    flags.DEFINE_integer("size", 256, "Square input size of the counted forward pass.", lower_bound=1,
                         flag_values=cmd.flags)
    flags.DEFINE_list("configs", [], "Only these config files of configs/ (stems, e.g. unet,unetpp); default: "
                      "every row.", flag_values=cmd.flags)
    return cmd


def main(argv: Sequence[str]) -> int:
    """Prints the table (see the module docstring); ``argv`` has the program name first. Returns the exit status."""
    cmd = _command()
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK  # --help
        configs = table_configs(cmd.size, cmd.configs)
    except Exception as e:  # noqa: BLE001 -- known failures become messages; cmd.fail re-raises the rest
        return cmd.fail(e)
    print(f"| model | fields | parameters | GFLOPs/image at {cmd.size}² (forward) |")
    print("|---|---|---:|---:|")
    for config in configs:
        params, gflops = measure(config)
        fields = ", ".join(f"{k}={v}" for k, v in model_fields(config).items()) or "defaults"
        print(f"| `{config.model.name}` | {fields} | {params:,} | {gflops:.1f} |", flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
