"""What the trainer needs to know about a selectable dataset (`DatasetSpec`) and the registry of them.

Each builder module declares the dataset(s) it provides right beside its builder class::

    register_dataset(DatasetSpec(name="kvasir_seg", builder="image_mask_folder", ...), aliases=("kvasir",))

Configs select a dataset by name (``--config=configs/unetpp.py:data=kvasir``), config validation checks targets and
split protocols against the spec, and `anemia_jax.training.experiment` prepares the builder it names. This module needs
no TFDS, so reading specs stays cheap.
"""

from __future__ import annotations

import dataclasses

from anemia_jax.utils.registry import Registry

__all__ = ["DATASETS", "DatasetSpec", "register_dataset"]

PROTOCOLS = ("kfold", "loco", "holdout")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset the configs can select.

    Attributes:
        name: the canonical name configs use (``config.dataset.name``).
        builder: the TFDS builder's registered name (`anemia_jax.data.datasets.get_builder`).
        stored: ``(long side, builder config)`` pairs, ascending: the builder configs that store the photos at that
            long side; a config picks the smallest that is at least its training resolution.
        masks: mask features of every example (possible ``targets``).
        default_targets: the targets a config trains on unless told otherwise.
        protocols: split protocols that make sense for it (of ``kfold``, ``loco``, ``holdout``); the first is the
            default.
        test_split: a TFDS split held out for the final evaluation only ('' if none).
        builder_kwargs: the builder's extra constructor arguments and their defaults ('' means not passed), so that
            they can be set from the command line (e.g. the source folder).
        schedule: run length and intervals in epochs (``num_epochs``, ``warmup_epochs``, ``eval_every_epochs``,
            ``checkpoint_every_epochs``), since set sizes differ by orders of magnitude.
    """

    name: str
    builder: str
    stored: tuple[tuple[int, str], ...]
    masks: tuple[str, ...]
    default_targets: tuple[str, ...]
    protocols: tuple[str, ...]
    schedule: tuple[tuple[str, int], ...]
    test_split: str = ""
    builder_kwargs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"DatasetSpec {self.name!r}: protocols {self.protocols} must be a non-empty subset of "
                             f"{PROTOCOLS}.")
        missing = [t for t in self.default_targets if t not in self.masks]
        if missing:
            raise ValueError(f"DatasetSpec {self.name!r}: default targets {missing} are not among its masks "
                             f"{self.masks}.")

    def builder_config_for(self, size: int) -> str:
        """The builder config storing images at the smallest long side >= ``size`` (else the largest)."""
        for long_side, name in self.stored:
            if long_side >= size:
                return name
        return self.stored[-1][1]


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec, *, aliases: tuple[str, ...] = ()) -> DatasetSpec:
    """Declares ``spec`` under ``spec.name`` (and ``aliases``); returns it."""
    DATASETS.add(spec.name, spec, aliases=aliases)
    return spec
