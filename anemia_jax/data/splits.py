"""Patient-level, stratified, deterministic splits of a dataset's examples.

All functions take the metadata of a split as returned by `input_pipeline.read_metadata` (a dict of equally long
[N] arrays; only ``patient_id`` is required, ``country`` and ``anemic`` refine the strata) and return sorted int64
positions into those arrays. Conventions shared by every function:

* Grouped: all examples of one ``patient_id`` land on the same side, so no patient is ever in two sides of a split.
* Stratified: patients are balanced over strata ``(country, anemic)``; ``anemic == -1`` (unknown) is a stratum of its
    own. A patient whose examples disagree on the stratum takes its most frequent one (ties: the smallest).
* Deterministic: a function of the metadata and ``seed`` only (NumPy's PCG64 from ``seed``; no Python ``hash``), and
    independent of the order of the examples in the metadata.

To split a part further (e.g. carve a validation set out of a training fold), pass the subset's metadata
(``{k: v[train_idx] for k, v in metadata.items()}``) and map the result back with ``train_idx[result]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from anemia_jax.utils.conversions import as_text

Metadata = Mapping[str, np.ndarray]

_UNKNOWN_COUNTRY = "(unknown)"


def _patients(metadata: Metadata) -> tuple[list[str], dict[str, np.ndarray], dict[str, tuple[str, int]]]:
    """Sorted patient ids, each patient's example positions and its stratum (country, anemic)."""
    if "patient_id" not in metadata:
        raise KeyError(f"metadata needs a 'patient_id' array to group examples by patient; it has {sorted(metadata)}.")
    ids = np.asarray([as_text(p) for p in metadata["patient_id"]], dtype=object)
    n = len(ids)
    countries = metadata.get("country")
    countries = ["" for _ in range(n)] if countries is None else [as_text(c) for c in countries]
    anemic = metadata.get("anemic")
    anemic = np.full(n, -1, np.int64) if anemic is None else np.asarray(anemic, np.int64)
    if len(countries) != n or len(anemic) != n:
        raise ValueError(f"metadata arrays differ in length: patient_id {n}, country {len(countries)}, "
                         f"anemic {len(anemic)}.")
    positions: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        positions.setdefault(pid, []).append(i)
    strata = {}
    for pid, pos in positions.items():
        counts = Counter((countries[i], int(anemic[i])) for i in pos)
        best = max(counts.values())
        strata[pid] = min(s for s, c in counts.items() if c == best)
    order = sorted(positions)
    return order, {p: np.asarray(positions[p], np.int64) for p in order}, strata


def _by_stratum(order: list[str], strata: dict[str, tuple[str, int]]) -> dict[tuple[str, int], list[str]]:
    groups: dict[tuple[str, int], list[str]] = {}
    for pid in order:
        groups.setdefault(strata[pid], []).append(pid)
    return dict(sorted(groups.items()))


def _gather(patients, positions: dict[str, np.ndarray]) -> np.ndarray:
    if not patients:
        return np.zeros((0,), np.int64)
    return np.sort(np.concatenate([positions[p] for p in patients]))


def kfold_assignment(metadata: Metadata, *, num_folds: int, seed: int) -> dict[str, int]:
    """Maps every patient id to its fold in [0, num_folds).

    Within each stratum the patients are shuffled (seeded) and dealt round-robin over the folds; the dealing continues
    across strata where the previous stratum stopped, so each fold gets the same number of patients within one, per
    stratum and overall.
    """
    if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    order, _, strata = _patients(metadata)
    if len(order) < num_folds:
        raise ValueError(f"Cannot make {num_folds} folds from {len(order)} patients: every fold needs at least one "
                         f"patient. Use num_folds <= {len(order)}.")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    next_fold = 0
    for patients in _by_stratum(order, strata).values():
        for pid in (patients[i] for i in rng.permutation(len(patients))):
            fold_of[pid] = next_fold
            next_fold = (next_fold + 1) % num_folds
    return fold_of


