"""The TFDS features of one example, shared by every builder (the contract in `anemia_jax.data.datasets`).

Builders differ only in their mask names (``palpebral``, ``forniceal``, ``forniceal_palpebral`` for the eye sets,
``mask`` for image/mask folders), so the features are spelled out once here. They are written to each prepared
dataset's ``features.json``: changing them changes what users' prepared data declares, so any change needs a
new builder version.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

# DatasetInfo homepage of data this package defines itself (the phantom, image/mask folders other than Kvasir-SEG):
# the project README, which documents every builder. It has no public URL yet; replace this with the repository's
# README URL when there is one. Not part of features.json, so changing it leaves prepared data valid.
PROJECT_HOMEPAGE = "anemia_jax README.md (the project's top-level README; no public URL yet)"

_DOCS = {
    "hgb": "Haemoglobin, g/dL; NaN if unknown.",
    "age": "Years; NaN if unknown.",
    "anemic": "WHO adult thresholds (Hgb < 12 g/dL F, < 13 M): 1 anemic, 0 not, -1 unknown.",
}



def example_features(mask_names: Sequence[str], *, documented: bool = True) -> tfds.features.FeaturesDict:
    """Features of one example with the masks ``mask_names``.

    Args:
      mask_names: one uint8 PNG mask ``[H, W, 1]`` (values in {0, 1}, same H, W as ``image``) and one boolean
        ``has_<name>`` per name.
      documented: attach the descriptions of ``hgb``, ``age`` and ``anemic``. They are stored in
        ``features.json``; builders released without them pass False so that their prepared data stays
        identical (the encoded examples are the same either way).

    Returns:
      ``image`` (uint8 JPEG ``[H, W, 3]``), the masks and their ``has_<name>`` flags, ``patient_id``,
      ``country`` and ``gender`` (text), ``hgb`` and ``age`` (float32, NaN if unknown), ``anemic`` (int32).
    """
    doc = _DOCS if documented else {}
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"),
            **{name: tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")
               for name in mask_names},
            **{f"has_{name}": tfds.features.Scalar(dtype=np.bool_) for name in mask_names},
            "patient_id": tfds.features.Text(),
            "country": tfds.features.Text(),
            "hgb": tfds.features.Scalar(dtype=np.float32, doc=doc.get("hgb")),
            "gender": tfds.features.Text(),
            "age": tfds.features.Scalar(dtype=np.float32, doc=doc.get("age")),
            "anemic": tfds.features.Scalar(dtype=np.int32, doc=doc.get("anemic")),
        }
    )
