"""TFDS builders of the project and the datasets they provide, each declared beside its builder.

Importing this package imports every builder module, which registers each builder with TFDS (so
``tfds.builder("eyes_defy_anemia", ...)`` works after ``import anemia_jax.data.datasets``) and each selectable dataset
in `DATASETS` (`anemia_jax.data.datasets.spec.DatasetSpec`: builder, stored resolutions, masks, split protocols,
schedule). Adding a dataset: a folder ``anemia_jax/data/datasets/<name>/`` with ``<name>_dataset_builder.py`` defining
``Builder`` and calling `register_dataset` next to it.

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
import pkgutil
from typing import Any

from anemia_jax.data.datasets.spec import DATASETS, DatasetSpec, register_dataset

# name -> the `Builder` class of `anemia_jax/data/datasets/<name>/<name>_dataset_builder.py` (TFDS's folder convention).
_BUILDERS: dict[str, type] = {}
for _package in pkgutil.iter_modules(__path__):
    if _package.ispkg:
        _module = importlib.import_module(f"{__name__}.{_package.name}.{_package.name}_dataset_builder")
        _BUILDERS[_module.Builder.name] = _module.Builder

BUILDER_NAMES = tuple(_BUILDERS)

__all__ = ["BUILDER_NAMES", "DATASETS", "DatasetSpec", "builder_class", "get_builder", "register_dataset"]


def builder_class(name: str) -> type:
    """The TFDS builder class registered under ``name``."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown dataset builder {name!r}; choose one of {', '.join(BUILDER_NAMES)}.")
    return _BUILDERS[name]


def get_builder(name: str, *, data_dir: str | None = None, config: str | None = None, **kwargs: Any):
    """Instantiates builder ``name`` (optionally a named builder ``config``) writing under ``data_dir``.

    Nothing is prepared: call ``download_and_prepare`` (or use `anemia_jax.data.loading.prepare_builder`, which
    also turns missing source files into a message saying what to pass).
    """
    cls = builder_class(name)
    if config is not None:
        kwargs["config"] = config
    return cls(data_dir=data_dir, file_format="array_record", **kwargs)
