"""Tiny models and inputs shared by the export parity tests (tests/test_export.py in the project environment,
tests/onnx/ in the ONNX environment, which has no TFDS, Orbax or ml_collections: only JAX, Flax, NumPy and PIL here).

Inputs: phantom photos (tests/fixtures/phantom_photos.npz: `conjunctiva_phantom.phantom.generate_example(0, i,
long_side=64)` for i = 0, 1, 2, checked against the generator by tests/test_export.py) resized to the model size as
photos are, and uniform random uint8 images; batches of 1 and 3.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from anemia_jax.models import get_model
from anemia_jax.utils import image_io

SIZE = (32, 32)
PHANTOM_FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "phantom_photos.npz"
# name -> (registered model, constructor fields); 4 features, depth 2, two targets, float32.
MODELS = {
    "unet": ("unet", {}),
    "unet_resize": ("unet", {"upsample": "resize"}),
    "unetpp_ds": ("unetpp", {"deep_supervision": True}),
}


def _perturbed(variables, seed: int):
    """Variables whose BatchNorm layers do something: running means/variances, scales and biases away from their
    identity initial values (a fresh BatchNorm in inference mode is nearly the identity and would test little)."""
    rng = np.random.default_rng(seed)
    draws = {"mean": lambda s: rng.normal(0.0, 0.1, s), "var": lambda s: rng.uniform(0.5, 1.5, s),
             "scale": lambda s: 1.0 + rng.normal(0.0, 0.1, s), "bias": lambda s: rng.normal(0.0, 0.1, s)}

    def perturb(path, leaf):
        draw = draws.get(str(path[-1].key))
        return np.asarray(draw(leaf.shape) if draw else leaf, np.float32)

    return jax.tree_util.tree_map_with_path(perturb, variables)


def tiny_model(case: str, seed: int = 0):
    """``(registered name, flax model, host variables)`` of a `MODELS` case."""
    name, fields = MODELS[case]
    model = get_model(name, num_classes=2, features=4, depth=2, dtype="float32", **fields)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *SIZE, 3)), train=False)
    return name, model, _perturbed(variables, seed)


def phantom_photos() -> np.ndarray:
    """The three fixture phantom photos, uint8 [3, 64, 48, 3]."""
    with np.load(PHANTOM_FIXTURE) as data:
        return data["photos"]


def input_cases() -> dict[str, np.ndarray]:
    """name -> uint8 [B, 32, 32, 3]: phantom photos and random images, batches of 1 and 3."""
    phantoms = np.stack([image_io.resize_image(p, SIZE) for p in phantom_photos()])
    random = np.random.default_rng(7).integers(0, 256, (3, *SIZE, 3), dtype=np.uint8)
    return {"phantom_b1": phantoms[:1], "phantom_b3": phantoms, "random_b1": random[:1], "random_b3": random}
