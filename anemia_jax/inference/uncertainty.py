"""Per-pixel uncertainty of a segmentation, from the probabilities of one run or of an ensemble's members (NumPy).

Uncertainty maps (`uncertainty_maps`), from the probabilities of the M members of an ensemble ``[M, h, w, C]``
(M = 1 for a single run):

* ``entropy``: the binary entropy, in bits, of the MEAN probability: 0 where the prediction is certain (p = 0 or 1),
  1 bit where it is 0.5. It is the total predictive uncertainty, defined for one run and for an ensemble alike, and
  it already rises where members disagree (two members certain of opposite answers average to 0.5: 1 bit). This is
  what `PhotoSegmentation.uncertainty` shows and what the quality verdict (`anemia_jax.screening.quality`) uses.
* ``disagreement``: the mutual information between the prediction and the member (entropy of the mean minus the
  mean of the members' entropies; Houlsby et al. 2011, "BALD"): the part of the entropy due to members disagreeing
  (0 for a single run, and wherever the members agree, however unsure each is). Kept for research and the app.
"""

from __future__ import annotations

import numpy as np

__all__ = ["binary_entropy", "uncertainty_maps"]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of Bernoulli(p), elementwise: 0 at p in {0, 1}, 1 at p = 0.5 (float32)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.nan_to_num(h, nan=0.0).astype(np.float32)


def uncertainty_maps(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(entropy, disagreement)``, each float32 ``[h, w, C]`` in bits, of member probabilities ``[M, h, w, C]``
    (module docstring); ``disagreement`` is 0 for M = 1."""
    members = np.asarray(members, np.float32)
    if members.ndim != 4:
        raise ValueError(f"members must be [M, h, w, C] probabilities; got shape {members.shape}.")
    entropy = binary_entropy(members.mean(axis=0))
    disagreement = np.maximum(entropy - binary_entropy(members).mean(axis=0), 0.0)
    return entropy, disagreement.astype(np.float32)
