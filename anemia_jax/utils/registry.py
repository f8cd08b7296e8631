"""Name -> object registries: how models, losses and datasets are declared once, beside their definition.

A registry maps canonical names (and optional aliases) to objects. Definitions register themselves where they are
written::

    MODELS = Registry("model")

    @MODELS.register("unetpp", aliases=("unet++", "nested_unet"))
    class UNetPlusPlus(...): ...

and every consumer (``get_model``, config validation, the command line) reads the same registry, so adding a model,
a loss or a dataset is one definition plus its one registration line. Look-ups are case-insensitive and an unknown
name fails with the closest registered names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "close_matches"]


def close_matches(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'a' or 'b'?`` for the candidates close to ``word`` ('' when none is)."""
    near = difflib.get_close_matches(str(word), list(candidates), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


class Registry(Generic[T]):
    """Canonical names and aliases -> registered objects of one kind (e.g. 'model').

    Args:
        kind: what the registry holds, used in error messages ("Unknown model 'unte'...").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """A decorator registering its argument under ``name`` (and ``aliases``); returns the argument unchanged.

        Raises:
            ValueError: ``name`` or an alias is taken already (two definitions would silently shadow each other).
        """
        def decorate(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Registers ``obj`` under ``name`` and ``aliases`` (the non-decorator form of `register`)."""
        for key in (name, *aliases):
            key = key.lower()
            if key in self._items or key in self._aliases:
                existing = self._items.get(key) or self._items[self._aliases[key]]
                if existing is obj:
                    continue  # A module imported twice (e.g. under two names in tests) registers the same object.
                raise ValueError(f"{self.kind} name {key!r} is registered twice ({existing!r} and {obj!r}).")
        self._items[name.lower()] = obj
        for alias in aliases:
            self._aliases[alias.lower()] = name.lower()

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` or of the alias ``name``.

        Raises:
            ValueError: an unknown name; the message lists the close and the valid names.
        """
        key = str(name).lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise ValueError(f"Unknown {self.kind} {name!r}.{close_matches(key, self.all_names())} "
                             f"Valid {self.kind} names: {', '.join(self.names())}.")
        return key

    def get(self, name: str) -> T:
        """The object registered under ``name`` (canonical or alias); see `canonical` for the error."""
        return self._items[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """The canonical names, in registration order."""
        return tuple(self._items)

    def all_names(self) -> tuple[str, ...]:
        """Canonical names and aliases."""
        return tuple(self._items) + tuple(self._aliases)

    def __contains__(self, name: object) -> bool:
        key = str(name).lower()
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(canonical name, object)`` pairs in registration order."""
        return list(self._items.items())
