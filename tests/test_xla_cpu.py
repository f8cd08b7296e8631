"""anemia_jax.utils.xla_cpu: the CPU flags are appended to XLA_FLAGS only where that is safe, and take effect."""

import os
import pathlib
import re
import sys

import _children
import jax
import jax.numpy as jnp
import pytest

from anemia_jax.utils import xla_cpu

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.fixture
def fresh(monkeypatch):
    """`apply` as if JAX had not started yet, on a tested jaxlib."""
    monkeypatch.setattr(xla_cpu, "_backends_initialised", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.10.2")


def test_appends_to_the_users_flags(fresh):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply(env) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert xla_cpu.apply(env) == []  # idempotent
    empty = {}
    assert xla_cpu.apply(empty) == [FLAG] and empty["XLA_FLAGS"] == FLAG


def test_respects_explicit_choices(fresh):
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    env = {"XLA_FLAGS": mine}
    assert xla_cpu.apply(env) == [] and env["XLA_FLAGS"] == mine
    off = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply(off) == [] and "XLA_FLAGS" not in off


def test_leaves_untested_jaxlib_and_started_backends_alone(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_initialised", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.11.2")
    env = {}
    assert xla_cpu.apply(env) == [] and env == {}
    monkeypatch.undo()
    jax.devices()  # the backends are up: a flag set now would not be read
    assert xla_cpu._backends_initialised()
    assert xla_cpu.apply({}) == []


@pytest.mark.skipif(not xla_cpu._jaxlib_version().startswith(xla_cpu.TESTED_JAXLIB),
                    reason="the flags are only set on tested jaxlib versions")
def test_in_effect_beside_conftest_flags():
    # tests/conftest.py set XLA_FLAGS before importing JAX, then applied ours as the commands do.
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=8" in flags and FLAG in flags
    assert jax.device_count() == 8

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y**2)

    def ynn_convolutions(compiler_options=None):
        args = (jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32)))
        text = jax.jit(jax.grad(loss, argnums=1)).lower(*args).compile(compiler_options).as_text()
        bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S | re.M))
        called = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", text)
        return sum("convolution(" in bodies.get(name, "") for name in called)

    assert ynn_convolutions() == 0
    # The check can fail: with YNNPACK convolutions asked for, the same program has them.
    types = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    assert ynn_convolutions({"xla_cpu_experimental_ynn_fusion_type": types}) > 0


def test_inference_options_only_on_the_cpu_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.10.2")
    assert xla_cpu.inference_options("cpu", {"XLA_FLAGS": FLAG}) == xla_cpu.INFERENCE_OPTIONS
    assert xla_cpu.inference_options("cpu", {}) == xla_cpu.INFERENCE_OPTIONS
    assert xla_cpu.inference_options("gpu", {"XLA_FLAGS": FLAG}) == {}
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    assert xla_cpu.inference_options("cpu", {"XLA_FLAGS": mine}) == {}
    assert xla_cpu.inference_options("cpu", {xla_cpu.OPT_OUT: "0", "XLA_FLAGS": FLAG}) == {}
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.11.2")
    assert xla_cpu.inference_options("cpu", {"XLA_FLAGS": FLAG}) == {}


def _convolutions_3x3(hlo_text: str) -> tuple[int, int]:
    """``(inside YNNPACK fusions, elsewhere)``: the 3x3 convolutions of a compiled program's text. (1x1 ones are
    dots, and YNNPACK may fuse a dot with the convolutions around it whatever the flag says.)"""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif line == "}":
            name = None
        elif name is not None:
            computations[name].append(line)
    ynn = set(re.findall(r"calls=%?([\w.\-]+),[^\n]*__ynn_fusion", hlo_text))
    inside = elsewhere = 0
    for name, lines in computations.items():
        n = sum(" convolution(" in line and "size=3x3" in line for line in lines)
        inside, elsewhere = (inside + n, elsewhere) if name in ynn else (inside, elsewhere + n)
    return inside, elsewhere


@pytest.mark.skipif(not xla_cpu._jaxlib_version().startswith(xla_cpu.TESTED_JAXLIB),
                    reason="the options are only given on tested jaxlib versions")
def test_forward_programs_get_ynn_convolutions_while_the_flag_holds_for_training():
    from anemia_jax.inference import probabilities
    from anemia_jax.models import get_model
    from anemia_jax.utils import parallel

    assert FLAG in os.environ["XLA_FLAGS"]
    model = get_model("unet", num_classes=1, features=16, depth=1, dtype="float32")
    # Only the compiled programs matter: variables from their shapes (compiling model.init would cost more).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    forward = probabilities.sharded(probabilities.probability_fn(model), mesh)
    with_options = _convolutions_3x3(forward.lower(variables, images).compile().as_text())
    # The same forward pass jitted without the options (as inside a train step): the process-wide flag holds.
    plain = jax.jit(probabilities.probability_fn(model))
    without = _convolutions_3x3(plain.lower(variables, images).compile().as_text())
    # (YNNPACK declines some of these tiny convolutions either way; at 256 px it takes them all.)
    assert sum(with_options) == sum(without) and with_options[0] > without[0]


def _fresh_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    result = _children.run([sys.executable, "-c", code], env=env, text=True, budget_s=600,
                           cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_importing_the_library_changes_no_environment():
    # Research code importing the losses, metrics and models: XLA_FLAGS stays as the user left it (unset here).
    out = _fresh_python("import os, anemia_jax, anemia_jax.losses, anemia_jax.metrics, anemia_jax.models\n"
                        "print(repr(os.environ.get('XLA_FLAGS')))")
    assert out == "None"


@pytest.mark.skipif(not xla_cpu._jaxlib_version().startswith(xla_cpu.TESTED_JAXLIB),
                    reason="the flags are only set on tested jaxlib versions")
def test_a_command_line_applies_the_flag_before_jax_starts():
    out = _fresh_python("import os\nfrom anemia_jax import cli\ncli.Command('python -m x', 'usage')\n"
                        "print(os.environ.get('XLA_FLAGS'))")
    assert out == FLAG
