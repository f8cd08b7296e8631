"""Tests of the conjunctiva phantom generator and its TFDS builder."""

import pathlib
import re
import sys

import numpy as np
import pytest

from anemia_jax.data import datasets
from anemia_jax.data.datasets import features as features_lib
from anemia_jax.data.datasets.conjunctiva_phantom import conjunctiva_phantom_dataset_builder as cpb
from anemia_jax.data.datasets.conjunctiva_phantom import phantom

SEED = 3


@pytest.fixture(scope="module")
def examples() -> list[phantom.PhantomExample]:
    return list(phantom.generate(SEED, 24, long_side=64))


def test_deterministic_in_seed_and_index():
    a = phantom.generate_example(SEED, 5, long_side=64)
    b = next(phantom.generate(SEED, 1, long_side=64, start=5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.forniceal_palpebral, b.forniceal_palpebral)
    assert a.patient_id == b.patient_id and a.hgb == b.hgb
    assert not np.array_equal(a.image, phantom.generate_example(SEED, 6, long_side=64).image)
    assert not np.array_equal(a.image, phantom.generate_example(SEED + 1, 5, long_side=64).image)


def test_same_eye_at_every_resolution():
    small, large = (phantom.generate_example(SEED, 2, long_side=s) for s in (64, 128))
    assert small.image.shape == (64, 48, 3) and large.image.shape == (128, 96, 3)
    assert (small.hgb, small.patient_id, small.age) == (large.hgb, large.patient_id, large.age)
    down = large.forniceal_palpebral.reshape(64, 2, 48, 2).mean(axis=(1, 3)) >= 0.5
    mask = small.forniceal_palpebral.astype(bool)
    overlap = (down & mask).sum() / (down | mask).sum()
    assert overlap > 0.85


def test_metadata_distribution():
    meta = [phantom.sample_metadata(0, i) for i in range(400)]
    hgb = np.array([m["hgb"] for m in meta])
    assert hgb.min() >= 6.0 and hgb.max() <= 18.0
    assert abs(hgb.mean() - 12.5) < 0.4 and 1.6 < hgb.std() < 2.4
    for i, m in enumerate(meta):
        assert re.fullmatch(r"Phantom[AB]/\d+", m["patient_id"]) and m["patient_id"] == f"{m['country']}/{i + 1}"
        assert m["gender"] in ("F", "M") and 18 <= m["age"] <= 90
        assert m["anemic"] == int(m["hgb"] < (12.0 if m["gender"] == "F" else 13.0))
    for key, values in (("country", {"PhantomA", "PhantomB"}), ("gender", {"F", "M"}), ("anemic", {0, 1})):
        counts = {v: sum(m[key] == v for m in meta) for v in values}
        assert min(counts.values()) > 0.25 * len(meta), (key, counts)


def test_mask_geometry(examples):
    areas, centres = [], []
    for ex in examples:
        palp, forn, union = (getattr(ex, n).astype(bool) for n in phantom.MASK_NAMES)
        assert ex.palpebral.dtype == np.uint8 and set(np.unique(ex.forniceal_palpebral)) <= {0, 1}
        assert not (palp & forn).any()
        np.testing.assert_array_equal(palp | forn, union)
        assert palp.mean() > 0.01 and forn.mean() > 0.005 and union.mean() < 0.3
        # The forniceal band lies above (deeper than) the palpebral one, next to the globe.
        assert np.nonzero(forn)[0].mean() < np.nonzero(palp)[0].mean()
        areas.append(union.mean())
        centres.append(np.argwhere(union).mean(axis=0) / union.shape)
    # Regions vary in size and position from photo to photo.
    assert np.std(areas) / np.mean(areas) > 0.2 and np.std(np.array(centres), axis=0).min() > 0.02


def test_redness_follows_hgb(examples):
    def redness(ex):
        rgb = ex.image[ex.palpebral.astype(bool)].astype(np.float64)
        return np.mean((rgb[:, 0] - rgb[:, 1]) / (rgb[:, 0] + rgb[:, 1] + 1e-6))

    hgb = np.array([ex.hgb for ex in examples])
    assert np.corrcoef(hgb, [redness(ex) for ex in examples])[0, 1] > 0.7


def _channels(images: np.ndarray) -> dict[str, np.ndarray]:
    x = images.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(-1), x.min(-1)
    d = hi - lo + 1e-6
    hue = np.where(hi == r, ((g - b) / d) % 6.0, np.where(hi == g, (b - r) / d + 2.0, (r - g) / d + 4.0)) / 6.0
    return dict(
        R=r, G=g, B=b, gray=x.mean(-1), saturation=(hi - lo) / (hi + 1e-6), value=hi,
        hue=(hue + 0.5) % 1.0,  # reds in the middle, so that one interval can hold all of them
        a_like=(r - g) / (r + g + 1e-6), r_chroma=r / (x.sum(-1) + 1e-6),
    )


def _best_band_dice(values: np.ndarray, masks: np.ndarray, bins: int = 64) -> float:
    """Best mean Dice over examples of one shared band ``lo <= value < hi`` (includes both one-sided thresholds)."""
    n = len(values)
    index = np.searchsorted(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]), values).reshape(n, -1)
    flat = masks.reshape(n, -1)
    fg = np.stack([np.bincount(index[i][flat[i]], minlength=bins) for i in range(n)])
    every = np.stack([np.bincount(index[i], minlength=bins) for i in range(n)])
    cum_fg, cum_all = (np.pad(np.cumsum(h, axis=1), ((0, 0), (1, 0))) for h in (fg, every))
    lo, hi = np.triu_indices(bins + 1, 1)
    tp, predicted = cum_fg[:, hi] - cum_fg[:, lo], cum_all[:, hi] - cum_all[:, lo]
    return float((2 * tp / (predicted + flat.sum(1)[:, None])).mean(axis=0).max())


