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
original file works there too (converted on each load). ``meta.json`` records the source file, its SHA-256, the
model and the image size.

Exit status: 0 written; 1 the file does not fit the model (the message names the tensors); 2 bad arguments.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import numpy as np
from absl import flags

from anemia_jax import cli


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
        print(f"convert_weights: {e}", file=sys.stderr)
        return cli.EXIT_CONFIG
    import jax  # noqa: PLC0415 -- after the flags

    from anemia_jax.runs import model_factory
    from anemia_jax.training import pretrained  # noqa: PLC0415

    config = cmd.config
    model = model_factory.build_model(config)
    h, w = config.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, h, w, 3)), train=False))
    src = pathlib.Path(cmd.flags["in"].value).expanduser()
    try:
        converted = pretrained.convert(pretrained.read_checkpoint(src), model=model, target=shapes, source=str(src))
    except (pretrained.PretrainedError, FileNotFoundError) as e:
        print(f"convert_weights: {e}", file=sys.stderr)
        return cli.EXIT_FAILED
    out = pathlib.Path(cmd.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"/".join(path): value for path, value in converted.items()}
    arrays[pretrained.CONVERTED_MARKER] = np.zeros((), np.int8)
    np.savez(out / "encoder.npz", **arrays)
    fields = {k: v for k, v in config.model.to_dict().items() if k != "pretrained"}
    meta = {"source": str(src.resolve()), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "config": cmd.config_file_name(), "model": fields, "image_size": [int(h), int(w)],
            "tensors": len(converted)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / 'encoder.npz'} ({len(converted)} encoder variables) for {config.model.name}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
