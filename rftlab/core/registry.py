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
from functools import lru_cache
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

    def register(self, name: str, fn: F | None = None, *, overwrite: bool = False) -> "Callable[[F], F] | F":
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

    def values(self) -> list[F]:
        """The registered callables, in registration order."""
        return list(self._entries.values())

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


def check_plugin_options(
    fn: Callable,
    kind: str,
    name: str,
    contract: tuple[str, ...],
    options: "dict[str, object]",
    supplied: "frozenset[str] | set[str] | tuple[str, ...]",
    where: str,
) -> None:
    """Check, before any training, that ``fn`` can be called with the user's and the algorithm's inputs.

    A registered piece (advantage estimator, policy loss) takes the positional inputs of its
    contract, then keyword options. Each keyword is filled from ``options`` (what the user set) or,
    when the algorithm supplies an input of that name (a critic's ``values``, the clip group's
    ``eps_low``), from the algorithm; otherwise the function's default applies.

    Args:
        fn: the registered function.
        kind: "advantage" or "loss", for messages.
        name: its registered name.
        contract: the positional parameters every function of this kind takes, in order.
        options: the user's keyword options for it.
        supplied: keyword inputs the algorithm passes when the function names them.
        where: the configuration key the options come from (e.g. "advantage.options").

    Raises:
        ValueError: naming ``where``, the option and the valid ones, for an option the function does
            not take, one that the algorithm supplies itself, a required keyword nobody fills, or a
            value whose type does not fit the function's annotation.
    """
    import inspect

    from rftlab.core.arguments import check_arguments

    params = inspect.signature(fn).parameters
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(contract) and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        raise ValueError(f"{kind} {name!r} must take ({', '.join(contract)}) first, takes "
                         f"({', '.join(p.name for p in positional)})")
    keywords = {p.name: p for p in list(params.values())[len(contract):]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for option in options:
        if option in supplied:
            raise ValueError(f"{where}.{option} is invalid: {option!r} is supplied by the algorithm, not set by hand")
        if option not in keywords and not open_ended:
            valid = sorted(k for k in keywords if k not in supplied)
            raise ValueError(f"{where}.{option} is invalid: {kind} {name!r} takes no option {option!r}; "
                             f"its options: {', '.join(valid) or 'none'}")
    for param in keywords.values():
        if param.default is param.empty and param.name not in options and param.name not in supplied:
            raise ValueError(f"{where}.{param.name} is missing: {kind} {name!r} requires it and the algorithm "
                             f"does not supply it (supplied: {', '.join(sorted(supplied)) or 'nothing'})")
    try:
        check_arguments(fn, dict(options))
        # Range checks a function declares for its options (``fn.check_options(**options)``).
        check = getattr(fn, "check_options", None)
        if check is not None:
            check(**{k: v for k, v in options.items() if k in keywords})
    except ValueError as err:  # ArgumentTypeError is a ValueError too
        raise type(err)(f"{where}.{err}") from None


def takes_input(fn: Callable, name: str) -> bool:
    """Whether a registered piece names the keyword input ``name`` (or takes any keyword).

    Cached per piece: ``call_plugin`` asks it for every supplied input at every loss and advantage
    call (an unhashable callable, such as an ``eq=True`` dataclass instance, is inspected each time).

    Args:
        fn: the registered function.
        name: the input an algorithm may supply (``"kl"``, ``"eps_high"``, ...).
    """
    try:
        return _takes_input(fn, name)
    except TypeError:  # unhashable: no cache entry possible
        return _takes_input.__wrapped__(fn, name)


@lru_cache(maxsize=None)
def _takes_input(fn: Callable, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def call_plugin(fn: Callable, args: tuple, supplied: "dict[str, object]", options: "dict[str, object]"):
    """Call a registered piece: contract inputs positionally, then the supplied inputs it names, then options.

    Args:
        fn: the registered function (checked beforehand by ``check_plugin_options``).
        args: its contract's positional inputs.
        supplied: every input the algorithm offers; only those ``fn`` names (or all, if it takes
            ``**kwargs``) are passed.
        options: the user's options.
    """
    wanted = {k: v for k, v in supplied.items() if takes_input(fn, k)}
    return fn(*args, **wanted, **options)
