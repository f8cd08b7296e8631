"""Defaults shared by every model config (configs/unet.py, unetpp.py, attention_unet.py).

Not a config itself: the model files call `base_config` and add their ``model`` block. The argument after the colon
of ``--config=configs/<model>.py:<arg>`` is parsed here; its keys (all optional, comma-separated):

  data=eyes_defy_anemia|phantom|kvasir_seg   dataset (aliases: eyes, kvasir); default eyes_defy_anemia
  size=256                                   square training resolution (image_size=(size, size))
  fold=0                                     K-fold validation fold (eyes/phantom; 5 folds by patient)
  loco=<country>                             leave-one-country-out instead of K-fold, e.g. loco=Italy
  batch=16                                   global batch size (split over every device of every host)
  epochs=<n> | steps=<n>                     run length (steps win if both are given)
  dtype=bfloat16|float32                     computation dtype (parameters are always float32)
  seed=0                                     initialisation, data order and augmentation seed
  test                                       tiny everything, for end-to-end tests (well under a minute on a CPU)

Everything else is reachable with flags, e.g. ``--config.optimizer.learning_rate=3e-4``.
"""

from __future__ import annotations

import ml_collections

from anemia_jax import augment, config_lib

ARG_DEFAULTS = dict(data="eyes_defy_anemia", size=256, fold=0, loco="", batch=16, epochs=0, steps=0,
                    dtype="bfloat16", seed=0, test=False)

# Run lengths and intervals per dataset, in epochs (their sizes differ by 5x).
_SCHEDULES = {
    # ~175 training photos per fold -> 11 steps per epoch at batch 16.
    "eyes_defy_anemia": dict(num_epochs=300, warmup_epochs=5, eval_every_epochs=10, checkpoint_every_epochs=10),
    "phantom": dict(num_epochs=100, warmup_epochs=3, eval_every_epochs=5, checkpoint_every_epochs=5),
    # 880 official training images (minus the validation holdout) -> ~50 steps per epoch.
    "kvasir_seg": dict(num_epochs=100, warmup_epochs=2, eval_every_epochs=2, checkpoint_every_epochs=2),
}


def parse(arg: str | None) -> ml_collections.ConfigDict:
    """The parsed ``arg`` (see the module docstring), with the dataset alias resolved."""
    args = config_lib.parse_arg(arg, **ARG_DEFAULTS)
    args.data = config_lib.DATASET_ALIASES.get(args.data, args.data)
    return args


def base_config(arg: str | None, *, name: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """Every field of a training config except ``model`` (and the model-specific loss weights).

    Args:
        arg: the config argument string (see the module docstring).
        name: the config's name (its file stem), recorded in outputs and used for the default workdir.

    Returns:
        ``(config, args)``: the config, and the parsed arguments for the model file's own choices.
    """
    args = parse(arg)
    c = ml_collections.ConfigDict()
    c.name = name
    c.arg = arg or ""
    c.seed = args.seed

    c.dataset = config_lib.dataset_config(args.data, image_size=args.size)
    spec = config_lib.DATASETS[c.dataset.name]
    c.targets = spec.default_targets
    c.image_size = (args.size, args.size)

    c.split = ml_collections.ConfigDict()
    c.split.protocol = "loco" if args.loco else spec.protocols[0]
    c.split.num_folds = 5
    c.split.fold = args.fold
    c.split.test_country = args.loco
    # loco/holdout: fraction of the training patients kept apart for validation (model selection never sees test).
    c.split.val_fraction = 0.1
    c.split.seed = 0  # Fixed apart from `seed`, so that different seeds compare on the same folds.

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "combo"  # Cross-entropy + soft Dice.
    c.loss.ce_weight = 0.5
    c.loss.dice_weight = 0.5

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3  # Peak, after the linear warm-up; then cosine decay.
    c.optimizer.end_lr_ratio = 0.01  # Final learning rate as a fraction of the peak.
    c.optimizer.weight_decay = 1e-4  # Decoupled (AdamW); not applied to biases and normalisation scales.
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.

    c.batch_size = args.batch
    c.eval_batch_size = 0  # 0: batch_size.
    schedule = _SCHEDULES[c.dataset.name]
    # Durations and intervals: `<x>_steps` wins over `<x>_epochs` when > 0.
    c.num_epochs = args.epochs or schedule["num_epochs"]
    c.num_train_steps = args.steps
    c.warmup_epochs = schedule["warmup_epochs"]
    c.warmup_steps = 0
    c.eval_every_epochs = schedule["eval_every_epochs"]
    c.eval_every_steps = 0
    c.checkpoint_every_epochs = schedule["checkpoint_every_epochs"]
    c.checkpoint_every_steps = 0
    c.log_every_steps = 20
    c.keep_checkpoints = 3  # The latest 3, plus the best by validation mean Dice.

    c.compute_dtype = args.dtype
    c.augment = augment.default_config()
    c.compilation_cache_dir = config_lib.default_cache_dir()  # '' disables the persistent compilation cache.
    c.max_panels = 8  # Validation examples drawn in each evaluation's PNG panel.

    if args.test:
        c.image_size = (32, 32)
        c.batch_size = 8
        c.num_train_steps = args.steps or 24  # ~3 epochs of the 25 training examples at batch 8.
        c.warmup_steps = 2
        c.eval_every_steps = 12
        c.checkpoint_every_steps = 4
        c.log_every_steps = 2
        c.keep_checkpoints = 2
        c.compute_dtype = "float32" if args.dtype == ARG_DEFAULTS["dtype"] else args.dtype
        c.max_panels = 4
        if c.dataset.name == "phantom":
            c.dataset.builder_config = "res64"  # 32 examples, 64x48.
    return c, args
