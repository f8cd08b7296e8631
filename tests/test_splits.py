"""Tests of anemia_jax.data.splits: patient-level, stratified, deterministic splits."""

from collections import Counter

import numpy as np
import pytest

from anemia_jax.data import splits


def _metadata(num_patients=60, examples_per_patient=1, seed=0):
    """Two countries, anemic in {1, 0, -1}; examples of a patient are interleaved with other patients'."""
    rng = np.random.default_rng(seed)
    countries = np.array(["Italy", "India"])[rng.integers(0, 2, num_patients)]
    anemic = rng.choice([1, 0, -1], num_patients, p=[0.4, 0.45, 0.15]).astype(np.int32)
    ids = np.array([f"{c}/{i}" for i, c in enumerate(countries)], dtype=object)
    order = rng.permutation(np.repeat(np.arange(num_patients), examples_per_patient))
    return {"patient_id": ids[order], "country": countries[order].astype(object), "anemic": anemic[order],
            "hgb": rng.normal(12, 2, len(order)).astype(np.float32)}


def _patients(meta, idx):
    return set(meta["patient_id"][idx].tolist())


@pytest.mark.parametrize("examples_per_patient", [1, 3])
def test_kfold_disjoint_covering_grouped(examples_per_patient):
    meta = _metadata(examples_per_patient=examples_per_patient)
    n = len(meta["patient_id"])
    all_val = []
    for fold in range(5):
        train, val = splits.kfold_split(meta, num_folds=5, fold=fold, seed=3)
        assert np.intersect1d(train, val).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
        assert not _patients(meta, train) & _patients(meta, val)
        all_val.append(val)
    np.testing.assert_array_equal(np.sort(np.concatenate(all_val)), np.arange(n))


def test_kfold_stratified_within_one_per_stratum():
    meta = _metadata(num_patients=97)
    strata = list(zip(meta["country"], meta["anemic"]))
    per_fold = [Counter(strata[i] for i in splits.kfold_split(meta, num_folds=4, fold=f, seed=1)[1])
                for f in range(4)]
    for stratum in set(strata):
        counts = [c[stratum] for c in per_fold]
        assert max(counts) - min(counts) <= 1, (stratum, counts)
    sizes = [sum(c.values()) for c in per_fold]
    assert max(sizes) - min(sizes) <= 1, sizes
    # The unknown-anemia stratum is kept apart rather than merged.
    assert any(s[1] == -1 for s in set(strata))


def test_kfold_deterministic_seeded_and_order_independent():
    meta = _metadata(examples_per_patient=2)
    a = splits.kfold_split(meta, num_folds=5, fold=2, seed=7)
    b = splits.kfold_split(meta, num_folds=5, fold=2, seed=7)
    c = splits.kfold_split(meta, num_folds=5, fold=2, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    perm = np.random.default_rng(0).permutation(len(meta["patient_id"]))
    shuffled = {k: v[perm] for k, v in meta.items()}
    _, val_shuffled = splits.kfold_split(shuffled, num_folds=5, fold=2, seed=7)
    assert _patients(shuffled, val_shuffled) == _patients(meta, a[1])


def test_kfold_errors():
    meta = _metadata(num_patients=4)
    with pytest.raises(ValueError, match=r"fold must be .* \[0, 3\)"):
        splits.kfold_split(meta, num_folds=3, fold=3, seed=0)
    with pytest.raises(ValueError, match="5 folds from 4 patients"):
        splits.kfold_split(meta, num_folds=5, fold=0, seed=0)
    with pytest.raises(ValueError, match="num_folds"):
        splits.kfold_split(meta, num_folds=1, fold=0, seed=0)
    with pytest.raises(KeyError, match="patient_id"):
        splits.kfold_split({"country": meta["country"]}, num_folds=2, fold=0, seed=0)


def test_mixed_strata_patient_takes_its_majority():
    # Patient 'a' has two anemic examples and one not: it is one group, never split.
    meta = {"patient_id": np.array(["a", "a", "a", "b", "c", "d"], dtype=object),
            "anemic": np.array([1, 1, 0, 0, 1, 0], np.int32)}
    for fold in range(2):
        train, val = splits.kfold_split(meta, num_folds=2, fold=fold, seed=0)
        assert not _patients(meta, train) & _patients(meta, val)


def test_leave_one_country_out():
    meta = _metadata(examples_per_patient=2)
    train, test = splits.leave_one_country_out(meta, test_country="India")
    assert set(meta["country"][test]) == {"India"} and "India" not in set(meta["country"][train])
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(meta["country"])))
    with pytest.raises(ValueError, match=r"'Brazil'.*'India', 'Italy'"):
        splits.leave_one_country_out(meta, test_country="Brazil")
    bad = {"patient_id": np.array(["x", "x", "y"], object), "country": np.array(["Italy", "India", "India"], object)}
    with pytest.raises(ValueError, match="several countries"):
        splits.leave_one_country_out(bad, test_country="India")


def test_holdout_split_fraction_grouped_stratified_deterministic():
    meta = _metadata(num_patients=880 // 4, examples_per_patient=4)
    keep, held = splits.holdout_split(meta, fraction=0.1, seed=0)
    assert len(_patients(meta, held)) == 22
    assert not _patients(meta, keep) & _patients(meta, held)
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(880))
    strata = Counter(zip(meta["country"], meta["anemic"]))
    held_strata = Counter(zip(meta["country"][held], meta["anemic"][held]))
    for stratum, count in strata.items():
        assert abs(held_strata[stratum] / 4 - 0.1 * count / 4) <= 1, stratum
    np.testing.assert_array_equal(held, splits.holdout_split(meta, fraction=0.1, seed=0)[1])
    assert not np.array_equal(held, splits.holdout_split(meta, fraction=0.1, seed=1)[1])
    with pytest.raises(ValueError, match="one side empty"):
        splits.holdout_split(_metadata(num_patients=3), fraction=0.1, seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        splits.holdout_split(meta, fraction=1.0, seed=0)
