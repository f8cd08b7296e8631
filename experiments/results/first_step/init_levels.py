"""The initialisation program alone at an XLA level: `python experiments/results/first_step/init_levels.py unet 0` (README here)."""
import sys, time
T0 = time.perf_counter()
arch, opt = sys.argv[1], int(sys.argv[2])
import jax, jax.numpy as jnp
from anemia_jax.runs import config_lib, model_factory
cfg = config_lib.load_config_file(f"configs/{arch}.py:size=128,batch=8,dtype=float32")
model = model_factory.build_model(cfg)
k1, k2 = jax.random.split(jax.random.key(0))


def _init_variables(model, init_key, dropout_key, image_shape):
    # What steps._init_variables was when this was measured (f097e9d); anemia_jax.models.initialize since.
    return model.init({"params": init_key, "dropout": dropout_key}, jnp.zeros(image_shape, jnp.float32), train=False)


f = jax.jit(_init_variables, static_argnums=(0, 3), compiler_options={"xla_backend_optimization_level": opt} if opt >= 0 else None)
t = time.perf_counter(); lo = f.lower(model, k1, k2, (1, 32, 32, 3)); tl = time.perf_counter() - t
t = time.perf_counter(); c = lo.compile(); tc = time.perf_counter() - t
t = time.perf_counter(); v = jax.block_until_ready(c(k1, k2)); tr = time.perf_counter() - t
t = time.perf_counter(); v = jax.block_until_ready(c(k1, k2)); tr2 = time.perf_counter() - t
print(f"{arch} O{opt}: lower {tl:.2f} compile {tc:.2f} run {tr:.2f} run2 {tr2:.2f}")
