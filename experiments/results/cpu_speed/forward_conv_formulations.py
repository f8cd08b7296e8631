"""Forward 3x3 convolution on the CPU: XLA's convolution (Eigen, with the package's flag) against two formulations
by hand (im2col + one matmul; nine per-tap matmuls); jitted, float32, batch 8, same-round medians of 5 calls.

    python experiments/results/cpu_speed/forward_conv_formulations.py

Checks that the three agree, then prints one line per layer shape (results: forward_conv_formulations.txt).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import anemia_jax  # noqa: F401 -- applies the package's XLA CPU flag before the backend starts


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted(x):
    """The nine 3x3-neighbourhood shifts of ``x`` ('SAME' zero padding), tap order (i, j)."""
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def im2col(x, w):
    b, h, wd, c = x.shape
    cols = jnp.concatenate(_shifted(x), axis=-1)
    return (cols.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(b, h, wd, -1)


def taps(x, w):
    return sum(jnp.einsum("bhwc,cd->bhwd", s, w[k // 3, k % 3]) for k, s in enumerate(_shifted(x)))


def main() -> None:
    rng = np.random.default_rng(0)
    for size, channels in [(128, 32), (64, 64), (32, 128), (16, 256)]:
        x = jnp.asarray(rng.random((8, size, size, channels)), jnp.float32)
        w = jnp.asarray(rng.random((3, 3, channels, channels)), jnp.float32)
        fns = {"xla conv": jax.jit(conv), "im2col+dot": jax.jit(im2col), "9 tap dots": jax.jit(taps)}
        reference = fns["xla conv"](x, w)
        for fn in fns.values():
            np.testing.assert_allclose(fn(x, w), reference, rtol=2e-3, atol=1e-2)
        times = {name: [] for name in fns}
        for _ in range(5):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x, w))
                times[name].append(time.perf_counter() - start)
        print(f"8x{size}x{size}x{channels}->{channels}: "
              + ", ".join(f"{name} {1e3 * np.median(t):.1f} ms" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
