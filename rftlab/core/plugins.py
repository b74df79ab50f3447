"""Importing the user's own plug-ins (registered advantage estimators, losses, algorithm classes).

A plug-in registers itself when its module is imported (``@register_advantage("my_baseline")``).
A YAML config that names it therefore needs the module imported first: ``rftlab fit`` and
``rftlab compare`` take ``--imports [my_variants]`` (or ``imports: [my_variants]`` in the YAML),
module names or ``.py`` files, imported before any object is built. The current folder is on the
import path, as it is for ``python -m``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from rftlab.core.registry import Registry

#: Callbacks every fit of an rftlab algorithm gets unless the Trainer already has one of the same
#: type: name -> a function returning the callback. ``rftlab.callbacks`` registers the training
#: clock, the sample table, the W&B layout and atomic checkpoint writes; register your own the same
#: way. ``log.default_callbacks=False`` turns them off for a module.
DEFAULT_CALLBACKS: Registry[Callable[[], Any]] = Registry("default callback")


def current_folder_on_path() -> None:
    """Make modules in the current folder importable, as ``python -m`` does (a console script's
    ``sys.path`` starts with its own ``bin`` folder instead, so ``my_variants.MyGRPO`` in a YAML
    would otherwise need ``PYTHONPATH=.``)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_plugins(modules: Sequence[str]) -> list[ModuleType]:
    """Import each of ``modules`` (dotted names, or paths of ``.py`` files) once, in order.

    Args:
        modules: e.g. ``["my_variants", "experiments/losses.py"]``.

    Raises:
        ImportError: naming the module that could not be imported, and why.
    """
    current_folder_on_path()
    imported = []
    for name in modules:
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {str(path)!r}")
                module_name = path.stem
                if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
                    imported.append(sys.modules[module_name])
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except Exception as err:
            raise ImportError(f"imports: {name!r} could not be imported ({type(err).__name__}: {err})") from err
        imported.append(module)
    return imported


def import_object(path: str) -> Any:
    """Import ``package.module.Name`` (nested attributes allowed, e.g. ``mod.Outer.Inner``).

    Modules in the current folder are importable (``current_folder_on_path``).

    Args:
        path: the dotted import path.
    """
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{path!r} is not an import path such as 'package.module.Name'")
    current_folder_on_path()
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # the module exists but one of its own imports is missing: show that error
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module found for {path!r}")
