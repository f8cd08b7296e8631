"""Converts a downloaded encoder checkpoint once into the model's own layout: ``DIR/encoder.npz`` + ``DIR/meta.json``.

    python -m anemia_jax.convert_weights --model=unetpp --model_kwargs=encoder=resnet34 \
        --in=~/weights/resnet34.a1_in1k.safetensors --out=~/weights/unetpp_resnet34
    python -m anemia_jax.convert_weights --model=segformer --model_kwargs=variant=b2 --in=mit-b2.safetensors --out=DIR
    python -m anemia_jax.convert_weights --model=transunet --image_size=256 --in=R50+ViT-B_16.npz --out=DIR

``encoder.npz`` holds the encoder's variables under their Flax paths (``params/encoder/layer1_0/conv1/kernel``,
``batch_stats/encoder/...``), converted (HWIO kernels, transposed linear layers, position embeddings resized to
``--image_size``) and checked against the model (every tensor used or ignored by name, every encoder variable
present, every shape equal). It is a plain ``.npz`` (read with ``allow_pickle=False``), so ``--config.model.pretrained``
accepts it or DIR without PyTorch-layout conversion; the original file works there too (converted on each load).
``meta.json`` records the source file, its SHA-256, the model and the image size.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import pathlib
import sys

import numpy as np


def parse_kwargs(text: str) -> dict:
    """``'encoder=resnet34,variant=b0,resnet_layers=(3,4,9)'`` -> dict (values as Python literals, else strings)."""
    out = {}
    for item in filter(None, _split_top_level(text)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model_kwargs entries are key=value; got {item!r}.")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name, e.g. unetpp, segformer, transunet")
    parser.add_argument("--model_kwargs", default="", help="model fields, e.g. encoder=resnet34 or variant=b2")
    parser.add_argument("--image_size", type=int, default=256, help="training image size (position embeddings)")
    parser.add_argument("--in", dest="src", required=True, help=".safetensors or .npz checkpoint")
    parser.add_argument("--out", required=True, help="output directory (created)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from anemia_jax import pretrained
    from anemia_jax.models import get_model

    kwargs = parse_kwargs(args.model_kwargs)
    model = get_model(args.model, **kwargs)
    size = args.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    src = pathlib.Path(args.src).expanduser()
    try:
        converted = pretrained.convert(pretrained.read_checkpoint(src), model=model, target=shapes, source=str(src))
    except (pretrained.PretrainedError, FileNotFoundError) as e:
        print(f"convert_weights: {e}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"/".join(path): value for path, value in converted.items()}
    arrays[pretrained.CONVERTED_MARKER] = np.zeros((), np.int8)
    np.savez(out / "encoder.npz", **arrays)
    meta = {"source": str(src.resolve()), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "model": args.model, "model_kwargs": kwargs, "image_size": size, "tensors": len(converted)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / 'encoder.npz'} ({len(converted)} encoder variables) for {args.model} {kwargs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