def kfold_split(metadata: Metadata, *, num_folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``fold`` of a grouped, stratified K-fold split.

    Args:
        metadata: dict of [N] arrays with ``patient_id`` (and ideally ``country``, ``anemic``).
        num_folds: K >= 2; at most the number of distinct patients.
        fold: which fold is the validation part, in [0, num_folds).
        seed: shuffles patients within strata; the same seed gives the same folds for every ``fold``.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 positions into the metadata arrays; disjoint, covering [0, N), and over
        ``fold = 0..K-1`` every example is in exactly one ``val_idx``.
    """
    if not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in [0, {num_folds}) for num_folds={num_folds}, got {fold!r}.")
    fold_of = kfold_assignment(metadata, num_folds=num_folds, seed=seed)
    _, positions, _ = _patients(metadata)
    train = [p for p, f in fold_of.items() if f != fold]
    val = [p for p, f in fold_of.items() if f == fold]
    return _gather(train, positions), _gather(val, positions)


def leave_one_country_out(metadata: Metadata, *, test_country: str) -> tuple[np.ndarray, np.ndarray]:
    """Trains on every country but ``test_country`` and tests on that one.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 positions. Raises if the country is unknown (the message lists the
        known ones) or if a patient has examples in two countries (the split would then not be patient-level).
    """
    if "country" not in metadata:
        raise KeyError("metadata has no 'country' array; leave-one-country-out needs one.")
    order, positions, _ = _patients(metadata)
    countries = np.asarray([as_text(c) for c in metadata["country"]], dtype=object)
    known = sorted(set(countries.tolist()))
    if test_country not in known:
        names = ", ".join(repr(c) if c else _UNKNOWN_COUNTRY + " ''" for c in known)
        raise ValueError(f"Unknown test_country {test_country!r}; the metadata has these countries: {names}.")
    for pid in order:
        seen = set(countries[positions[pid]].tolist())
        if len(seen) > 1:
            raise ValueError(f"Patient {pid!r} has examples in several countries {sorted(seen)}; a country split "
                             "would put that patient on both sides. Fix the metadata (one country per patient).")
    test = [p for p in order if countries[positions[p][0]] == test_country]
    train = [p for p in order if countries[positions[p][0]] != test_country]
    if not train:
        raise ValueError(f"Every example is from {test_country!r}: nothing is left to train on.")
    return _gather(train, positions), _gather(test, positions)


def holdout_split(metadata: Metadata, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Holds out about ``fraction`` of the patients, grouped and stratified.

    The number of held-out patients is ``round(fraction * num_patients)``, shared out over the strata by largest
    remainder (ties broken by the seeded generator), so small strata are represented in proportion.

    Returns:
        ``(keep_idx, holdout_idx)``: sorted int64 positions into the metadata arrays; both non-empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    order, positions, strata = _patients(metadata)
    total = int(round(fraction * len(order)))
    if not 0 < total < len(order):
        raise ValueError(f"Holding out fraction={fraction} of {len(order)} patients gives {total}, which leaves "
                         "one side empty; use a fraction that keeps at least one patient on each side.")
    rng = np.random.default_rng(seed)
    groups = _by_stratum(order, strata)
    exact = np.array([fraction * len(g) for g in groups.values()])
    take = np.floor(exact).astype(np.int64)
    remainder = exact - take
    # Largest remainder first; the random key only orders equal remainders.
    tie_break = rng.random(len(groups))
    for i in np.lexsort((tie_break, -remainder))[: total - int(take.sum())]:
        take[i] += 1
    held: list[str] = []
    for k, patients in zip(take, groups.values()):
        held.extend(patients[i] for i in rng.permutation(len(patients))[:k])
    held_set = set(held)
    keep = [p for p in order if p not in held_set]
    return _gather(keep, positions), _gather(held, positions)
