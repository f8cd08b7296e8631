"""One process of the two-process CPU training run of tests/test_multiprocess.py.

Run as `python multiprocess_worker.py --process_id I --num_processes N --port P --out F.npz`
with `XLA_FLAGS=--xla_force_host_platform_device_count=K` and `JAX_PLATFORMS=cpu` in the
environment: joins the run through `jax.distributed.initialize` on 127.0.0.1 (CPU collectives
over gloo), feeds only this process's rows of each synthetic global batch, trains `NUM_STEPS`
steps (augmentation and dropout on) and writes the final state and metrics to `--out`.

`train()` is also what the test calls in its own process, on a single-process mesh of the same
size, to get the reference the workers must reproduce.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

from anemia_jax import losses
from anemia_jax.data import augment
from anemia_jax.inference import probabilities
from anemia_jax.models.unet import UNet
from anemia_jax.training import steps
from anemia_jax.utils import parallel

SIZE, TARGETS, GLOBAL_BATCH, NUM_STEPS = 16, 2, 8, 3
# Depth 1 keeps the three compilations (two workers, one reference) short on a shared CPU.
MODEL = UNet(num_classes=TARGETS, features=4, depth=1, dropout_rate=0.1, bn_axis_name=parallel.DATA_AXIS)
# SGD rather than Adam: Adam's first steps are ~lr * sign(grad), which turns summation-order noise in
# near-zero gradients into lr-sized parameter differences.
TX = optax.sgd(0.1, momentum=0.9)


def augment_config():
    """A light augmentation (flip, rotation, brightness): enough to exercise per-device keys."""
    c = augment.default_config()
    for name in ("scale_prob", "translate_prob", "contrast_prob", "saturation_prob", "hue_prob", "gamma_prob",
                 "blur_prob", "noise_prob"):
        c[name] = 0.0
    return c


def loss_fn(outputs, labels, weights):
    return losses.combo_loss(outputs.logits, labels, weights=weights)


def global_batch(step: int) -> dict[str, np.ndarray]:
    """The whole synthetic batch of `step`, identical in every process."""
    rng = np.random.default_rng(1000 + step)
    image = rng.integers(0, 256, (GLOBAL_BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.stack([image[..., 0] > 128, image[..., 2] > 64], axis=-1).astype(np.uint8)
    mask_weights = np.ones((GLOBAL_BATCH, TARGETS), np.float32)
    mask_weights[2, 0] = 0.0
    return {"image": image, "masks": masks, "mask_weights": mask_weights,
            "valid": np.ones(GLOBAL_BATCH, bool), "index": np.arange(GLOBAL_BATCH, dtype=np.int32)}


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows (process order = mesh order, see make_mesh)."""
    per = GLOBAL_BATCH // jax.process_count()
    start = jax.process_index() * per
    return {k: v[start:start + per] for k, v in batch.items()}


def train(mesh) -> dict[str, np.ndarray]:
    """Trains NUM_STEPS steps on `mesh`; returns flat host arrays (every process gets them all)."""
    state = steps.create_train_state(MODEL, TX, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), mesh)
    train_step = steps.make_train_step(MODEL, TX, loss_fn, mesh, augment_config=augment_config())
    history = []
    for step in range(NUM_STEPS):
        state, m = train_step(state, parallel.host_local_to_global(local_rows(global_batch(step)), mesh))
        history.append(m)
    probability = probabilities.sharded(probabilities.probability_fn(MODEL), mesh)
    eval_out = probability(steps.model_variables(state),
                           parallel.host_local_to_global(local_rows(global_batch(NUM_STEPS))["image"], mesh))
    host = parallel.fetch({"state": state, "history": history, "eval": eval_out})
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(host)}
    flat["num_devices"] = np.asarray(mesh.size)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Gloo is JAX 0.10's default CPU collectives implementation; named explicitly so that a
    # change of default cannot silently leave the processes unable to all-reduce.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
    result = train(parallel.make_mesh())
    result["process_index"] = np.asarray(jax.process_index())
    result["local_device_count"] = np.asarray(jax.local_device_count())
    np.savez(args.out, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
