"""A tiny name -> callable registry, so variants are chosen by name and never by inline branches.

verl keeps its advantage estimators and policy losses behind registries
(``verl/trainer/ppo/core_algos.py``); we do the same but without bypasses: the built-ins are
registered exactly the way a user registers their own variant from their own file::

    from rftlab.core import AGGREGATIONS

    @AGGREGATIONS.register("my-agg")
    def my_agg(per_token, mask, max_len):
        ...

after which ``aggregate(..., mode="my-agg")`` (and any config that names ``"my-agg"``) works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to callables of one kind (e.g. ``"aggregation"``).

    Args:
        kind: what the registered things are, used in error messages
            (``"unknown aggregation 'foo'; valid: ..."``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    @overload
    def register(self, name: str, fn: None = None, *, overwrite: bool = False) -> Callable[[F], F]: ...

    @overload
    def register(self, name: str, fn: F, *, overwrite: bool = False) -> F: ...

    def register(self, name: str, fn: F | None = None, *, overwrite: bool = False):
        """Register ``fn`` under ``name``; without ``fn``, return a decorator that does.

        Args:
            name: non-empty string the variant is selected by.
            fn: the callable; omitted when used as ``@registry.register(name)``.
            overwrite: allow replacing an existing entry (a re-run notebook cell, or a deliberate
                override of a built-in). Without it a duplicate name raises ``ValueError`` so two
                variants can never silently shadow each other.

        Returns:
            ``fn`` unchanged (or the decorator), so the decorated function stays usable directly.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(f: F) -> F:
            if not callable(f):
                raise TypeError(f"{self.kind} {name!r} must be callable, got {type(f).__name__}")
            if name in self._entries and not overwrite:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries[name] = f
            return f

        return decorator if fn is None else decorator(fn)

    def get(self, name: str) -> F:
        """Return the callable registered as ``name``.

        Raises:
            ValueError: naming the kind, the bad value and the sorted valid names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: unhashable name, e.g. a list from a bad config
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
