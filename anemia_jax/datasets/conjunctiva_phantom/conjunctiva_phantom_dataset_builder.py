"""TFDS builder of the conjunctiva phantom: procedurally generated everted-eyelid photos, no download.

Features follow the project's dataset contract (see `anemia_jax.datasets`): a JPEG ``image``, the three exact
PNG masks ``palpebral``, ``forniceal``, ``forniceal_palpebral`` with ``has_*`` flags (always True here), and
``patient_id`` ('PhantomA/17'), ``country`` (the site), ``hgb``, ``gender``, ``age``, ``anemic``.

    builder = anemia_jax.datasets.get_builder('conjunctiva_phantom', config='res256', data_dir=...)
    builder.download_and_prepare()
    source = builder.as_data_source('train')

Other sizes or seeds: pass ``config=PhantomConfig(name='res256_n1000', long_side=256, num_examples=1000)``.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from anemia_jax.datasets import features as features_lib
from anemia_jax.datasets.conjunctiva_phantom import phantom


@dataclasses.dataclass(eq=False, kw_only=True)
class PhantomConfig(tfds.core.BuilderConfig):
    """Which phantom set to write.

    Attributes:
      long_side: image height in pixels (images are portrait, width = 0.75 * height).
      num_examples: number of examples (patients) in the single 'train' split.
      seed: phantom set seed; example ``i`` depends only on ``(seed, i)``, so a larger ``num_examples``
        extends a set without changing its first examples.
      jpeg_quality: JPEG quality of the stored images.
    """

    long_side: int = 256
    num_examples: int = 218
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError(f"PhantomConfig.num_examples must be positive; got {self.num_examples}.")
        phantom.image_shape(self.long_side)  # validates long_side


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask[..., 0] if mask.ndim == 3 else mask).save(buffer, format="PNG")
    return buffer.getvalue()


class Builder(tfds.core.GeneratorBasedBuilder):
    """Conjunctiva phantom: one 'train' split of ``num_examples`` generated patients."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PhantomConfig(name="res256", long_side=256, description="218 examples (like the real set), 256x192."),
        PhantomConfig(name="res512", long_side=512, description="218 examples, 512x384."),
        PhantomConfig(name="res64", long_side=64, num_examples=32, description="32 tiny examples for tests."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "res256"

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        # array_record is the only format readable without TensorFlow (tfds.data_source).
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            # Released (1.0.0) without feature descriptions: adding them would change prepared features.json.
            features=features_lib.example_features(phantom.MASK_NAMES, documented=False),
            # Example i of the split is phantom example i, so metadata order is generation order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated locally
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        config: PhantomConfig = self.builder_config
        for index, ex in enumerate(phantom.generate(config.seed, config.num_examples, long_side=config.long_side)):
            record = {
                "image": _jpeg(ex.image, config.jpeg_quality),
                "patient_id": ex.patient_id,
                "country": ex.country,
                "hgb": np.float32(ex.hgb),
                "gender": ex.gender,
                "age": np.float32(ex.age),
                "anemic": np.int32(ex.anemic),
            }
            for name in phantom.MASK_NAMES:
                record[name] = _png(getattr(ex, name))
                record[f"has_{name}"] = True
            yield index, record
