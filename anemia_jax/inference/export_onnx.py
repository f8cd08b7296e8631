"""ONNX conversion of an exported inference bundle, in an environment of its own (jax2onnx + ONNX Runtime).

Why a second environment: the converter, jax2onnx, requires ``orbax-checkpoint<0.11.37``, older than this package's own
``orbax-checkpoint>=0.12.8``. Conversion needs no Orbax: ``python -m anemia_jax.export --format=onnx`` (in the project's
environment) restores the runs and writes a *bundle* (`write_bundle`): one ``.npz`` with every member's variables as
plain arrays and a JSON manifest saying how to rebuild each model (registered name and constructor fields), the
inference options and the model card. This module imports only NumPy, JAX, Flax, the models and
`anemia_jax.inference.probabilities` at load time (jax2onnx and onnxruntime when converting), and turns a bundle into
ONNX::

    python -m venv .onnx-venv
    .onnx-venv/bin/pip install -r requirements-onnx.txt
    .onnx-venv/bin/pip install --no-deps -e .
    .onnx-venv/bin/python -m anemia_jax.export_onnx model.bundle.npz --out=model.onnx

(``anemia_jax.export --format=onnx --onnx_python=.onnx-venv/bin/python`` runs that last step itself.) The flags are
plain argparse: this environment lacks absl's config machinery (`anemia_jax.cli`).

The graph takes ``images`` uint8 ``[N, H, W, 3]`` (N symbolic) and returns ``probabilities`` float32 ``[N, H, W, C]``:
normalisation, the model(s) (members averaged) and the sigmoid inside, the same function as
`anemia_jax.inference.probabilities.probability_fn`. An ensemble's graph also returns ``member_probabilities``
float32 ``[M, N, H, W, C]``, each member's own (`probabilities.members_fn`): the uncertainty maps and the quality
verdict of ``predict --onnx`` and the page (`anemia_jax.inference.onnx_engine`) read where the members disagree. The card (`anemia_jax.inference.model_card`) is written beside it
and also stored in the model's ``metadata_props`` (key ``anemia_jax.model_card``). After conversion ONNX Runtime runs
the graph on a random batch and the largest difference from the JAX function is recorded in the card
(``conversion_check``).

How the layers convert (verified with jax2onnx 0.17.1, jax 0.10.2, ONNX opset 23, ONNX Runtime 1.32; parity tests
in tests/onnx/): NHWC convolutions become Transpose + Conv; `ConvTranspose2x2` (a 1x1 convolution and a
depth-to-space reshape/transpose) becomes Conv + Reshape + Transpose; BatchNorm in inference mode becomes
BatchNormalization; `max_pool_2x2` (reshape + max) becomes Reshape + ReduceMax; sigmoid, concatenation and the
uint8 -> float normalisation map one to one. ``jax.image.resize`` (the 'resize' upsampling and TTA rescaling) does
NOT convert through jax2onnx's own Resize rule once the batch is symbolic: that rule needs every output dimension to
be an integer (``InconclusiveDimensionOperation``). `_jax_resize` puts JAX's own implementation back while tracing,
so it lowers to what JAX computes anyway (interpolation weights and Einsum contractions; bilinear upsampling is
unaffected by antialiasing) -- equal to JAX within float rounding (tests/onnx/).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from anemia_jax.inference import model_card, probabilities, tta
from anemia_jax.models import get_model
from anemia_jax.models.layers import field_names

__all__ = ["BUNDLE_FORMAT", "DEFAULT_OPSET", "bundle_function", "convert", "main", "member_spec", "read_bundle",
           "to_onnx", "write_bundle"]

BUNDLE_FORMAT = "anemia_jax.export_bundle"
BUNDLE_VERSION = 1
DEFAULT_OPSET = 23
_MANIFEST = "__manifest__"
# jax.image.resize as JAX defines it, kept before jax2onnx (imported lazily) patches it during conversion.
_JAX_RESIZE = jax.image.resize


def member_spec(name: str, model, *, prune_level: int | None = None,
                transforms: Sequence[tta.Transform] | None = None,
                temperature: Sequence[float] | None = None) -> dict[str, Any]:
    """How to rebuild one member: registered model ``name``, the flax ``model``'s constructor fields (dtypes as
    names; BatchNorm left unsynchronised, as inference needs no mesh), and its inference options (pruning, TTA,
    the temperature of each target)."""
    fields = {}
    for field in field_names(type(model)):
        if field == "name":  # flax's own module name, not a model field
            continue
        value = getattr(model, field)
        if field in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        fields[field] = list(value) if isinstance(value, tuple) else value
    fields["bn_axis_name"] = None
    json.dumps(fields)  # every field must survive the manifest (fails loudly here, not at conversion)
    return {"model": name, "fields": fields, "prune_level": prune_level,
            "tta": None if not transforms else [{"flip": t.flip, "scale": t.scale} for t in transforms],
            "temperature": None if temperature is None else [float(t) for t in temperature]}


def write_bundle(path: str | pathlib.Path, *, members: Sequence[Mapping[str, Any]], variables: Sequence[Any],
                 image_size: tuple[int, int], targets: Sequence[str], card: Mapping[str, Any]) -> pathlib.Path:
    """Writes the bundle: each member's variables (``m<i>/<collection>/<module path>/<name>``) and the manifest."""
    if len(members) != len(variables) or not members:
        raise ValueError(f"{len(members)} member specs for {len(variables)} sets of variables; give one each.")
    arrays = {}
    for i, v in enumerate(variables):
        for key, value in traverse_util.flatten_dict(jax.device_get(v), sep="/").items():
            arrays[f"m{i}/{key}"] = np.asarray(value)
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "image_size": list(image_size),
                "targets": list(targets), "members": list(members), "card": card}
    arrays[_MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def read_bundle(path: str | pathlib.Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(manifest, [variables of each member])`` of a bundle written by `write_bundle`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No bundle at {path}; write one with `python -m anemia_jax.export --format=onnx`.")
    with np.load(path, allow_pickle=False) as data:
        if _MANIFEST not in data.files:
            raise ValueError(f"{path} is not an anemia_jax export bundle (no manifest); re-create it with "
                             "`python -m anemia_jax.export --format=onnx`.")
        manifest = json.loads(data[_MANIFEST].tobytes().decode("utf-8"))
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
            raise ValueError(f"{path} has bundle format {manifest.get('format')!r} version {manifest.get('version')};"
                             f" this anemia_jax reads {BUNDLE_FORMAT!r} version {BUNDLE_VERSION}.")
        flat: list[dict[str, np.ndarray]] = [{} for _ in manifest["members"]]
        for key in data.files:
            if key != _MANIFEST:
                member, _, rest = key.partition("/")
                flat[int(member[1:])][rest] = data[key]
    return manifest, [traverse_util.unflatten_dict(f, sep="/") for f in flat]


def bundle_function(manifest: Mapping[str, Any], variables: Sequence[Any], *,
                    members: bool = False) -> Callable[[jax.Array], Any]:
    """``probs(images_u8 [N, H, W, 3]) -> float32 [N, H, W, C]`` of a bundle: the members rebuilt from their specs
    (`anemia_jax.inference.probabilities.probability_fn`), averaged when there are several, variables closed over.
    ``members=True``: ``(that mean, each member's probabilities [M, N, H, W, C])``, the mean taken of the same
    stack (the graph an ensemble converts to)."""
    fns = []
    for spec in manifest["members"]:
        model = get_model(spec["model"], **spec["fields"])
        transforms = None if not spec["tta"] else [tta.Transform(**t) for t in spec["tta"]]
        fns.append(probabilities.probability_fn(model, prune_level=spec["prune_level"], transforms=transforms,
                                                temperature=spec.get("temperature")))
    if members:
        stacked = probabilities.members_fn(fns)
        bound_all = tuple(variables)

        def both(images_u8):
            each = stacked(bound_all, images_u8)
            return jnp.mean(each, axis=0), each

        return both
    fn = fns[0] if len(fns) == 1 else probabilities.ensemble_fn(fns)
    bound = variables[0] if len(fns) == 1 else tuple(variables)
    return lambda images_u8: fn(bound, images_u8)


@contextlib.contextmanager
def _jax_resize() -> Iterator[None]:
    """JAX's own ``jax.image.resize`` while tracing (see the module docstring), jax2onnx's patch restored after."""
    patched = jax.image.resize
    jax.image.resize = _JAX_RESIZE
    try:
        yield
    finally:
        jax.image.resize = patched


def to_onnx(fn: Callable[[jax.Array], Any], image_size: Sequence[int], *, opset: int = DEFAULT_OPSET,
            name: str = "anemia_jax", output_names: Sequence[str] = ("probabilities",)):
    """The ONNX ``ModelProto`` of ``fn`` (uint8 ``images [N, H, W, 3]`` -> ``output_names``, one per result of
    ``fn``), N symbolic."""
    import jax2onnx  # noqa: PLC0415 -- only the ONNX environment has it

    def traced(images_u8):
        with _jax_resize():
            return fn(images_u8)

    h, w = (int(s) for s in image_size)
    return jax2onnx.to_onnx(traced, [jax.ShapeDtypeStruct(("N", h, w, 3), jnp.uint8)], model_name=name,
                            opset=opset, input_names=["images"], output_names=list(output_names))


def _check(onnx_bytes: bytes, fn: Callable, image_size: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime vs ``fn`` on a random uint8 batch of 2: the largest absolute difference (over every output) and
    mask agreement."""
    import onnxruntime  # noqa: PLC0415

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(seed).integers(0, 256, (2, *image_size, 3), dtype=np.uint8)
    got = session.run(None, {"images": images})
    want = [np.asarray(w) for w in jax.tree.leaves(jax.jit(fn)(images))]
    return {"inputs": "2 random uint8 images", "outputs": [o.name for o in session.get_outputs()],
            "max_abs_diff": max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)),
            "masks_equal_at_0.5": all(bool(np.array_equal(g > 0.5, w > 0.5)) for g, w in zip(got, want)),
            "onnxruntime": onnxruntime.__version__}


def convert(bundle: str | pathlib.Path, out: str | pathlib.Path, *, opset: int = DEFAULT_OPSET,
            check: bool = True) -> pathlib.Path:
    """Converts ``bundle`` into the ONNX model ``out`` and writes its card (`model_card.card_path`); returns ``out``.
    """
    import onnx  # noqa: PLC0415

    manifest, variables = read_bundle(bundle)
    ensemble = len(manifest["members"]) > 1
    fn = bundle_function(manifest, variables, members=ensemble)
    image_size = manifest["image_size"]
    outputs = ["probabilities", "member_probabilities"] if ensemble else ["probabilities"]
    proto = to_onnx(fn, image_size, opset=opset, output_names=outputs)
    # jax2onnx 0.17.1 stamps some intermediate values with their NHWC shape after its layout pass made them NCHW;
    # ONNX Runtime warns and ignores them. Only the inputs' and outputs' shapes are kept; the rest is inferred.
    del proto.graph.value_info[:]
    card = dict(manifest["card"])
    onnx.helper.set_model_props(proto, {"anemia_jax.model_card": json.dumps(card)})
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    out.write_bytes(data)
    info = {"format": "onnx", "opset": opset, "jax2onnx": importlib.metadata.version("jax2onnx"), "onnx": onnx.__version__,
            "jax": jax.__version__, "input": "images uint8 [N, H, W, 3]", "output": "probabilities float32"
            + (", member_probabilities float32 [M, N, H, W, C]" if ensemble else "")}
    if check:
        info["conversion_check"] = _check(data, fn, image_size)
    model_card.write(card, out, **info)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anemia_jax.export_onnx BUNDLE --out=MODEL.onnx [--opset=23] [--no_check]``; returns the exit
    status (0 written, 2 bad arguments or bundle, 1 conversion failed)."""
    parser = argparse.ArgumentParser(prog="python -m anemia_jax.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle .npz written by `python -m anemia_jax.export --format=onnx`")
    parser.add_argument("--out", required=True, help="the ONNX file to write (its card goes beside it)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    parser.add_argument("--no_check", action="store_true", help="skip the ONNX Runtime check after conversion")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv[1:]))
    try:
        import jax2onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
    except ImportError as e:
        print(f"export_onnx: {e}. Run this in the ONNX environment (README: Export a model): python -m venv "
              ".onnx-venv && .onnx-venv/bin/pip install -r requirements-onnx.txt && .onnx-venv/bin/pip install "
              "--no-deps -e .", file=sys.stderr)
        return 2
    try:
        out = convert(args.bundle, args.out, opset=args.opset, check=not args.no_check)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"export_onnx: {e}", file=sys.stderr)
        return 2
    check = json.loads(model_card.card_path(out).read_text())["artifact"].get("conversion_check")
    print(f"Wrote {out} and {model_card.card_path(out)}"
          + (f" (ONNX Runtime vs JAX: max |diff| {check['max_abs_diff']:.2e})" if check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
