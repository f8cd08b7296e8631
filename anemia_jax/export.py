"""Exporting trained runs for use outside this package: StableHLO (jax.export) or ONNX, each with a model card.

    python -m anemia_jax.export --workdir=RUN [--workdir=RUN2 ...] --format=stablehlo|onnx --out=FILE
        [--checkpoint=best|latest|<step>] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--prune_level=k]
        [--dtype=float32|bfloat16] [--platforms=cpu,cuda,tpu] [--onnx_python=PYTHON] [--threshold=0.5]
        [--config.<key>=<value> ...]

What is exported is the inference function of `anemia_jax.inference.probabilities.probability_fn`: uint8 RGB ``images
[N, H, W, 3]`` at the runs' training size, N symbolic (any batch), in; float32 sigmoid ``probabilities [N, H, W, C]``
out, one channel per target; the normalisation inside, then the model -- or the mean of the models when several
``--workdir`` are given (e.g. the K folds of a cross-validation) -- optionally a pruned UNet++ (``--prune_level``)
and test-time augmentation (``--tta``). Photos must be resized to H x W first as training photos were
(`anemia_jax.utils.image_io.resize_image`); the card says so. Exported models compute in ``--dtype`` (default float32:
exact and portable; the runs' bfloat16 is a training speed choice, and ONNX Runtime lacks bfloat16 kernels).

* ``--format=stablehlo``: ``jax.export`` with the variables embedded, serialized to FILE (lowered for every platform
  of ``--platforms``). Reload it with ``jax.export.deserialize(open(FILE, 'rb').read()).call(images)`` (`load`);
  its compatibility window is JAX's (README: Export a model).
* ``--format=onnx``: the runs are written as a bundle, ``<FILE stem>.bundle.npz`` (plain arrays and a manifest;
  `anemia_jax.inference.export_onnx`), then converted to ONNX by jax2onnx -- in this process if jax2onnx is installed
  here, otherwise by ``--onnx_python`` (default ``$ANEMIA_JAX_ONNX_PYTHON``), the Python of a separate environment,
  because jax2onnx pins an Orbax older than this package's. Without either, the bundle stays and the command prints the
  conversion command to run.

With a ``temperature.json`` beside the runs (``python -m anemia_jax.calibrate_quality`` fits it; ``--temperature``
names another file or 'none') the exported function returns the calibrated probabilities (each member's logits
divided by its target's temperature before the sigmoid), as ``predict`` and the page compute them.

A model card, ``FILE.card.json`` (`anemia_jax.inference.model_card`; the artifact's full name, e.g.
``model.onnx.card.json``, so that exports of one stem keep one card each), is written beside FILE: input size and
dtype, normalisation, targets and their threshold, the runs, checkpoints and training protocol, validation metrics.

Exit status: 0 written; 1 the ONNX conversion failed or could not run here (the bundle is kept); 2 bad arguments or
runs; 4 no usable checkpoint; 5 cannot write FILE.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import flags

from anemia_jax import cli

__all__ = ["main"]

FORMATS = ("stablehlo", "onnx")
ONNX_PYTHON_ENV = "ANEMIA_JAX_ONNX_PYTHON"
DEFAULT_PLATFORMS = "cpu,cuda,tpu"


def _have_jax2onnx() -> bool:
    try:
        import jax2onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _convert_onnx(bundle: pathlib.Path, out: pathlib.Path, python: str, opset: int) -> int:
    """Converts ``bundle`` here or with ``python``; returns the exit status."""
    if _have_jax2onnx():
        from anemia_jax.inference import export_onnx  # noqa: PLC0415

        export_onnx.convert(bundle, out, opset=opset)
        return cli.EXIT_OK
    command = [python or ".onnx-venv/bin/python", "-m", "anemia_jax.export_onnx", str(bundle), f"--out={out}",
               f"--opset={opset}"]
    if not python:
        print(f"export: wrote the conversion bundle {bundle}, but jax2onnx is not installed in this environment "
              f"and no ONNX environment was given (--onnx_python or ${ONNX_PYTHON_ENV}). Create it (README: Export "
              f"a model) and convert with:\n  {shlex.join(command)}", file=sys.stderr)
        return cli.EXIT_FAILED
    if not pathlib.Path(python).is_file():
        print(f"export: --onnx_python={python} does not exist. Create the ONNX environment (README: Export a "
              f"model); the bundle {bundle} is kept, convert it with:\n  {shlex.join(command)}", file=sys.stderr)
        return cli.EXIT_FAILED
    result = subprocess.run(command, check=False)
    if result.returncode:
        print(f"export: ONNX conversion failed (exit status {result.returncode}); the bundle {bundle} is kept. "
              f"Command: {shlex.join(command)}", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_OK


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.export", __doc__)
    cmd.run_flags(verb="export", temperature=True)
    fv = cmd.flags
    flags.DEFINE_enum("format", None, FORMATS, "stablehlo (jax.export, serialized) or onnx.", flag_values=fv)
    flags.mark_flag_as_required("format", flag_values=fv)
    flags.DEFINE_string("out", None, "The file to write (its model card goes beside it as FILE.card.json).",
                        flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "Computation dtype of the exported model "
                      "(parameters stay float32).", flag_values=fv)
    flags.DEFINE_string("platforms", DEFAULT_PLATFORMS, "StableHLO: comma-separated platforms to lower for.",
                        flag_values=fv)
    flags.DEFINE_string("onnx_python", os.environ.get(ONNX_PYTHON_ENV, ""), "ONNX: the Python of the ONNX "
                        f"environment that converts the bundle (default ${ONNX_PYTHON_ENV}).", flag_values=fv)
    flags.DEFINE_integer("opset", 23, "ONNX opset.", flag_values=fv)
    flags.DEFINE_float("threshold", 0.5, "Mask threshold recorded in the card (mask = probability > threshold).",
                       flag_values=fv)
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``) and returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    cmd = _command()
    try:
        if cmd.parse_runs(argv) is None:
            return cli.EXIT_OK  # --help
        if cmd.format == "onnx" and cmd.dtype != "float32":
            raise cli.CommandLineError("--format=onnx exports float32 only (ONNX Runtime has no bfloat16 "
                                       "convolutions); drop --dtype or use --format=stablehlo.")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    import jax  # noqa: PLC0415 -- after the flags: --help and flag errors stay fast

    from anemia_jax.inference import export as export_lib  # noqa: PLC0415
    from anemia_jax.inference import model_card, probabilities, temperature
    from anemia_jax.runs import restore
    from anemia_jax.utils import parallel

    out = pathlib.Path(cmd.out)
    try:
        transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
        configs = cmd.run_configs()
        for config in configs:
            config.compute_dtype = cmd.dtype
        # One device: the export is a single-device program; the variables are copied into it.
        restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint, configs=configs,
                                     mesh=parallel.make_mesh(jax.local_devices()[:1]))
        scale, scale_source = temperature.for_runs(cmd.workdir, cmd.temperature, restored[0].targets)
        fn, variables = probabilities.probability_of(restored, prune_level=cmd.prune_level, transforms=transforms,
                                                     temperature=scale)
        card = model_card.build(restored, threshold=cmd.threshold, compute_dtype=cmd.dtype,
                                prune_level=cmd.prune_level, transforms=transforms, command=shlex.join(argv),
                                temperature=scale, temperature_source=scale_source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if cmd.format == "stablehlo":
            platforms = tuple(p.strip() for p in cmd.platforms.split(",") if p.strip())
            exported = export_lib.export_stablehlo(fn, variables, restored[0].image_size, platforms=platforms)
            out.write_bytes(exported.serialize())
            card_file = model_card.write(card, out, format="stablehlo", jax=jax.__version__,
                                         platforms=list(exported.platforms),
                                         calling_convention_version=exported.calling_convention_version,
                                         input="images uint8 [N, H, W, 3]", output="probabilities float32",
                                         load="jax.export.deserialize(open(file, 'rb').read()).call(images)")
            print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {card_file}.")
            return cli.EXIT_OK
        bundle = export_lib.onnx_bundle(restored, out.with_name(f"{out.stem}.bundle.npz"), card=card,
                                        prune_level=cmd.prune_level, transforms=transforms, temperature=scale)
        status = _convert_onnx(bundle, out, cmd.onnx_python, cmd.opset)
        if status == cli.EXIT_OK:
            print(f"Wrote {out} and {model_card.card_path(out)} (bundle kept: {bundle}).")
        return status
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)


if __name__ == "__main__":
    sys.exit(main())
