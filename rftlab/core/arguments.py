"""Type checks of constructor arguments against their annotations, with the parameter named.

Range checks such as ``lr > 0`` raise a bare ``TypeError`` from the comparison when the value is a
string (``'<' not supported between 'str' and 'int'``), and a value that slips past them
(``lr=True``, ``lora_r=2.5``, ``lr=nan``) surfaces later as a traceback from deep inside torch. So
every annotated argument is checked against its annotation first, and the error names the
parameter, the value and what is allowed, like every other configuration error of rftlab::

    TypeError: lr='fast' is invalid: must be a number

``check_init_arguments`` checks the arguments of every ``__init__`` of an object's class hierarchy
that is on the call stack (the base class calls it once, so users' subclasses are covered too); it
reads the callers' frames the way Lightning's ``save_hyperparameters`` does
(``lightning/pytorch/utilities/parsing.py``, ``collect_init_args``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import numbers
import types
import typing
from typing import Any, Callable

_SKIP = object()  # an annotation we cannot check (forward reference, generic we do not know)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ValueError, so code that catches configuration
    errors as ValueError (as rftlab's range checks raise them) catches this one too."""


def describe(annotation: Any) -> str:
    """Plain-words description of an annotation ("an integer or None")."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a finite number"
    if annotation is str:
        return "a string"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(annotation)
        return f"a list of {describe(args[0])}s" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return "a callable"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return f"a {annotation.__name__} (or a mapping of its fields)"
    return f"a {getattr(annotation, '__name__', str(annotation))}"


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (numbers: bool is not an int; floats must be finite)."""
    if annotation is Any or annotation is _SKIP:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(annotation))
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            return False
        args = typing.get_args(annotation)
        return not args or args[0] is Ellipsis or all(matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation) and isinstance(value, collections.abc.Mapping):
        return True  # an option group given as a mapping of its fields (converted by the receiver)
    if origin is None and isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # TypeVar, ...: not ours to police


def check_arguments(func: Callable[..., Any], values: typing.Mapping[str, Any]) -> None:
    """Raise an ``ArgumentTypeError`` (a ValueError for a non-finite float) naming the first argument
    of ``func`` whose value in ``values`` does not fit its annotation.

    Args:
        func: the function (an ``__init__``) whose signature and annotations are checked.
        values: argument name -> value (e.g. the function's ``locals()`` on entry); missing names are skipped.
    """
    hints = _hints(func)
    for name, param in inspect.signature(func).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name not in values:
            continue
        annotation = hints.get(name, _SKIP)
        value = values[name]
        if matches(value, annotation):
            continue
        if isinstance(value, float) and not math.isfinite(value) and _allows_float(annotation):
            raise ValueError(f"{name}={value!r} is invalid: must be {describe(annotation)}")
        raise ArgumentTypeError(f"{name}={value!r} is invalid: must be {describe(annotation)}, got {type(value).__name__}")


def check_init_arguments(obj: object, frame: types.FrameType | None) -> None:
    """Check the arguments of every ``__init__`` of ``type(obj)`` that is running, outermost class last.

    Args:
        obj: the object under construction.
        frame: the frame of the ``__init__`` calling this (``inspect.currentframe()``).
    """
    inits = {cls.__dict__["__init__"].__code__: cls.__dict__["__init__"]
             for cls in type(obj).__mro__ if "__init__" in cls.__dict__ and hasattr(cls.__dict__["__init__"], "__code__")}
    try:
        while frame is not None and frame.f_code in inits and frame.f_locals.get("self") is obj:
            check_arguments(inits[frame.f_code], frame.f_locals)
            frame = frame.f_back
    finally:
        del frame  # frames reference their locals: do not keep them alive


def _allows_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and float in typing.get_args(annotation)


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # an unresolvable forward reference: check the parameters we can resolve
        hints = {}
        module = inspect.getmodule(func)
        namespace = vars(module) if module is not None else {}
        for name, raw in getattr(func, "__annotations__", {}).items():
            try:
                hints[name] = eval(raw, namespace) if isinstance(raw, str) else raw  # noqa: S307 (annotation text)
            except Exception:
                hints[name] = _SKIP
        return hints


def check_choice(registry: Any, name: str, value: Any) -> None:
    """Look ``value`` up in a ``Registry``; an unknown name raises a ValueError naming the parameter.

    Args:
        registry: a ``rftlab.core.Registry`` (its error lists the valid names).
        name: the parameter that holds the name (e.g. "loss_agg").
        value: the name given.
    """
    try:
        registry.get(value)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is invalid: {str(err).strip(chr(34) + chr(39))}") from None