def test_colour_threshold_cannot_recover_masks(examples):
    images = np.stack([ex.image for ex in examples[:12]])
    for name in ("forniceal_palpebral", "palpebral"):
        masks = np.stack([getattr(ex, name) for ex in examples[:12]]).astype(bool)
        # The search itself works: on a channel that carries the mask it finds it.
        assert _best_band_dice(masks + np.random.default_rng(0).uniform(0, 0.1, masks.shape), masks) > 0.9
        scores = {k: _best_band_dice(v, masks) for k, v in _channels(images).items()}
        assert max(scores.values()) < 0.6, (name, scores)


def test_tfds_build_and_data_source(tmp_path):
    builder = cpb.Builder(config="res64", data_dir=tmp_path)
    examples = {i: phantom.generate_example(builder.builder_config.seed, i, long_side=64) for i in (0, 7, 31)}
    builder.download_and_prepare()
    source = builder.as_data_source("train")
    assert list(builder.info.splits.keys()) == ["train"] and len(source) == 32
    for i, ex in examples.items():
        stored = source[i]
        assert stored["patient_id"].decode() == ex.patient_id and stored["country"].decode() == ex.country
        assert stored["gender"].decode() == ex.gender and stored["anemic"] == ex.anemic
        assert stored["hgb"] == np.float32(ex.hgb) and stored["age"] == np.float32(ex.age)
        assert stored["image"].shape == (64, 48, 3) and stored["image"].dtype == np.uint8
        assert np.abs(stored["image"].astype(int) - ex.image).mean() < 6  # JPEG
        for name in phantom.MASK_NAMES:
            assert stored[f"has_{name}"]
            np.testing.assert_array_equal(stored[name][..., 0], getattr(ex, name))
    assert "tensorflow" not in sys.modules


def test_config_validation_and_custom_config(tmp_path):
    with pytest.raises(ValueError, match="num_examples"):
        cpb.PhantomConfig(name="empty", num_examples=0)
    with pytest.raises(ValueError, match="long_side"):
        cpb.PhantomConfig(name="tiny", long_side=8)
    config = cpb.PhantomConfig(name="five_at_32", long_side=32, num_examples=5, seed=SEED)
    builder = cpb.Builder(config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    source = builder.as_data_source("train")
    assert len(source) == 5 and source[4]["image"].shape == (32, 24, 3)
    assert source[4]["patient_id"].decode() == phantom.sample_metadata(SEED, 4)["patient_id"]


def test_info_homepage_and_citation(tmp_path):
    info = cpb.Builder(config="res64", data_dir=tmp_path).info
    # TFDS's default homepage would be a tensorflow.org catalog page that does not exist for this builder.
    assert info.homepage == features_lib.PROJECT_HOMEPAGE
    assert "@misc{anemia_jax" in info.citation


@pytest.mark.parametrize("name", datasets.BUILDER_NAMES)
def test_every_builder_folder_follows_tfds_conventions(name, tmp_path):
    cls = datasets.builder_class(name)
    folder = pathlib.Path(sys.modules[cls.__module__].__file__).parent
    assert folder.name == name and (folder / f"{name}_dataset_builder.py").is_file()
    for filename in ("README.md", "CITATIONS.bib", "__init__.py"):
        assert (folder / filename).is_file(), (name, filename)
    info = cls(data_dir=tmp_path).info
    assert info.citation.lstrip().startswith("@") and "tensorflow.org/datasets/catalog" not in info.homepage
