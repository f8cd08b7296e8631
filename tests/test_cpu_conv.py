"""The CPU formulation of the 3x3 convolution (models.layers.conv3x3_cpu) computes what autodiff computes.

Same parameters, same outputs and the same gradients to float tolerance, also inside shard_map with the kernel
replicated and the images split over devices (the trainer's setting).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from anemia_jax.models import layers


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("c_in,c_out", [(3, 8), (8, 8), (24, 8), (8, 16)])
def test_values_and_gradients_equal_autodiff(c_in, c_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 10, c_in)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 12, 10, c_out)), jnp.float32)
    y_ref, vjp_ref = jax.vjp(_conv, x, k)
    y, vjp = jax.vjp(layers.conv3x3_cpu, x, k)
    _close(y, y_ref)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        _close(got, want)


def test_kernel_gradient_under_shard_map_is_summed_over_devices():
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.float32)

    def conv_cpu(x, k):  # as nn.Conv calls it, kernel cast to varying inside
        dimension_numbers = jax.lax.conv_dimension_numbers(x.shape, k.shape, layers._NHWC)
        return layers._conv3x3_for_flax(x, k, (1, 1), "SAME", (1, 1), (1, 1), dimension_numbers)

    def grads(conv):
        def per_device(k, x):
            return jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k))))(k)

        f = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=True)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        return jax.jit(f)(put(k, P()), put(x, P("data")))

    want = jax.grad(lambda k: jnp.sum(jnp.tanh(_conv(x, k))))(k)
    _close(grads(_conv), want)
    _close(grads(conv_cpu), want)


def test_conv_block_parameters_and_gradients_unchanged(monkeypatch):
    block = layers.ConvBlock(8, norm="batch")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 12)), jnp.float32)
    assert jax.default_backend() == "cpu" and layers.conv3x3_impl() is not None

    @jax.jit
    def run(x):
        variables = block.init(jax.random.key(0), x, train=False)

        def loss(params):
            y, _ = block.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y**2)

        return variables, jax.grad(loss)(variables["params"])

    variables_cpu, grads_cpu = run(x)
    monkeypatch.setattr(layers, "conv3x3_impl", lambda: None)  # the GPU/TPU path: plain lax convolutions
    run = jax.jit(run.__wrapped__)  # traced afresh
    variables_plain, grads_plain = run(x)
    assert jax.tree.structure(variables_cpu) == jax.tree.structure(variables_plain)
    jax.tree.map(_close, variables_cpu, variables_plain)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), grads_cpu, grads_plain)


def test_only_on_cpu_and_only_the_covered_case(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.conv3x3_impl() is None
    x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    with pytest.raises(ValueError, match="3x3, stride-1"):
        layers._conv3x3_for_flax(x, k, (2, 2), "SAME", None, None,
                                 jax.lax.conv_dimension_numbers(x.shape, k.shape, layers._NHWC))
