"""The config factory every model config uses (configs/unet.py, unetpp.py, attention_unet.py, ...).

Not a config itself: a model file holds only its ``model`` block (and model-specific loss fields) and calls
`model_config`, which adds everything shared. The argument after the colon of ``--config=configs/<model>.py:<arg>``
is parsed here; its keys (all optional, comma-separated):

  data=eyes_defy_anemia|phantom|kvasir_seg   dataset (aliases: eyes, kvasir); default eyes_defy_anemia
  size=256                                   square training resolution (image_size=(size, size))
  fold=0                                     K-fold validation fold (eyes/phantom; 5 folds by patient)
  loco=<country>                             leave-one-country-out instead of K-fold, e.g. loco=Italy
  batch=16                                   global batch size (split over every device of every host)
  epochs=<n> | steps=<n>                     run length (steps win if both are given)
  dtype=bfloat16|float32                     computation dtype (parameters are always float32)
  seed=0                                     initialisation, data order and augmentation seed
  test                                       tiny everything, for end-to-end tests (well under a minute on a CPU);
                                             a size, batch, steps or dtype given beside it is kept

Everything else is reachable with flags, e.g. ``--config.optimizer.learning_rate=3e-4``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from anemia_jax.data import augment
from anemia_jax.runs import config_lib, loss_config

ARG_DEFAULTS = dict(data="eyes_defy_anemia", size=256, fold=0, loco="", batch=16, epochs=0, steps=0,
                    dtype="bfloat16", seed=0, test=False)

def parse(arg: str | None) -> ml_collections.ConfigDict:
    """The parsed ``arg`` (see the module docstring), with the dataset alias resolved."""
    args = config_lib.parse_arg(arg, **ARG_DEFAULTS)
    args.data = config_lib.dataset_spec(args.data).name
    return args


def _given(arg: str | None) -> set[str]:
    """The keys ``arg`` sets explicitly (``'data=phantom,test,batch=4'`` -> data, test, batch)."""
    return {item.partition("=")[0].strip() for item in (arg or "").split(",") if item.strip()}


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
    spec = config_lib.dataset_spec(c.dataset.name)
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

    # Cross-entropy + soft Dice, with every hyper-parameter of the loss shown (`anemia_jax.runs.loss_config`):
    # --config.loss.name=NAME switches the loss, --config.loss.<hyper>=VALUE sets one of the chosen loss's own.
    c.loss = loss_config.loss_config("combo", ce_weight=0.5, dice_weight=0.5)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3  # Peak, after the linear warm-up; then cosine decay.
    c.optimizer.end_lr_ratio = 0.01  # Final learning rate as a fraction of the peak.
    c.optimizer.weight_decay = 1e-4  # Decoupled (AdamW); not applied to biases and normalisation scales.
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
    # Fine-tuning a pretrained encoder (models with an 'encoder' parameter scope): its learning rate as a fraction
    # of the others', and how many first steps it stays frozen.
    c.optimizer.encoder_lr_multiplier = 1.0
    c.optimizer.freeze_encoder_steps = 0

    c.batch_size = args.batch
    c.eval_batch_size = 0  # 0: batch_size.
    schedule = dict(spec.schedule)
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
    c.profile_steps = 0  # > 0: a jax.profiler trace of that many steps (after the first) in <workdir>/profile.

    if args.test:
        given = _given(arg)  # what the argument states beside 'test' is kept, never silently replaced
        c.image_size = c.image_size if "size" in given else (32, 32)
        c.batch_size = c.batch_size if "batch" in given else 8
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


def model_config(arg: str | None, *, name: str, model: Mapping[str, Any], test_model: Mapping[str, Any],
                 loss: Mapping[str, Any] | None = None, test_loss: Mapping[str, Any] | None = None
                 ) -> ml_collections.ConfigDict:
    """A complete training config: `base_config` plus the model's own block.

    Args:
        arg: the config argument string (see the module docstring).
        name: the config's name (its file stem), recorded in outputs and used for the default workdir.
        model: the ``config.model`` block (``name`` is the registered model, then its constructor fields).
        test_model: fields that replace ``model``'s under the ``test`` argument (tiny widths).
        loss: model-specific ``config.loss`` fields (e.g. UNet++'s per-output deep-supervision weights).
        test_loss: fields that replace ``loss``'s under ``test``.
    """
    config, args = base_config(arg, name=name)
    config.model = ml_collections.ConfigDict(dict(model))
    config.loss.update(dict(loss or {}))
    if args.test:
        config.model.update(dict(test_model))
        config.loss.update(dict(test_loss or {}))
    return config
