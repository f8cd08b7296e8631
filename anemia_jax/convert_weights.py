"""Converts a downloaded encoder checkpoint once into the model's own layout: ``DIR/encoder.npz`` + ``DIR/meta.json``.

    python -m anemia_jax.convert_weights --config=configs/unetpp_resnet34.py \
        --in=~/weights/resnet34.tv_in1k.safetensors --out=~/weights/unetpp_resnet34
    python -m anemia_jax.convert_weights --config=configs/segformer.py --config.model.variant=b2 \
        --in=mit-b2.safetensors --out=DIR
    python -m anemia_jax.convert_weights --config=configs/transunet.py:size=256 --in=R50+ViT-B_16.npz --out=DIR

The model and the image size (which ViT position embeddings are resized to) come from the training config, given
as to ``python -m anemia_jax.main`` (`anemia_jax.cli`). ``encoder.npz`` holds the encoder's variables under their
Flax paths (``params/encoder/layer1_0/conv1/kernel``, ``batch_stats/encoder/...``), converted (HWIO kernels,
transposed linear layers, position embeddings resized) and checked against the model (every tensor used or ignored
by name, every encoder variable present, every shape equal). It is a plain ``.npz`` (read with
``allow_pickle=False``), so ``--config.model.pretrained`` accepts it or DIR without PyTorch-layout conversion; the
original file works there too (converted on each load). ``meta.json`` records the source file, its SHA-256 (of the
file read, hashed before anything is written), the model and the image size. Both are written atomically (a kill or
a full disk never leaves a truncated file), and never over the input: ``--out`` may not be the folder whose
``encoder.npz`` is being converted.

Failures end with a one-paragraph message (the traceback with ``--verbose``). Exit status: 0 written; 2 bad
arguments, or a weight file that is missing, unreadable (pickled, damaged, a safetensors header that does not
describe its data) or does not fit the model (the message names the tensors), or an ``--out`` that would replace the
input; 5 ``--out`` cannot be written (a file in the way, read-only, full disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

import numpy as np
from absl import flags

from anemia_jax import cli
from anemia_jax.utils import atomic


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.convert_weights", __doc__)
    cmd.config_flag()
    flags.DEFINE_string("in", None, ".safetensors or .npz checkpoint to convert.", flag_values=cmd.flags)
    flags.DEFINE_string("out", None, "Output directory (created).", flag_values=cmd.flags)
    for name in ("in", "out"):
        flags.mark_flag_as_required(name, flag_values=cmd.flags)
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first; default ``sys.argv``); returns the exit status."""
    cmd = _command()
    try:
        if cmd.parse(sys.argv if argv is None else argv) is None:
            return cli.EXIT_OK  # --help
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    try:
        out, count, name = _convert(cmd)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail(e)
    print(f"wrote {out / 'encoder.npz'} ({count} encoder variables) for {name}")
    return cli.EXIT_OK


def _convert(cmd: cli.Command) -> tuple[pathlib.Path, int, str]:
    """Converts ``--in`` into ``--out``; returns (out, number of variables, model name)."""
    import jax  # noqa: PLC0415 -- after the flags

    from anemia_jax.runs import model_factory  # noqa: PLC0415
    from anemia_jax.training import pretrained  # noqa: PLC0415

    config = cmd.config
    src = pretrained.checkpoint_file(cmd.flags["in"].value)
    out = pathlib.Path(cmd.out).expanduser()
    if os.path.realpath(out / "encoder.npz") == os.path.realpath(src):
        raise cli.CommandLineError(f"--out={cmd.out} would replace the input {src} with its conversion; choose "
                                   "another --out.")
    # Read and hashed before anything is written: meta.json names the source as it was converted.
    tensors = pretrained.read_checkpoint(src)
    digest = _sha256(src)
    model = model_factory.build_model(config)
    h, w = config.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, h, w, 3)), train=False))
    converted = pretrained.convert(tensors, model=model, target=shapes, source=str(src))
    atomic.ensure_dir(out)
    arrays = {"/".join(path): value for path, value in converted.items()}
    arrays[pretrained.CONVERTED_MARKER] = np.zeros((), np.int8)
    with atomic.open_atomic(out / "encoder.npz", "wb") as f:
        np.savez(f, **arrays)
    fields = {k: v for k, v in config.model.to_dict().items() if k != "pretrained"}
    meta = {"source": str(src.resolve()), "sha256": digest, "config": cmd.config_file_name(), "model": fields,
            "image_size": [int(h), int(w)], "tensors": len(converted)}
    atomic.write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return out, len(converted), config.model.name


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
