"""A screening model fitted on phantom photos' true palpebral masks, as the screening tests need one: shared by the
page's, the verdict's and the answers' tests so that all three test the same kind of model."""

from __future__ import annotations

import numpy as np

from anemia_jax.data.datasets.conjunctiva_phantom import phantom
from anemia_jax.screening import cross_validation, screening_model
from anemia_jax.screening.features import FeatureSpec


def phantom_record(num_photos: int) -> dict:
    """What `anemia_jax.screening.fit` records for a model fitted on ``num_photos`` phantom photos (one per subject)."""
    return {"data": {"dataset": {"name": "phantom"}, "synthetic_photos": True, "split": {"protocol": "kfold"}},
            "num_photos": num_photos, "num_subjects": num_photos}


def fit_on_phantom(num_photos: int, *, constancy: str | None = None, training: dict | None | str = "phantom"):
    """``(model, examples)``: a `screening_model.ScreeningModel` fitted (5 grouped folds, no bootstrap) on the first
    ``num_photos`` phantom photos (64x48) with their true palpebral masks, and those examples. ``constancy`` None:
    the feature spec's default; ``training``: the record of what it was fitted on (``"phantom"``: `phantom_record`;
    None: none, a model of unknown origin)."""
    examples = list(phantom.generate(0, num_photos, long_side=64))
    kwargs = {} if constancy is None else {"constancy": constancy}
    spec = FeatureSpec(feature_size=(64, 48), target="palpebral", **kwargs)  # the photos' own size: masks as they are
    feats = spec.compute_from_masks([e.image for e in examples], [e.palpebral for e in examples])
    groups = np.array([e.patient_id for e in examples])
    model = screening_model.fit_screening_model(
        feats, hgb=np.array([e.hgb for e in examples]), anemic=np.array([e.anemic for e in examples]), groups=groups,
        folds=cross_validation.grouped_folds(groups, 5), num_bootstrap=0, feature_spec=spec,
        training=phantom_record(num_photos) if training == "phantom" else training)
    return model, examples
