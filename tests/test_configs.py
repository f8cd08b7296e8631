"""Tests of configs/ and anemia_jax.runs.config_lib: every config loads and validates; errors name what is wrong.

No training here: configs are built, validated and checked against the registries they name (models, losses,
dataset builders and their builder configs), and the command line is run only up to flag parsing.
"""

import pathlib
import subprocess
import sys

import _children
import jax
import pytest

from anemia_jax import losses, models
from anemia_jax.data import datasets
from anemia_jax.runs import config_lib, model_factory
from anemia_jax.training import optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if "def get_config" in p.read_text())
ARGS = ["", "data=phantom", "data=kvasir", "data=eyes,size=512,fold=4", "data=phantom,size=128,loco=PhantomA",
        "batch=32,steps=100,dtype=float32,seed=3", "test", "data=phantom,test", "data=kvasir_seg,test,steps=3"]


def load(name: str, arg: str = ""):
    return config_lib.load_config_file(f"{ROOT / 'configs' / name}{':' + arg if arg else ''}")


def test_config_files_found():
    assert {p.stem for p in CONFIG_FILES} == {"unet", "unetpp", "attention_unet", "unet_resnet34", "unetpp_resnet34",
                                              "transunet", "segformer"}


@pytest.mark.parametrize("arg", ARGS)
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path, arg):
    config = config_lib.load_config_file(f"{path}:{arg}" if arg else str(path))
    config_lib.validate(config, num_devices=8)
    assert config.name == path.stem and config.arg == arg
    # What the trainer will build from it exists: the model (constructed, not run), the loss, the optimizer.
    model = model_factory.build_model(config)
    assert model.num_classes == len(config.targets) and isinstance(model, models.MODELS.get(config.model.name))
    losses.get_loss(config.loss.name, **{k: v for k, v in config.loss.items()
                                         if k not in ("name", "deep_supervision_weights")})
    optim.make_optimizer(config.optimizer, total_steps=100, warmup_steps=10)
    # The builder config it names exists.
    builder_configs = {c.name for c in datasets.builder_class(config.dataset.builder).BUILDER_CONFIGS}
    assert config.dataset.builder_config in builder_configs


def test_parametrisation_reaches_the_fields():
    c = load("unetpp.py", "data=phantom,size=128,fold=3,batch=32,steps=50,dtype=float32,seed=7")
    assert (c.dataset.name, c.dataset.builder, c.image_size, c.split.fold) == (
        "phantom", "conjunctiva_phantom", (128, 128), 3)
    assert (c.batch_size, c.num_train_steps, c.compute_dtype, c.seed) == (32, 50, "float32", 7)
    assert c.model.deep_supervision and len(c.loss.deep_supervision_weights) == c.model.depth
    loco = load("unet.py", "loco=Italy")
    assert (loco.split.protocol, loco.split.test_country) == ("loco", "Italy")
    kvasir = load("attention_unet.py", "data=kvasir")
    assert (kvasir.targets, kvasir.split.protocol, kvasir.dataset.test_split) == (("mask",), "holdout", "test")
    assert load("unet.py", "size=1024").dataset.builder_config == "long1024"
    assert load("unet.py", "data=phantom,size=512").dataset.builder_config == "res512"
    defaults = load("unetpp.py")
    assert defaults.dataset.name == "eyes_defy_anemia"
    assert defaults.targets == ("palpebral", "forniceal_palpebral")
    assert defaults.loss.name == "combo" and defaults.compute_dtype == "bfloat16"


def test_test_flag_is_tiny():
    c = load("unetpp.py", "data=phantom,test")
    assert c.image_size == (32, 32) and c.model.features <= 8 and c.num_train_steps <= 32
    assert c.dataset.builder_config == "res64" and c.batch_size == 8


def test_registries_match_the_libraries(tmp_path):
    assert {"unet", "unetpp", "attention_unet"} <= set(models.MODELS.names())
    assert set(losses.LOSSES.names()) == set(losses.loss_names())
    assert set(datasets.DATASETS.names()) == {"eyes_defy_anemia", "phantom", "kvasir_seg"}
    for name, spec in datasets.DATASETS.items():
        assert spec.builder in datasets.BUILDER_NAMES
        configs = {c.name for c in datasets.builder_class(spec.builder).BUILDER_CONFIGS}
        assert {c for _, c in spec.stored} <= configs, name
    assert datasets.DATASETS.get("kvasir") is datasets.DATASETS.get("kvasir_seg")
    # Importing anemia_jax.data.datasets registers every builder with TFDS, as TFDS users expect.
    import tensorflow_datasets as tfds

    for name, config in (("conjunctiva_phantom", "res64"), ("image_mask_folder", "kvasir_seg_256"),
                         ("eyes_defy_anemia", "long512")):
        builder = tfds.builder(name, config=config, data_dir=str(tmp_path))
        assert type(builder) is datasets.builder_class(name)


