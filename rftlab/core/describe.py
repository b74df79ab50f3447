"""JSON-friendly descriptions of option values, for run configs (W&B, CSV ``hparams.yaml``) and tables."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

#: Longer lists and strings are summarised: a config shows settings, not data (a task's rows).
MAX_ITEMS = 20
MAX_CHARS = 300


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-friendly copy of an option value (classes and functions become their import path,
    other objects their repr, or ``describe_object`` when the repr is the default one; long lists
    and strings are shortened).

    Args:
        value: any option value.
        depth: how deep inside other values this one is (objects deeper than 3 levels become
            their class path, "<module.Class>").
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_CHARS else value[:MAX_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            return f"<{len(value)} items>"
        return [jsonable(v, depth + 1) for v in value]
    if inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    text = repr(value)
    if " object at 0x" in text:
        # The default repr names a memory address, which differs between identical runs.
        if hasattr(value, "__dict__") and depth < 3:
            return describe_object(value, depth + 1)
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return jsonable(text)


def describe_object(obj: Any, depth: int = 0) -> dict[str, Any]:
    """``{"class_path", "name", <public attributes>}`` of an object such as a task: what a run config
    needs to tell two runs apart (a task's ``digits``, ``template``, ``seed``), without its data.

    Args:
        obj: the object (its public, non-callable instance attributes are listed).
        depth: how deep inside other values this one is (see ``jsonable``).
    """
    cls = type(obj)
    out: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    if getattr(obj, "name", None) is not None:
        out["name"] = jsonable(obj.name, depth + 1)
    for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if not key.startswith("_") and key != "name" and not callable(value):
            out[key] = jsonable(value, depth + 1)
    return out
