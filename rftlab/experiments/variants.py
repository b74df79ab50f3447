"""What a comparison is made of: variants (an algorithm class plus option changes) and a budget.

A variant names an ``RFTModule`` subclass, built-in (``rftlab.DAPO``) or the user's own
(``my_project.algos.MyGRPO``, or the class object itself), and the model / DataModule options it
changes relative to the options every variant shares.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rftlab.algorithms.base import RFTModule
from rftlab.core.describe import jsonable
from rftlab.core.plugins import import_object

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
VARIANT_KEYS = ("name", "algorithm", "model", "data")


@dataclass
class Variant:
    """One arm of a comparison.

    Args:
        name: short label used as W&B job type and run name, in file names and in the table
            (letters, digits, ``.``, ``_``, ``+``, ``-``).
        algorithm: an ``RFTModule`` subclass or its import path ("rftlab.GRPO", "my_pkg.MyAlgo").
        model: constructor options of the algorithm that differ from the shared ``model`` options.
        data: ``RolloutDataModule`` options that differ from the shared ``data`` options.
    """

    name: str
    algorithm: type[RFTModule] | str = "rftlab.GRPO"
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"variant name={self.name!r} is invalid: must be letters, digits, '.', '_', '+' or '-' "
                "(it names files and W&B runs)"
            )
        for key in ("model", "data"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise ValueError(f"variant {self.name!r}: {key}={value!r} is invalid: must be a dict of options")
            setattr(self, key, dict(value))
        self.algorithm_class()  # fail now, naming the variant, rather than hours into a comparison

    @classmethod
    def from_spec(cls, spec: "Variant | Mapping[str, Any]") -> "Variant":
        """A Variant from itself or from a config mapping with keys name, algorithm, model, data."""
        if isinstance(spec, Variant):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"variant {spec!r} is invalid: must be a Variant or a mapping with keys {VARIANT_KEYS}")
        unknown = sorted(set(spec) - set(VARIANT_KEYS))
        if unknown:
            raise ValueError(
                f"variant {spec.get('name', '?')!r}: unknown key(s) {unknown}; allowed keys: {', '.join(VARIANT_KEYS)}"
            )
        if "name" not in spec:
            raise ValueError(f"variant {dict(spec)!r} has no 'name'")
        return cls(**{k: v for k, v in spec.items() if v is not None})

    def algorithm_class(self) -> type[RFTModule]:
        """The algorithm class, imported if given as a path; must subclass ``RFTModule``."""
        algorithm = self.algorithm
        if isinstance(algorithm, str):
            try:
                algorithm = import_object(algorithm)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(f"variant {self.name!r}: algorithm={self.algorithm!r} cannot be imported: {err}") from err
        if not (inspect.isclass(algorithm) and issubclass(algorithm, RFTModule)):
            raise ValueError(
                f"variant {self.name!r}: algorithm={self.algorithm!r} is invalid: must be a subclass of "
                "rftlab.RFTModule (or its import path, e.g. 'rftlab.GRPO')"
            )
        return algorithm

    @property
    def algorithm_path(self) -> str:
        """``module.QualName`` of the algorithm (what W&B configs and tables show)."""
        cls = self.algorithm_class()
        return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Budget:
    """When each run stops: the first of the limits that is set.

    Args:
        steps: optimizer steps.
        tokens: generated completion tokens (counting groups that dynamic sampling dropped).
        minutes: training wall time in minutes, sampling included, held-out evaluation excluded.
    """

    steps: int | None = None
    tokens: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.tokens is None and self.minutes is None:
            raise ValueError("budget is empty: set at least one of steps, tokens, minutes")
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"budget {name}={value!r} is invalid: must be an integer >= 1 or None")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"budget minutes={self.minutes!r} is invalid: must be a finite number > 0 or None")

    @classmethod
    def from_spec(cls, spec: "Budget | Mapping[str, Any] | int") -> "Budget":
        """A Budget from itself, a mapping (steps/tokens/minutes) or a plain step count."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(steps=spec)
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"steps", "tokens", "minutes"})
            if unknown:
                raise ValueError(f"budget: unknown key(s) {unknown}; allowed keys: steps, tokens, minutes")
            return cls(**spec)
        raise ValueError(f"budget={spec!r} is invalid: must be a Budget, a dict with steps/tokens/minutes, or an int")

    def describe(self) -> str:
        parts = []
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} generated tokens")
        if self.minutes is not None:
            parts.append(f"{self.minutes:g} training minutes")
        return " or ".join(parts)


def instantiate(value: Any) -> Any:
    """Build objects from LightningCLI-style specs ``{"class_path": ..., "init_args": {...}}``, recursively.

    Anything else (numbers, strings, already-built objects) is returned as is; dicts and lists are
    walked, so a task inside the DataModule options or a reward inside ``rewards`` is built too.

    Args:
        value: an option value, possibly holding specs.
    """
    if isinstance(value, Mapping):
        if "class_path" in value:
            unknown = sorted(set(value) - {"class_path", "init_args"})
            if unknown:
                raise ValueError(f"{value['class_path']}: unknown key(s) {unknown} next to class_path; use init_args")
            cls = import_object(value["class_path"])
            return cls(**{k: instantiate(v) for k, v in (value.get("init_args") or {}).items()})
        return {k: instantiate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [instantiate(v) for v in value]
    return value


def merge_options(shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """``shared`` with ``own`` on top; option groups (mappings) merge field by field, recursively.

    A variant that sets ``clip: {eps_high: 0.28}`` keeps the shared ``clip.eps_low``; a
    ``{class_path, init_args}`` spec or any other value replaces the shared one whole.

    Args:
        shared: the options every variant shares.
        own: the variant's own options.
    """
    out = dict(shared)
    for key, value in own.items():
        base = out.get(key)
        if _is_group(value) and _is_group(base):
            out[key] = merge_options(base, value)
        else:
            out[key] = value
    return out


def _is_group(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" not in value


def flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (leaves made JSON-friendly).

    Args:
        options: nested options.
        prefix: prepended to every key.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "class_path" not in value:
            out.update(flatten(value, name + "."))  # an empty mapping adds nothing
        else:
            out[name] = jsonable(value)
    return out


def config_diff(variant: Variant, model: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """What this variant changes relative to the shared options: ``{"algorithm": ..., "model.scale": ...}``.

    Args:
        variant: the variant.
        model: the model options every variant shares.
        data: the DataModule options every variant shares.
    """
    shared = flatten({"model": dict(model), "data": dict(data)})
    own = flatten({"model": variant.model, "data": variant.data})
    diff: dict[str, Any] = {"algorithm": variant.algorithm_path}
    diff.update({k: v for k, v in own.items() if shared.get(k, _MISSING) != v})
    return diff


_MISSING = object()


def check_variants(variants: Sequence[Variant]) -> None:
    """At least one variant, unique names.

    Args:
        variants: the comparison's variants.
    """
    if not variants:
        raise ValueError("variants is empty: give at least one variant")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names must be unique; repeated: {duplicates}")
