"""Tests of anemia_jax.models: shapes, dtypes, parameter counts, UNet++ supervision and pruning."""

from __future__ import annotations

import itertools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compilations import count_compilations
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from anemia_jax.models import (
    MODELS,
    AttentionUNet,
    ConvTranspose2x2,
    ModelCapabilities,
    SegmentationModel,
    SegmentationOutput,
    UNet,
    UNetPlusPlus,
    capabilities_of,
    get_model,
    initialize,
)
from anemia_jax.models.layers import max_pool_2x2

TINY = dict(features=4, depth=2)
CLASSES = (UNet, UNetPlusPlus, AttentionUNet)


def _images(shape=(2, 16, 16, 3), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), dtype)


def _init(model, images, seed=0):
    """Variables of `model` for `images`, filled on the host with NumPy.

    `model.init` compiles the whole random initialiser (seconds per architecture on a loaded CPU),
    so tests take the variable shapes from `jax.eval_shape` and fill them here: He-scaled kernels,
    small random biases, BatchNorm scale 1, running mean 0 and variance 1. `test_real_init` covers
    the model's own initialiser once.
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name == "bias":
            value = rng.normal(0.0, 0.1, shape)
        elif name in ("scale", "var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(model, shape=(1, 32, 32, 3)):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return variables["params"]


# ----------------------------------------------------------------- parameter counts (no compute)


def _peer_counts() -> tuple[int, int]:
    """Parameters of the PyTorch peer (shared/tools/peer_bench.py), from its layer definitions:
    Conv2d(bias=False) 3x3 + BatchNorm2d (weight, bias) twice per block, ConvTranspose2d(2, 2)
    with bias, Conv2d 1x1 head with bias."""

    def block(cin, cout):
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    def up(cin, cout):
        return 4 * cin * cout + cout

    f = (64, 128, 256, 512, 1024)
    unet = sum(block(3 if i == 0 else f[i - 1], f[i]) for i in range(5))
    unet += sum(up(f[i + 1], f[i]) + block(2 * f[i], f[i]) for i in range(4)) + f[0] + 1
    f = (32, 64, 128, 256, 512)
    unetpp = sum(block(3 if i == 0 else f[i - 1], f[i]) for i in range(5)) + f[0] + 1
    unetpp += sum(up(f[i + 1], f[i]) + block(f[i] * (j + 1), f[i]) for j in range(1, 5) for i in range(5 - j))
    return unet, unetpp


def test_default_parameter_counts_match_docstrings_and_pytorch_peer():
    peer_unet, peer_unetpp = _peer_counts()
    assert (peer_unet, peer_unetpp) == (31_037_633, 9_045_825)  # peer prints 31.0M / 9.05M
    counts = {
        "unet": _count(_abstract_params(UNet(num_classes=1))),
        "unetpp": _count(_abstract_params(UNetPlusPlus(num_classes=1, deep_supervision=False))),
        "unetpp_ds": _count(_abstract_params(UNetPlusPlus(num_classes=1, deep_supervision=True))),
        "attention_unet": _count(_abstract_params(AttentionUNet(num_classes=1))),
    }
    assert counts == {"unet": peer_unet, "unetpp": peer_unetpp, "unetpp_ds": peer_unetpp + 3 * 33,
                      "attention_unet": 32_083_077}
    for cls, key in ((UNet, "unet"), (UNetPlusPlus, "unetpp"), (AttentionUNet, "attention_unet")):
        assert f"{counts[key]:,}" in cls.__doc__
    assert f"{counts['unetpp_ds']:,}" in UNetPlusPlus.__doc__


def test_default_widths_and_bias_free_convs_before_batchnorm():
    params = _abstract_params(UNetPlusPlus())
    assert [params[f"X_{i}_0"]["conv2"]["kernel"].shape[-1] for i in range(5)] == [32, 64, 128, 256, 512]
    assert "bias" not in params["X_0_0"]["conv1"]
    assert params["up_0_1"]["kernel"].shape == (2, 2, 64, 32)
    params = _abstract_params(UNet())
    assert [params[f"encoder_{i}"]["conv1"]["kernel"].shape[-1] for i in range(5)] == [64, 128, 256, 512, 1024]
    assert params["decoder_0"]["conv1"]["kernel"].shape == (3, 3, 128, 64)
    assert "bias" in _abstract_params(UNet(**TINY, norm="none"))["encoder_0"]["conv1"]


def test_parameter_scopes_are_the_checkpoint_format():
    # Checkpoints store parameters by scope name: the shared `SegmentationModel.encode` must keep each model's own.
    enc, dec = {"encoder_0", "encoder_1", "encoder_2"}, {"up_0", "up_1", "decoder_0", "decoder_1", "head"}
    assert set(_abstract_params(UNet(**TINY))) == enc | dec
    assert set(_abstract_params(AttentionUNet(**TINY))) == enc | dec | {"attention_0", "attention_1"}
    nodes = {"X_0_0", "X_1_0", "X_2_0", "X_0_1", "X_1_1", "X_0_2", "up_0_1", "up_1_1", "up_0_2"}
    assert set(_abstract_params(UNetPlusPlus(**TINY))) == nodes | {"head_2"}
    pruned = jax.eval_shape(lambda: UNetPlusPlus(**TINY, deep_supervision=True).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False, prune_level=1))["params"]
    assert set(pruned) == {"X_0_0", "X_1_0", "X_0_1", "up_0_1", "head_1"}  # L^1: encoder levels 0..1 only


def test_real_init():
    # An rbg key: threefry's initialiser graph takes far longer to compile on CPU; the key's
    # implementation does not change what init does with it.
    model = UNetPlusPlus(deep_supervision=True, features=4, depth=1)
    init = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))
    variables = init(_images())
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert all(np.all(v == (k == "var")) for k, v in
               [(p[-1].key, v) for p, v in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])])
    kernel = variables["params"]["X_0_1"]["conv1"]["kernel"]  # fan-in 3*3*8, He-normal init
    assert abs(float(jnp.std(kernel)) / np.sqrt(2.0 / 72) - 1) < 0.2
    up = variables["params"]["up_0_1"]  # fan-in C_in = 8: one tap per output pixel
    assert abs(float(jnp.std(up["kernel"])) / np.sqrt(1.0 / 8) - 1) < 0.25 and not np.any(up["bias"])
    assert set(variables["params"]) == {"X_0_0", "X_1_0", "X_0_1", "up_0_1", "head_1"}


def test_initialize_is_model_init_compiled_once():
    model = UNet(features=4, depth=1)
    # rbg keys, as in test_real_init: the reference below compiles at the default level, where threefry's
    # initialisers alone take seconds (which is why `initialize` exists); the level does not depend on the key.
    rngs = {"params": jax.random.key(3, impl="rbg"), "dropout": jax.random.key(4, impl="rbg")}
    images, other = _images(), _images(seed=1)  # another batch of the same shape: no new program
    results = []
    compiles = count_compilations(lambda: results.extend([initialize(model, rngs, images),
                                                          initialize(model, rngs, other)]))
    variables, again = results
    assert compiles == 1
    want = jax.jit(model.init, static_argnames="train")(rngs, images, train=False)  # at the default XLA level
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    # XLA level 0 on the CPU: the same numbers to float rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), variables, want)
    jax.tree.map(np.testing.assert_array_equal, again, variables)


# ------------------------------------------------------------------------------------- layers


def test_conv_transpose_2x2_equals_flax_conv_transpose():
    x = _images((2, 3, 5, 6), seed=7) - 0.5
    ours = ConvTranspose2x2(4)
    rng = np.random.default_rng(9)  # kernel taps all distinct: a flipped or permuted kernel fails
    variables = {"params": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 6, 4)), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    abstract = jax.eval_shape(ours.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, variables)
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID").apply(variables, x)
    out = ours.apply(variables, x)
    assert out.shape == (2, 6, 10, 4)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    out16 = ConvTranspose2x2(4, dtype=jnp.bfloat16).apply(variables, x)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), reference, rtol=0.03, atol=0.03)


def test_max_pool_2x2_equals_flax_max_pool():
    x = _images((2, 6, 4, 3), seed=8)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


# ---------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_shapes_for_every_norm_and_upsample(cls):
    # Shapes are static: trace every combination abstractly; the numerics of the non-default
    # layers run in test_multiclass_output_with_other_layers.
    images = jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32)
    for norm, upsample in itertools.product(("batch", "group", "none"), ("transpose", "resize")):
        model = cls(num_classes=1, norm=norm, upsample=upsample, **TINY)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
        assert ("batch_stats" in variables) == (norm == "batch")
        up = next(v for k, v in variables["params"].items() if k.startswith("up_"))
        assert up["kernel"].shape[:2] == ((2, 2) if upsample == "transpose" else (3, 3))
        out, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
        assert isinstance(out, SegmentationOutput) and len(out.heads) == 1
        assert out.logits.shape == (2, 32, 16, 1) and out.logits.dtype == jnp.float32, (norm, upsample)
        assert jax.tree.structure(state) == jax.tree.structure({k: variables[k] for k in state})


@pytest.mark.parametrize("cls, norm, upsample", [(UNet, "group", "resize"), (UNetPlusPlus, "none", "resize"),
                                                (AttentionUNet, "group", "transpose")])
def test_multiclass_output_with_other_layers(cls, norm, upsample):
    model = cls(num_classes=3, norm=norm, upsample=upsample, **TINY)
    images = _images()
    out = model.apply(_init(model, images), images, train=False).logits
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and float(jnp.std(out)) > 0


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bfloat16_computation_with_float32_params(cls):
    model = cls(num_classes=2, dtype=jnp.bfloat16, **TINY)
    images = _images((2, 16, 16, 3))
    variables = _init(model, images)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0].logits  # noqa: E731
    jaxpr = jax.make_jaxpr(fn)(variables, images).jaxpr
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    concats = [e for e in jaxpr.eqns if e.primitive.name == "concatenate"]
    assert convs and concats
    assert all(v.aval.dtype == jnp.bfloat16 for e in convs + concats for v in e.invars + e.outvars)
    out = jax.eval_shape(fn, variables, images)
    assert out.dtype == jnp.float32 and out.shape == (2, 16, 16, 2)
    if cls is not AttentionUNet:  # the numerics below cover every layer kind; compile once only
        return
    out = jax.jit(fn)(variables, images)
    f32 = model.clone(dtype=jnp.float32)
    reference = jax.jit(lambda v, x: f32.apply(v, x, train=True, mutable=["batch_stats"])[0].logits)(variables,
                                                                                                      images)
    # bfloat16 keeps ~3 significant digits: compare the error to the spread of the logits.
    assert float(jnp.sqrt(jnp.mean((out - reference) ** 2)) / jnp.std(reference)) < 0.05


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_input_validation_messages(cls):
    model = cls(depth=3, features=2)
    with pytest.raises(ValueError, match=re.escape("divisible by 8") + ".*" + re.escape("(2, 36, 32, 3)")):
        model.init(jax.random.key(0), jnp.zeros((2, 36, 32, 3)), train=False)
    with pytest.raises(ValueError, match=re.escape("(32, 32, 3)")):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), train=False)
    with pytest.raises(TypeError, match="uint8"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(norm="layer"), "norm must be one of"), (dict(upsample="pixelshuffle"), "upsample must be one of"),
     (dict(depth=0), "depth must be a positive int"), (dict(dropout_rate=1.0), "dropout_rate"),
     (dict(num_classes=0), "num_classes")],
)
def test_bad_fields_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


# -------------------------------------------------------------------- train mode: BN and dropout


def test_batchnorm_statistics_update_only_in_train_mode():
    model = UNet(**TINY)
    images = _images(seed=3) * 4.0 + 1.0
    variables = _init(model, images)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    before = variables["batch_stats"]["encoder_0"]["norm1"]
    after = updates["batch_stats"]["encoder_0"]["norm1"]
    # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic, old mean 0 and var 1.
    conv = nn.Conv(4, (3, 3), use_bias=False).apply(
        {"params": variables["params"]["encoder_0"]["conv1"]}, images)
    np.testing.assert_allclose(after["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["var"], 0.9 + 0.1 * conv.var((0, 1, 2)), rtol=1e-4)
    assert not np.allclose(before["mean"], after["mean"])
    # Evaluation uses the running statistics: an image's logits do not depend on its batch.
    out1 = model.apply(variables, images, train=False).logits
    out2 = model.apply(variables, images.at[1:].set(0.0), train=False).logits
    np.testing.assert_allclose(out1[:1], out2[:1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out1[1:], out2[1:])


def test_batchnorm_statistics_sync_over_data_axis_under_shard_map():
    model = UNet(bn_axis_name="data", **TINY)
    images = _images((4, 16, 16, 3), seed=5)
    variables = _init(model, images)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))

    def per_shard(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    sharded = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data")),
                                    out_specs=(P("data"), P())))
    out, updates = sharded(variables, images)
    ref_out, ref_updates = UNet(**TINY).apply(variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out.logits, ref_out.logits, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), updates, ref_updates)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dropout_only_in_train_mode(cls):
    model = cls(dropout_rate=0.5, **TINY)
    images = _images()
    variables = _init(model, images)
    eval1 = model.apply(variables, images, train=False).logits  # no 'dropout' rng needed
    np.testing.assert_array_equal(eval1, model.apply(variables, images, train=False).logits)

    def train(seed):
        return model.apply(variables, images, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(seed, impl="rbg")})[0].logits

    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        model.apply(variables, images, train=True, mutable=["batch_stats"])
    # Without dropout the train-mode output is deterministic and needs no rng.
    plain = cls(**TINY)
    plain.apply(_init(plain, images), images, train=True, mutable=["batch_stats"])


def test_models_are_differentiable():
    # AttentionUNet holds every layer kind of the three models (UNet++ only rewires them).
    images = _images((2, 8, 8, 3))
    model = AttentionUNet(features=2, depth=1)
    variables = _init(model, images)

    @jax.jit
    def grad(params):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.mean(out.logits**2)
        return jax.grad(loss)(params)

    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grad(variables["params"]))]
    assert all(np.isfinite(norms)) and all(n > 0 for n in norms)


# ------------------------------------------------------------------------------ UNet++ specifics


def test_deep_supervision_returns_every_head_shallowest_first():
    model = UNetPlusPlus(num_classes=2, deep_supervision=True, features=4, depth=3)
    images = _images()
    variables = _init(model, images)
    assert {f"head_{j}" for j in (1, 2, 3)} <= set(variables["params"])
    for train in (True, False):
        out, _ = model.apply(variables, images, train=train, mutable=["batch_stats"])
        assert isinstance(out.heads, tuple) and len(out.heads) == 3 and out.logits is out.heads[-1]
        assert all(o.shape == (2, 16, 16, 2) and o.dtype == jnp.float32 for o in out.heads)
    outs = model.apply(variables, images, train=False).heads
    assert len({float(jnp.abs(o).sum()) for o in outs}) == 3  # distinct heads, not one repeated
    for k in (1, 2, 3):
        pruned = model.apply(variables, images, train=False, prune_level=k)
        assert len(pruned.heads) == 1
        np.testing.assert_allclose(pruned.logits, outs[k - 1], rtol=1e-5, atol=1e-5)
    # Variables of the single-output model are the deep-supervised ones minus the extra heads.
    single = UNetPlusPlus(num_classes=2, features=4, depth=3)
    np.testing.assert_allclose(single.apply(variables, images, train=False).logits, outs[-1], rtol=1e-5, atol=1e-5)
    assert set(_init(single, images)["params"]) == set(variables["params"]) - {"head_1", "head_2"}


def test_pruned_inference_is_cheaper():
    # Costs come from the lowered program (no compilation, no compute); that every pruned output
    # equals the matching full-network output is checked in test_deep_supervision_....
    model = UNetPlusPlus(deep_supervision=True, features=2, depth=4)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    convs, flops = [], []
    for k in (4, 3, 2, 1):
        lowered = jax.jit(lambda v, x, k=k: model.apply(v, x, train=False, prune_level=k).logits).lower(variables,
                                                                                                         images)
        assert lowered.out_info.shape == (1, 32, 32, 1)
        convs.append(lowered.as_text().count("stablehlo.convolution"))
        cost = lowered.cost_analysis()
        flops.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
    # L^k: encoder blocks 0..k and k(k+1)/2 nested blocks (2 convs each), their ups, one head.
    assert convs == [2 * (k + 1) + 3 * k * (k + 1) // 2 + 1 for k in (4, 3, 2, 1)]
    assert flops[0] > flops[1] > flops[2] > flops[3] > 0


def test_prune_level_errors():
    ds = UNetPlusPlus(deep_supervision=True, **TINY)
    images = _images()
    variables = _init(ds, images)
    with pytest.raises(ValueError, match="train=False"):
        ds.apply(variables, images, train=True, prune_level=1, mutable=["batch_stats"])
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match=r"prune_level must be an int in 1\.\.2"):
            ds.apply(variables, images, train=False, prune_level=bad)
    single = UNetPlusPlus(**TINY)
    with pytest.raises(ValueError, match="deep_supervision=True"):
        single.apply(variables, images, train=False, prune_level=1)
    np.testing.assert_allclose(single.apply(variables, images, train=False, prune_level=2).logits,
                               single.apply(variables, images, train=False).logits, rtol=1e-6)


# ---------------------------------------------------------------------------- Attention U-Net


def test_attention_coefficients_are_sown_and_in_unit_interval():
    model = AttentionUNet(**TINY)
    images = _images()
    out, state = model.apply(_init(model, images), images, train=False, mutable=["intermediates"])
    alphas = state["intermediates"]
    assert set(alphas) == {"attention_0", "attention_1"}
    a0 = alphas["attention_0"]["alpha"][0]
    assert a0.shape == (2, 8, 8, 1)  # on the gating signal's (coarser) grid
    assert alphas["attention_1"]["alpha"][0].shape == (2, 4, 4, 1)
    assert float(a0.min()) > 0 and float(a0.max()) < 1


# ----------------------------------------------------------------------------------- registry


def test_registry_names_aliases_and_errors():
    assert type(get_model("unet")) is UNet
    for alias in ("unetpp", "unet++", "nested_unet", "UNetPP"):
        assert type(get_model(alias)) is UNetPlusPlus
    assert type(get_model("attention_unet")) is AttentionUNet
    assert all(issubclass(c, SegmentationModel) for _, c in MODELS.items() if c.__module__.startswith(
        ("anemia_jax.models.unet", "anemia_jax.models.attention")))
    model = get_model("unetpp", num_classes=3, deep_supervision=True, dtype="bfloat16", features=8)
    assert (model.num_classes, model.deep_supervision, model.dtype, model.features) == (3, True, jnp.bfloat16, 8)
    with pytest.raises(ValueError, match=r"Unknown model 'unte'.*Did you mean 'unet'.*names: attention_unet, segformer, "
                       r"transunet, transunet_vit, unet, unetpp"):
        get_model("unte")
    with pytest.raises(TypeError, match=r"\['base_width'\].*num_classes.*features.*depth"):
        get_model("unet", base_width=32)
    with pytest.raises(TypeError, match="deep_supervision"):
        get_model("unet", deep_supervision=True)  # a UNet++-only field
    with pytest.raises(ValueError, match="norm must be one of"):
        get_model("attention_unet", norm="layer")


@pytest.mark.parametrize("name, kwargs, pretrained, prune_levels, deep", [
    ("unet", {}, None, (), False),
    ("unet", {"encoder": "resnet34"}, "timm_resnet", (), False),
    ("unet", {"encoder": "resnet_tiny"}, None, (), False),  # a test encoder: no published weights
    ("attention_unet", {}, None, (), False),
    ("unetpp", {"depth": 3}, None, (3,), False),  # only the full network has a trained head
    ("unetpp", {"depth": 3, "deep_supervision": True}, None, (1, 2, 3), True),
    ("unetpp", {"encoder": "resnet50"}, "timm_resnet", (), False),
    ("segformer", {}, "hf_mit", (), False),
    ("transunet", {}, "vit_npz", (), False),
    ("transunet_vit", {}, "vit_npz", (), False),
])
def test_capabilities_are_declared_beside_the_model(name, kwargs, pretrained, prune_levels, deep):
    caps = capabilities_of(get_model(name, **kwargs))
    assert (caps.pretrained, caps.prune_levels, caps.deep_supervision) == (pretrained, prune_levels, deep)


def test_a_new_model_declares_its_own_capabilities():
    # What the rest of the package reads: a model that declares nothing supports nothing beyond a call.
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, images, *, train):
            return SegmentationOutput.single(nn.Conv(1, (1, 1))(images))

    class Prunable(Plain):
        capabilities = ModelCapabilities(prune_levels=(1, 2))

    assert capabilities_of(Plain()) == ModelCapabilities()
    assert capabilities_of(Prunable()).prune_levels == (1, 2)
