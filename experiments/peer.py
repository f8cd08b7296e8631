"""The benchmark's PyTorch peer (../shared/tools/peer_bench.py): which of its models is the twin of a config's model,
and the command line that runs it with the same batch, size, steps and dtype (`experiments.benchmark` runs it).

peer_bench.py has the plain U-Net and UNet++ (``torch``: two 3x3 conv+BN+ReLU per block, transposed-conv upsampling,
no deep supervision) and segmentation_models_pytorch's ``Unet``/``UnetPlusPlus('resnet34')`` (``smp``), each with one
output channel, BCE + soft Dice and ``torch.optim.Adam(params, 1e-3)``, in bfloat16 autocast or float32.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from anemia_jax import cli

RUNS = ("eager", "compile")  # torch eager, torch.compile
LEARNING_RATE = 1e-3  # the peer's Adam


def framework(config: ml_collections.ConfigDict) -> str:
    """``'torch'`` or ``'smp'``: peer_bench.py's twin of the config's model (as `experiments.benchmark` measures it).

    Raises:
        cli.CommandLineError: it has none; the message says why and what to benchmark instead.
    """
    from experiments import model_table  # noqa: PLC0415

    m = config.model
    encoder = m.get("encoder", None) or None
    problems = []
    if m.name not in ("unet", "unetpp"):
        problems.append(f"model {m.name!r}")
    if encoder not in (None, "resnet34"):
        problems.append(f"encoder {encoder!r}")
    if m.get("deep_supervision", False):
        problems.append("deep supervision")
    if len(config.targets) != 1:
        problems.append(f"{len(config.targets)} targets")
    if config.image_size[0] != config.image_size[1]:
        problems.append(f"a non-square image size {tuple(config.image_size)}")
    if config.compute_dtype not in ("bfloat16", "float32"):
        problems.append(f"compute dtype {config.compute_dtype}")
    if problems:
        raise cli.CommandLineError(
            f"No PyTorch peer for {model_table.model_label(config)} ({', '.join(problems)}): peer_bench.py has the "
            "plain U-Net and UNet++ and smp's Unet/UnetPlusPlus('resnet34'), one head of one channel, square images, "
            "bfloat16 or float32. Drop --peer, or benchmark configs/unet.py, unetpp.py, unet_resnet34.py or "
            "unetpp_resnet34.py.")
    return "smp" if encoder == "resnet34" else "torch"


def check(path: str, runs: list[str], config: ml_collections.ConfigDict) -> None:
    """Raises `cli.CommandLineError` unless ``path`` is a file, ``runs`` are of `RUNS` and the model has a twin."""
    framework(config)
    if not os.path.isfile(path):
        raise cli.CommandLineError(f"--peer={path}: no such file; pass the path of peer_bench.py "
                                   "(../shared/tools/peer_bench.py beside the checkout).")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise cli.CommandLineError(f"--peer_runs: unknown {unknown}; choose from {', '.join(RUNS)}.")


def command(path: str, config: ml_collections.ConfigDict, run: str, *, steps: int, windows: int,
            warmup: int, python: str = "") -> list[str]:
    """The argv of peer_bench.py at ``path`` for ``run`` ('eager' or 'compile') of the config's model, run by
    ``python`` (default this one: PyTorch installed beside anemia_jax); its last stdout line is its JSON row."""
    argv = [python or sys.executable, path, framework(config), "--arch", config.model.name, "--batch", str(config.batch_size),
            "--size", str(config.image_size[0]), "--steps", str(steps), "--windows", str(windows),
            "--warmup", str(warmup)]
    argv += ["--compile"] if run == "compile" else []
    return argv + ([] if config.compute_dtype == "bfloat16" else ["--fp32"])