def test_parse_arg():
    args = config_lib.parse_arg("data=phantom, size=128,test", data="eyes", size=256, test=False, lr=0.1)
    assert dict(args) == {"data": "phantom", "size": 128, "test": True, "lr": 0.1}
    with pytest.raises(config_lib.ConfigError, match=r"'sise'.*Did you mean 'size'.*Valid arguments"):
        config_lib.parse_arg("sise=3", size=256)
    with pytest.raises(config_lib.ConfigError, match="not a valid int"):
        config_lib.parse_arg("size=big", size=256)
    with pytest.raises(config_lib.ConfigError, match="needs a value"):
        config_lib.parse_arg("size", size=256)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 12, r"batch_size=12 is not divisible by the 8 devices.*multiple of 8 \(e\.g\. 16\)"),
    ("model.name", "unetplus", r"model.name='unetplus' is unknown.*Valid: .*\bunet, unetpp\b"),
    ("loss.name", "dice_los", r"loss.name='dice_los' is unknown. Did you mean 'dice'"),
    ("dataset.name", "kvasr", r"Unknown dataset 'kvasr'. Did you mean 'kvasir'.*names: .*kvasir_seg"),
    ("dataset.name", "kvasir", r"dataset.name='kvasir' is an alias.*'kvasir_seg'"),
    ("targets", ("palpebral", "mask"), r"target 'mask' is not a mask of dataset 'eyes_defy_anemia'"),
    ("image_size", (100, 100), r"multiple of 16"),
    ("split.fold", 5, r"split.fold=5 must lie in \[0, 5\)"),
    ("split.protocol", "holdout", r"does not apply to 'eyes_defy_anemia'"),
    ("compute_dtype", "float16", "compute_dtype"),
    ("num_epochs", 0, "num_train_steps or num_epochs"),
])
def test_validate_names_the_problem(field, value, message):
    config = load("unetpp.py")
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


def test_validate_reports_every_problem_at_once():
    config = load("unet.py")
    config.batch_size = 12
    config.optimizer.learning_rate = -1.0
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    assert "batch_size=12" in str(error.value) and "learning_rate=-1.0" in str(error.value)


def test_unknown_keys_lists_close_keys():
    config = load("unetpp.py")
    [message] = config_lib.unknown_keys(config, ["optimizer.learning_rat"])
    assert "optimizer.learning_rate" in message
    [message] = config_lib.unknown_keys(config, ["batchsize"])
    assert "batch_size" in message
    [message] = config_lib.unknown_keys(config, ["split.qwxyzq"])
    assert "keys under 'split'" in message and "fold" in message
    assert config_lib.unknown_keys(config, ["model.features", "augment.hflip_prob"]) == []


def test_resolve_steps():
    c = load("unet.py", "data=phantom")
    assert config_lib.resolve_steps(c, "num_train", 10) == c.num_epochs * 10
    c.num_train_steps = 7
    assert config_lib.resolve_steps(c, "num_train", 10) == 7  # steps win over epochs
    c.warmup_epochs = 0
    assert config_lib.resolve_steps(c, "warmup", 10, required=False) == 0
    with pytest.raises(config_lib.ConfigError, match="warmup_steps or warmup_epochs"):
        config_lib.resolve_steps(c, "warmup", 10)


def test_default_workdir():
    assert config_lib.default_workdir("unetpp") == "runs/unetpp"
    expected = "runs/unetpp_data-phantom_size-128_test"
    assert config_lib.default_workdir("unetpp", "data=phantom,size=128,test") == expected


def test_schedule_warms_up_then_decays():
    c = load("unet.py")
    schedule = optim.make_schedule(c.optimizer, total_steps=100, warmup_steps=10)
    lr = [float(schedule(s)) for s in (0, 5, 10, 55, 100)]
    peak = c.optimizer.learning_rate
    assert lr[0] == 0.0 and lr[1] == pytest.approx(peak / 2) and lr[2] == pytest.approx(peak)
    assert lr[2] > lr[3] > lr[4] == pytest.approx(peak * c.optimizer.end_lr_ratio)
    mask = optim.decay_mask({"conv": {"kernel": jax.numpy.zeros((3, 3, 1, 2)), "bias": jax.numpy.zeros(2)}})
    assert mask == {"conv": {"kernel": True, "bias": False}}


def run_main(*args: str) -> subprocess.CompletedProcess:
    return _children.run([sys.executable, "-m", "anemia_jax.main", *args], cwd=ROOT, text=True, budget_s=300)


def test_command_line_rejects_mistyped_key_listing_close_keys():
    result = run_main("--config=configs/unetpp.py", "--config.optimizer.learning_rat=1")
    assert result.returncode == 2
    assert "no key 'optimizer.learning_rat'" in result.stderr and "optimizer.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_main("--config=configs/unetpp.py:dat=phantom")
    assert result.returncode == 2 and "Did you mean 'data'" in result.stderr and "Traceback" not in result.stderr
