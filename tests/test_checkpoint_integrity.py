"""Never trust a damaged checkpoint, nor one of another model, on the shared tiny run (`_tiny_run`: checkpoints 2,
best, and 4, latest), copied before each test damages it.

Damage as a user or a failing disk would cause it: 1000 bytes overwritten in the largest file under ``state/`` (same
size), that file truncated, ``state/_METADATA`` or the whole ``state/`` deleted, and config.json edited to another
model. Each must fall back to the newest intact checkpoint with a warning naming the damaged one, or, when that
checkpoint was asked for by number or belongs to another model, stop with one paragraph and exit status 4.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import cli, evaluate
from anemia_jax.runs import checkpoint_integrity, checkpointing, restore


@pytest.fixture
def run_copy(workdir, tmp_path):  # noqa: F811 -- fixture
    return pathlib.Path(shutil.copytree(workdir, tmp_path / "run"))




def largest_state_file(run: pathlib.Path, step: int) -> pathlib.Path:
    files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def overwrite(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 1000] = bytes(255 - b for b in data[start:start + 1000])
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "overwritten": lambda run: overwrite(largest_state_file(run, 4)),
    "truncated": lambda run: truncate(largest_state_file(run, 4)),
    "metadata_deleted": lambda run: (run / "checkpoints/4/state/_METADATA").unlink(),
    "state_deleted": lambda run: shutil.rmtree(run / "checkpoints/4/state"),
}


def test_checkpoints_carry_a_manifest(run_copy):
    for step in (2, 4):
        assert (run_copy / "checkpoints" / str(step) / checkpoint_integrity.MANIFEST).is_file()
        assert checkpoint_integrity.verify(run_copy / "checkpoints" / str(step)).status == "intact"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact(run_copy, damage, warnings_log):
    DAMAGE[damage](run_copy)
    run = restore.load_run(run_copy, checkpoint="latest")
    assert run.step == 2 and "step 4 is damaged" in run.checkpoint_reason
    assert any("Checkpoint step 4" in w and "damaged" in w for w in warnings_log), warnings_log


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_damaged_checkpoint_asked_for_by_number_is_an_error(run_copy, damage, capfd):
    DAMAGE[damage](run_copy)
    with pytest.raises(checkpointing.DamagedCheckpointError, match="step 4 .* is damaged"):
        restore.load_run(run_copy, checkpoint=4)
    status = evaluate.main(["evaluate", f"--workdir={run_copy}", "--checkpoint=4", "--no_distances",
                            f"--out={run_copy / 'eval'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CHECKPOINT, err[-3000:]
    assert "Traceback" not in err and "Checkpoint step 4" in err and "damaged" in err
    assert not (run_copy / "eval").exists()


def test_legacy_checkpoints_without_manifests_still_load_unverified(run_copy, warnings_log):
    for step in (2, 4):  # written before manifests existed: none of them has one
        (run_copy / "checkpoints" / str(step) / checkpoint_integrity.MANIFEST).unlink()
    assert restore.load_run(run_copy, checkpoint="latest").step == 4
    assert any("no checksum manifest" in w for w in warnings_log), warnings_log


def test_a_deleted_manifest_among_manifested_checkpoints_is_damage(run_copy, warnings_log, capfd):
    # Deleting the manifest to hide altered weights: the older checkpoint's manifest shows one was written.
    (run_copy / "checkpoints/4" / checkpoint_integrity.MANIFEST).unlink()
    overwrite(largest_state_file(run_copy, 4))
    run = restore.load_run(run_copy, checkpoint="latest")
    assert run.step == 2 and "step 4 is damaged" in run.checkpoint_reason
    assert any("Checkpoint step 4" in w and "manifest is missing" in w for w in warnings_log), warnings_log
    status = evaluate.main(["evaluate", f"--workdir={run_copy}", "--checkpoint=4", "--no_distances",
                            f"--out={run_copy / 'eval'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CHECKPOINT and "Traceback" not in err and "manifest is missing" in err, err[-3000:]


def test_checkpoint_of_another_model_configuration(run_copy, capfd):
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["features"] = 8
    (run_copy / "config.json").write_text(json.dumps(config))
    status = evaluate.main(["evaluate", f"--workdir={run_copy}", "--checkpoint=latest", "--no_distances",
                            f"--out={run_copy / 'eval'}"])
    err = capfd.readouterr().err
    assert status == cli.EXIT_CHECKPOINT, err[-3000:]
    assert "Traceback" not in err and "written by a different model configuration" in err
    message = [line for line in err.splitlines() if line.startswith("evaluate:")]
    assert len(message) == 1 and len(message[0]) < 1500, err[-3000:]
    assert "partial_restore" not in err
