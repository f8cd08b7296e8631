"""Losses switched and tuned from the command line (`anemia_jax.runs.loss_config`): every registered binary loss is
built by the trainer from the parsed command line with its own hyper-parameters and gives a finite gradient, a loss
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
def test_every_binary_loss_is_switched_and_tuned_from_the_command_line(name):
    # The command line's loss block is what the trainer builds its loss from (`experiment.build_loss`): the chosen
    # loss with exactly its own hyper-parameters, the tuned ones at their new values, and a finite loss and gradient.
    # (Training end to end from the command line with a switched, tuned loss: test_a_loss_of_ones_own_from_a_config_file.)
    import jax
    import jax.numpy as jnp

    from anemia_jax import models
    from anemia_jax.training import experiment

    hyper = losses.loss_hyperparameters(name)
    tuned = {k: v * 0.9 for k, v in hyper.items() if isinstance(v, float) and not isinstance(v, bool)}
    config = _parsed_config([f"--config.loss.name={name}", *(f"--config.loss.{k}={v}" for k, v in tuned.items())])
    config_lib.validate(config)
    assert config.loss.to_dict() == {"name": name, **hyper, **tuned}
    loss_fn = experiment.build_loss(config)
    logits = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
    labels = (jax.random.uniform(jax.random.key(1), (2, 8, 8, 2)) > 0.6).astype(jnp.float32)
    weights = jnp.ones((2, 8, 8, 2))

    def total(x):
        return loss_fn(models.SegmentationOutput(heads=(x,)), labels, weights).sum()

    value, grad = jax.value_and_grad(total)(logits)
    assert jnp.isfinite(value) and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
    if tuned:  # the tuned values reach the loss: the defaults give another value
        default = experiment.build_loss(_parsed_config([f"--config.loss.name={name}"]))
        other = default(models.SegmentationOutput(heads=(logits,)), labels, weights).sum()
        assert not jnp.allclose(value, other)


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
