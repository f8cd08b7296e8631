"""TFDS builders of the project, looked up by name.

Every builder writes `array_record` files that are read back with `tfds.data_source` (no TensorFlow), and every
example follows one contract so the input pipeline can treat the sets alike:

* ``image``: uint8 ``[H, W, 3]`` photo (EXIF orientation applied).
* one uint8 ``[H, W, 1]`` mask per region, values in {0, 1}, aligned pixel-for-pixel with ``image``
  (``palpebral``, ``forniceal``, ``forniceal_palpebral`` for the eye sets; ``mask`` for image/mask folders),
  each with a boolean ``has_<name>`` (a missing mask is stored all-zero with ``has_<name>=False``).
* metadata: ``patient_id`` and ``country`` (text), ``hgb`` (float32 g/dL, NaN if unknown), ``gender`` ('F', 'M'
  or ''), ``age`` (float32, NaN if unknown), ``anemic`` (int32: 1 anemic, 0 not, -1 unknown).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines the `Builder` class (imported lazily: importing one builder must not
# require the others' optional sources).
_BUILDER_MODULES = {
    "eyes_defy_anemia": "anemia_jax.datasets.eyes_defy_anemia.eyes_defy_anemia_dataset_builder",
    "image_mask_folder": "anemia_jax.datasets.image_mask_folder.image_mask_folder_dataset_builder",
    "conjunctiva_phantom": "anemia_jax.datasets.conjunctiva_phantom.conjunctiva_phantom_dataset_builder",
}

BUILDER_NAMES = tuple(_BUILDER_MODULES)


def builder_class(name: str) -> type:
    """The TFDS builder class registered under ``name``."""
    if name not in _BUILDER_MODULES:
        raise ValueError(f"Unknown dataset builder {name!r}; choose one of {', '.join(BUILDER_NAMES)}.")
    return importlib.import_module(_BUILDER_MODULES[name]).Builder


def get_builder(name: str, *, data_dir: str | None = None, config: str | None = None, **kwargs: Any):
    """Instantiates builder ``name`` (optionally a named builder ``config``) writing under ``data_dir``."""
    cls = builder_class(name)
    if config is not None:
        kwargs["config"] = config
    return cls(data_dir=data_dir, file_format="array_record", **kwargs)
