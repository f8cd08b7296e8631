"""anemia_jax: conjunctiva segmentation in JAX/Flax for non-invasive anemia screening.

Public, stable entry points for research code:

* `anemia_jax.models`   -- `UNet`, `UNetPlusPlus`, `AttentionUNet`, `get_model`.
* `anemia_jax.losses`   -- pure, jittable segmentation losses returning per-example values.
* `anemia_jax.metrics`  -- on-device confusion-count metrics and host-side surface distances.
"""

__version__ = "0.1.0"

# Before any submodule imports JAX: XLA reads its flags when the backends start (see xla_cpu.py).
from anemia_jax.utils import xla_cpu as _xla_cpu  # noqa: E402

_xla_cpu.applied[:] = _xla_cpu.apply()
