"""Losses switched and tuned from the command line (`anemia_jax.runs.loss_config`): every registered binary loss
trains two steps with the trainer's step built from the parsed command line, its hyper-parameters are its own, a loss
of one's own trains end to end, and a wrong one is an exit-2 message before any data is read.

The research workflow this guards: ``--config.loss.name=NAME --config.loss.<hyper>=VALUE`` on any model config, and a
loss of one's own registered in one's own module and named from a config file.
"""

import json
import pathlib
import sys
import textwrap

import _children
import pytest

from anemia_jax import cli, losses, main
from anemia_jax.runs import config_lib, loss_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# softmax_cross_entropy treats the channels as exclusive classes; the configs' targets are independent masks.
BINARY = [name for name in losses.LOSSES.names() if name != "softmax_cross_entropy"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared tiny phantom for every run of this module."""
    return tmp_path_factory.mktemp("loss_switching_tfds")


def _train(args, data_dir, workdir) -> int:
    return main.main(["main", "--config=configs/unet.py:data=phantom,test,steps=2", f"--workdir={workdir}",
                      f"--config.dataset.data_dir={data_dir}", "--config.compilation_cache_dir=",
                      "--config.eval_every_steps=2", "--config.max_panels=0", "--config.augment.enabled=False", *args])


def _parsed_config(args):
    """The locked config the trainer's command line makes of ``args`` (`main._command`), nothing run."""
    cmd = main._command()
    assert cmd.parse(["main", "--config=configs/unet.py:data=phantom,test", *args]) == []
    return cmd.flags.config


@pytest.mark.parametrize("name", BINARY)
def test_every_binary_loss_trains_two_steps_from_the_command_line(name):
    # The trainer's own pieces, built from the parsed command line: the loss block (the chosen loss with exactly its
    # own hyper-parameters, the tuned ones at their new values) -> `experiment.build_loss` -> the data-parallel train
    # step on the 8 test devices, two steps of a narrow U-Net on a synthetic batch: finite losses, parameters moved.
    # (The data and the loop around them are the same for every loss: a switched, tuned loss trains end to end from
    # the command line in test_a_loss_of_ones_own_from_a_config_file, in a process of its own.)
    import jax
    import numpy as np
    from _step_equivalence import make_batch

    from anemia_jax.runs import model_factory
    from anemia_jax.training import experiment, steps
    from anemia_jax.utils import parallel

    hyper = losses.loss_hyperparameters(name)
    tuned = {k: v * 0.9 for k, v in hyper.items() if isinstance(v, float) and not isinstance(v, bool)}
    config = _parsed_config([f"--config.loss.name={name}", *(f"--config.loss.{k}={v}" for k, v in tuned.items()),
                             "--config.model.features=4"])
    config_lib.validate(config)
    assert config.loss.to_dict() == {"name": name, **hyper, **tuned}
    mesh = parallel.make_mesh()
    model = model_factory.build_model(config)
    tx, _ = experiment.build_optimizer(config, total_steps=2, warmup_steps=0)
    state = experiment.init_train_state(config, model, tx, mesh)
    before = parallel.fetch(state.params)
    step = steps.make_train_step(model, tx, experiment.build_loss(config), mesh)
    batch = parallel.host_local_to_global(make_batch(32), mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
        assert np.isfinite(float(parallel.fetch(metrics)["loss"])) and bool(parallel.fetch(metrics)["finite"])
    assert int(parallel.fetch(state.step)) == 2
    after = parallel.fetch(state.params)
    assert any(np.abs(x - y).max() > 0 for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("args, expected", [
    (["--config.loss.name=dice", "--config.loss.alpha=0.3"], "loss 'dice' has no hyper-parameter 'alpha'"),
    (["--config.loss.gamma=2"], "loss 'combo' has no hyper-parameter 'gamma'"),
    (["--config.loss.name=dicee"], "loss.name='dicee' is unknown. Did you mean 'dice'"),
    (["--config.loss.name=tversky", "--config.loss.alpha=heavy"], "is not a valid float"),
])
def test_a_wrong_loss_or_hyper_parameter_is_exit_2_before_any_data(args, expected, tmp_path, capfd):
    data_dir = tmp_path / "never_prepared"
    assert _train(args, data_dir, tmp_path / "run") == cli.EXIT_CONFIG
    err = capfd.readouterr().err
    assert expected in err and "Traceback" not in err, err[-2000:]
    assert not data_dir.exists() and not (tmp_path / "run").exists()  # stopped before data and outputs


def test_the_message_lists_what_the_loss_takes(capfd, tmp_path):
    _train(["--config.loss.name=focal_tversky", "--config.loss.smoth=1"], tmp_path / "d", tmp_path / "r")
    err = capfd.readouterr().err
    assert "Did you mean 'smooth'" in err
    for hyper in ("alpha (default 0.3)", "beta (default 0.7)", "gamma (default 0.75)", "smooth (default 1.0)"):
        assert hyper in err


def test_switching_keeps_the_deep_supervision_weights():
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=phantom,test")
    config.lock()
    loss_config.apply_overrides(config, {"name": "focal_tversky", "gamma": "1.5"})
    assert config.loss.to_dict() == {"name": "focal_tversky", "alpha": 0.3, "beta": 0.7, "gamma": 1.5,
                                     "smooth": 1.0, "deep_supervision_weights": (0.5, 0.5)}
    assert config.is_locked


def test_validation_rejects_a_loss_block_with_another_loss_s_hyper_parameters():
    config = config_lib.load_config_file(f"{ROOT}/configs/unet.py:data=phantom,test")
    config.loss.name = "dice"  # a config file (or a recorded config.json) naming a loss but keeping combo's fields
    with pytest.raises(config_lib.ConfigError, match="loss 'dice' has no hyper-parameter 'ce_weight'"):
        config_lib.validate(config)


def test_a_loss_of_ones_own_from_a_config_file(data_dir, tmp_path):
    """A researcher's loss, registered in their own module and imported by their config file, trains and tunes from
    the command line without any change to the package (the recipe of `anemia_jax.runs.loss_config`)."""
    (tmp_path / "my_research").mkdir()
    (tmp_path / "my_research" / "__init__.py").write_text("")
    (tmp_path / "my_research" / "my_losses.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp
        from anemia_jax import losses

        @losses.register_loss("margin_dice")
        def margin_dice(logits, labels, *, weights=None, margin=0.1):
            return losses.dice_loss(logits - margin, labels, weights=weights)
        """))
    config_file = tmp_path / "my_config.py"
    config_file.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import my_research.my_losses  # registers 'margin_dice'
        sys.path.insert(0, {str(ROOT)!r})
        from configs import unet
        from anemia_jax.runs import loss_config

        def get_config(arg=None):
            config = unet.get_config(arg)
            config.loss = loss_config.loss_config("margin_dice")
            return config
        """))
    workdir = tmp_path / "run"
    # In a process of its own, as a researcher runs it (and so that 'margin_dice' stays out of this one's registry).
    result = _children.run(
        [sys.executable, "-m", "anemia_jax.main", f"--config={config_file}:data=phantom,test,steps=2",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", "--config.compilation_cache_dir=",
         "--config.eval_every_steps=2", "--config.max_panels=0", "--config.augment.enabled=False",
         "--config.loss.margin=0.25"], cwd=tmp_path, text=True, budget_s=900)
    assert result.returncode == cli.EXIT_OK, result.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["loss"] == {"name": "margin_dice", "margin": 0.25}
