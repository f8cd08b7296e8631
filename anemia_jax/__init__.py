"""anemia_jax: conjunctiva segmentation in JAX/Flax for non-invasive anemia screening.

Public, stable entry points for research code:

* `anemia_jax.models`   -- `UNet`, `UNetPlusPlus`, `AttentionUNet`, `get_model`.
* `anemia_jax.losses`   -- pure, jittable segmentation losses returning per-example values.
* `anemia_jax.metrics`  -- on-device confusion-count metrics and host-side surface distances.

Importing the package changes nothing in the process (no environment variables, no JAX settings). The commands
(``python -m anemia_jax.main`` ...) apply the package's XLA CPU flag before JAX starts; library users who want the
same CPU speed call ``anemia_jax.utils.xla_cpu.apply()`` before their first JAX computation (see ARCHITECTURE.md).
"""

__version__ = "0.1.0"
