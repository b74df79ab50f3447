"""Import a script under benchmarks/ (not a package) by its file name, for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks/<name>.py``, executed once per call.

    Args:
        name: the script's file name without ``.py``, e.g. "scaling".
    """
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helpers (rss.py) as when run
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
