"""Option groups: frozen dataclasses of related options, each field checked at construction.

An invalid field raises an error naming the group and the field, e.g.
``clip.eps_high=-1 is invalid: must be >= clip.eps_low (0.2)``. Groups are given as the dataclass
or as a mapping of its fields (``as_group``); LightningCLI reads them from YAML mappings.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from rftlab.core.arguments import describe, matches

G = TypeVar("G")


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    """Base of the option groups: type checks of every field against its annotation, then ``validate``."""

    group: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not matches(value, hints[f.name]):
                self.fail(f.name, describe(hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Range checks across fields (override); call ``self.require`` for each."""

    def require(self, ok: bool, name: str, allowed: str) -> None:
        """Raise a ValueError naming ``<group>.<name>``, its value and ``allowed`` unless ``ok``."""
        if not ok:
            self.fail(name, allowed)

    def fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{self.group}.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def replace(self: G, **changes: Any) -> G:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def as_group(value: Any, cls: type[G], name: str | None = None, default: G | None = None) -> G:
    """``value`` as an instance of the option group ``cls``: itself, or built from a mapping of fields.

    A mapping changes only the fields it names: the others keep ``default``'s values (an
    algorithm's own default group, e.g. PPO's ``KLOptions(in_reward=True)``), or the dataclass's.

    Args:
        value: an instance of ``cls`` or a mapping of (some of) its fields.
        cls: the option group.
        name: the parameter it was given as (for errors), default ``cls.group``.
        default: the group the mapping's fields are applied to (None: ``cls()``'s defaults).
    """
    name = name or getattr(cls, "group", cls.__name__)
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}.{unknown[0]} is invalid: {name} has no field {unknown[0]!r}; "
                             f"fields: {', '.join(sorted(known))}")
        return dataclasses.replace(default, **value) if isinstance(default, cls) else cls(**value)
    raise TypeError(f"{name}={value!r} is invalid: must be a {cls.__name__} or a mapping of its fields")




def signature_default(cls: type, parameter: str) -> Any:
    """The default of ``parameter`` in the most derived ``__init__`` of ``cls`` that declares it.

    Args:
        cls: a class (e.g. an algorithm).
        parameter: the constructor parameter.
    """
    import inspect

    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and parameter in inspect.signature(init).parameters:
            return inspect.signature(init).parameters[parameter].default
    return None


def plain_options(value: Any) -> Any:
    """``value`` with every option group (dataclass) turned into a dict, recursively (for checkpoints).

    Args:
        value: hyper-parameters: a mapping, a list, a group or a plain value.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_options(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_options(v) for v in value)
    return value
