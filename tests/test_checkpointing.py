"""Tests of anemia_jax.runs.checkpointing: retention (latest K plus the best), exact restore, other device counts.

The state is a real `steps.TrainState` with small hand-made parameters and AdamW state (no model to compile). A
checkpoint written here on 8 fake devices is restored in subprocesses that see 1 and 2 devices.
"""

import logging
import os
import pathlib
import sys
import textwrap

import _children
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _compilations import count_compilations
from absl import logging as absl_logging
from etils import epath

from anemia_jax.runs import checkpoint_handlers, checkpointing
from anemia_jax.training import optim, steps
from anemia_jax.utils import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_state(mesh, seed: int = 0) -> steps.TrainState:
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                       "bias": rng.normal(size=(4,)).astype(np.float32)}}
    tx = optax.adamw(1e-3, mask=optim.decay_mask)
    opt_state = jax.tree.map(lambda x: np.asarray(x) + 0.5, tx.init(params))
    state = steps.TrainState(step=np.int32(7), params=params, batch_stats={"bn": {"mean": np.arange(4.0)}},
                             opt_state=opt_state, rng=np.asarray([1, 2], np.uint32))
    return parallel.replicate(state, mesh)


def host(tree):
    return jax.tree.map(np.asarray, parallel.fetch(tree))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def test_keeps_latest_and_best(tmp_path):
    mesh = parallel.make_mesh()
    state = make_state(mesh)
    dice = {2: 0.9, 4: 0.3, 6: 0.5}  # evaluated steps; the others are saved without metrics
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        for step in range(1, 8):
            metrics = {"dice/mean": dice[step]} if step in dice else None
            assert mgr.save(step, state.replace(step=jnp.int32(step)), meta={"step": step}, metrics=metrics)
        assert not mgr.save(7, state)  # an existing step is left alone
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 6, 7]  # latest two, plus the best by dice
        assert (mgr.latest_step(), mgr.best_step()) == (7, 2)
        assert mgr.metrics(2) == {"dice/mean": 0.9} and mgr.metrics(7) is None
        restored, meta = mgr.restore(2, state)
        assert meta == {"step": 2} and int(restored.step) == 2
        with pytest.raises(FileNotFoundError, match=r"available: \[2, 6, 7\]"):
            mgr.restore(3, state)
        with pytest.raises(KeyError, match="dice/mean"):
            mgr.save(8, state, metrics={"dice": 1.0})


def test_no_best_without_metrics(tmp_path):
    state = make_state(parallel.make_mesh())
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2] and mgr.best_step() is None


def test_restore_is_exact_onto_template_shardings(tmp_path):
    mesh = parallel.make_mesh()
    state = make_state(mesh, seed=1)
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        mgr.save(7, state)
    # A fresh manager (as after a restart) restores into an abstract template.
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        assert mgr.latest_step() == 7
        template = checkpointing.abstract_like(make_state(mesh, seed=2))
        restored, meta = mgr.restore(7, template)
    assert meta == {} and isinstance(restored, steps.TrainState)
    assert_trees_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == parallel.replicated(mesh)


def test_replica_parallel_saving_only_for_large_arrays(tmp_path):
    # Orbax's replica-parallel saving slices a replicated array into one piece per replica with eager ops, each new
    # shape compiled once: for a model's many small arrays that cost seconds per save (2.8 s for the tiny test
    # model's first save on 8 devices). Shapes no other test uses, so that nothing is compiled already, each with an
    # axis of 8 that Orbax would slice over the 8 replicas.
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    small = parallel.replicate({f"w{i}": rng.normal(size=(8, 5, 7 + i)).astype(np.float32) for i in range(6)}, mesh)
    # Each replica's slice just over the limit.
    big_rows = checkpoint_handlers.MIN_REPLICA_SLICE_BYTES * mesh.size // (4 * 1024)
    big = parallel.replicate({"w": rng.normal(size=(big_rows + 8, 1024)).astype(np.float32)}, mesh)
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=3, async_save=False) as mgr:
        # (Also fails if Orbax's array handler changed and the package fell back to it unchanged.)
        assert count_compilations(lambda: mgr.save(1, small)) == 0
        assert count_compilations(lambda: mgr.save(2, big)) > 0  # still spread over the replicas
        assert_trees_equal(mgr.restore(1, small)[0], small)
        assert_trees_equal(mgr.restore(2, big)[0], big)


def test_another_orbax_array_handler_is_used_as_it_is(monkeypatch, warnings_log):
    # A later Orbax (or a registration with other options) may put another handler there: checkpoints are then
    # written with it unchanged (slower small saves), never with a handler missing its metadata store.
    import orbax.checkpoint as ocp

    class OtherHandler(ocp.type_handlers.ArrayHandler):
        pass

    other = OtherHandler()
    real = ocp.type_handlers.get_type_handler
    monkeypatch.setattr(ocp.type_handlers, "get_type_handler", lambda ty: other if ty is jax.Array else real(ty))
    assert checkpoint_handlers._array_handler() is other
    assert any("OtherHandler" in line for line in warnings_log)


