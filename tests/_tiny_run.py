"""A tiny UNet++ run directory shared by test_evaluate.py and test_predict.py (built once per test session).

The run is what `anemia_jax.training.train.train_and_evaluate` leaves behind -- ``config.json`` written by
`reporting.Reporter` and Orbax checkpoints of the full `steps.TrainState` written by `checkpointing.CheckpointManager`
-- but its states come from `experiment.init_train_state` rather than from training: evaluation and prediction
only restore and apply them, and skipping the training step's compilation keeps the tests fast. Two checkpoints
are saved: step 2 ranked best (validation mean Dice 0.9) and step 4, the latest (0.1), with different parameters.
The config is the deep-supervised ``configs/unetpp.py:data=phantom,test`` (4 features, depth 2, 32x32, the
32-example ``res64`` phantom in a temporary data_dir).

Test modules use it through the fixtures `workdir` (the run directory) and `best_run` (its best checkpoint,
restored): ``from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures``.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from anemia_jax.data import loading
from anemia_jax.runs import checkpointing, config_lib, model_factory, restore
from anemia_jax.training import experiment, reporting
from anemia_jax.utils import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
_CACHE: dict[str, pathlib.Path] = {}


def make_run(root: pathlib.Path) -> pathlib.Path:
    """Writes the run into ``root / 'run'`` (the phantom data into ``root / 'tfds'``) and returns the workdir."""
    config = config_lib.load_config_file(f"{REPO}/configs/unetpp.py:data=phantom,test")
    config.dataset.data_dir = str(root / "tfds")
    config.compilation_cache_dir = ""
    workdir = root / "run"
    loading.prepare_builder(config)  # prepares the dataset
    mesh = parallel.make_mesh()
    model = model_factory.build_model(config)
    tx, _ = experiment.build_optimizer(config, total_steps=config.num_train_steps, warmup_steps=config.warmup_steps)
    state = experiment.init_train_state(config, model, tx, mesh)
    reporting.Reporter(workdir, is_main=True).write_config(config.to_dict())
    with checkpointing.CheckpointManager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints) as manager:
        manager.save(2, state.replace(step=parallel.replicate(np.int32(2), mesh)), metrics={"dice/mean": 0.9})
        # A visibly different latest state: every parameter shifted.
        later = state.replace(step=parallel.replicate(np.int32(4), mesh),
                              params=jax.tree.map(lambda p: p + 0.05, state.params))
        manager.save(4, later, metrics={"dice/mean": 0.1})
    return workdir


def tiny_run(tmp_path_factory) -> pathlib.Path:
    """The shared run's workdir (created on first use in this session)."""
    if "run" not in _CACHE:
        _CACHE["run"] = make_run(tmp_path_factory.mktemp("tiny_run"))
    return _CACHE["run"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """The shared run directory."""
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def best_run(workdir) -> restore.Run:
    """The shared run restored at its best checkpoint (step 2)."""
    return restore.load_run(workdir, checkpoint="best")