def test_whole_state_and_variables_restore_from_one_manager(tmp_path):
    # One manager serves both restores (the whole state for a resume, the model variables for evaluation); with
    # Orbax's item_names registration the first restore bound the item to one handler and the other then failed.
    mesh = parallel.make_mesh()
    state = make_state(mesh, seed=3)
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        mgr.save(7, state)
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1, read_only=True) as mgr:
        restored, _ = mgr.restore(7, state)
        variables = mgr.restore_variables(7, {"params": state.params, "batch_stats": state.batch_stats})
        again, _ = mgr.restore(7, state)
    assert_trees_equal(restored, state)
    assert_trees_equal(again, state)
    assert_trees_equal(variables, {"params": state.params, "batch_stats": state.batch_stats})


def test_read_only_reader_leaves_the_writers_files_alone(tmp_path):
    # Evaluation opens a run's checkpoints while it may still be training: it must not touch a save in progress.
    state = make_state(parallel.make_mesh(), seed=5)
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        mgr.save(2, state, metrics={"dice/mean": 0.5})
    # What a save in progress (or an interrupted one) looks like: Orbax renames it to "3" once it is complete.
    in_progress = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    in_progress.mkdir()
    (in_progress / "partial").write_text("being written")
    listing = sorted(p.name for p in tmp_path.iterdir())
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1, read_only=True) as reader:
        assert reader.all_steps() == [2] and reader.best_step() == 2 and reader.metrics(2) == {"dice/mean": 0.5}
        restored, _ = reader.restore(2, state)
        with pytest.raises(RuntimeError, match="read_only"):
            reader.save(4, state)
    assert_trees_equal(restored, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and (in_progress / "partial").exists()
    missing = tmp_path / "not_yet_created"
    with checkpointing.CheckpointManager(missing, max_to_keep=1, read_only=True) as reader:
        assert reader.all_steps() == [] and reader.latest_step() is None
    assert not missing.exists()
    with pytest.raises(ValueError, match="cleanup_tmp"):
        checkpointing.CheckpointManager(tmp_path, max_to_keep=1, read_only=True, cleanup_tmp=True)
    # The run's one writer (the trainer) does remove what an interrupted save left; its next save waits for that.
    with checkpointing.CheckpointManager(tmp_path, max_to_keep=1, cleanup_tmp=True) as writer:
        writer.save(4, state)
    assert not in_progress.exists() and writer.all_steps() == [2, 4]  # 2 kept as the best


def test_url_directory_reaches_orbax_unchanged(monkeypatch):
    # --workdir=gs://bucket/... on a TPU VM: Orbax must get the URL, not ./gs:/bucket/... (no GCS here: a stand-in
    # records what the real manager would have been given).
    given = []

    class Recorder:
        def __init__(self, directory, **kwargs):
            given.append(directory)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", Recorder)
    for directory in ("gs://bucket/runs/unetpp/checkpoints", epath.Path("gs://bucket/runs/unetpp/checkpoints")):
        manager = checkpointing.CheckpointManager(directory, max_to_keep=1, read_only=True)
        assert str(manager.directory) == "gs://bucket/runs/unetpp/checkpoints"
    assert [str(d) for d in given] == ["gs://bucket/runs/unetpp/checkpoints"] * 2
    assert all(isinstance(d, epath.Path) for d in given)


def test_opening_read_only_logs_no_warning(tmp_path):
    # Evaluation and prediction open a run read-only by design; Orbax's warning about it must not reach the user,
    # including from the first manager of the process (the filter is installed before the manager is created).
    absl_logger = absl_logging.get_absl_logger()
    absl_logger.removeFilter(checkpointing._EXPECTED_WARNINGS_FILTER)  # as in a fresh process
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    absl_logger.addHandler(handler)
    try:
        with checkpointing.CheckpointManager(tmp_path, max_to_keep=1, read_only=True) as reader:
            assert reader.all_steps() == []
    finally:
        absl_logger.removeHandler(handler)
    assert not [r for r in records if "read only" in r], records


@pytest.mark.parametrize("num_devices", [1, 2])
def test_restore_on_a_different_device_count(tmp_path, num_devices):
    state = make_state(parallel.make_mesh(), seed=3)
    assert len(jax.devices()) == 8
    with checkpointing.CheckpointManager(tmp_path / "ckpt", max_to_keep=1) as mgr:
        mgr.save(7, state, meta={"devices": 8})
    np.savez(tmp_path / "expected.npz", *jax.tree.leaves(host(state)))
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from anemia_jax.runs import checkpoint_handlers, checkpointing
        from anemia_jax.utils import parallel
        from tests.test_checkpointing import make_state
        assert jax.device_count() == {num_devices}, jax.devices()
        mesh = parallel.make_mesh()
        with checkpointing.CheckpointManager({str(tmp_path / 'ckpt')!r}, max_to_keep=1) as mgr:
            restored, meta = mgr.restore(mgr.latest_step(), make_state(mesh, seed=4))
        expected = np.load({str(tmp_path / 'expected.npz')!r})
        leaves = jax.tree.leaves(restored)
        assert meta == {{"devices": 8}} and len(leaves) == len(expected.files)
        for i, leaf in enumerate(leaves):
            assert leaf.sharding == parallel.replicated(mesh) and len(leaf.sharding.device_set) == {num_devices}
            np.testing.assert_array_equal(np.asarray(leaf), expected[f"arr_{{i}}"])
        print("restored", len(leaves), "arrays on", jax.device_count(), "devices")
    """)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = _children.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True, budget_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on {num_devices} devices" in result.stdout
