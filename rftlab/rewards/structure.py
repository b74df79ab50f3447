"""Structure rewards: tag format with partial credit, and JSON validated against a JSON Schema."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_TAG_NAME = re.compile(r"^[A-Za-z][\w-]*$")
_JSON_FENCE = re.compile(r"```[ \t]*json[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class TagFormat:
    """Partial credit for a tag structure such as ``<think>...</think><answer>...</answer>``.

    Formula, for tags ``t_1..t_K``::

        r = (sum_k 1[<t_k>...</t_k> occurs exactly once] + 1[the completion is exactly the K blocks,
             in order, separated only by whitespace]) / (K + 1)

    Args:
        tags: the tag names, in the required order.
        name: the metric name.

    >>> TagFormat()(["<think>a</think>\\n<answer>4</answer>", "<answer>4</answer>"])
    [1.0, 0.3333333333333333]
    """

    def __init__(self, tags: Sequence[str] = ("think", "answer"), name: str = "format") -> None:
        tags = [tags] if isinstance(tags, str) else list(tags)
        bad = [t for t in tags if not isinstance(t, str) or not _TAG_NAME.match(t)]
        if not tags or bad:
            raise ValueError(f"tags={tags!r}: need one or more names like 'think' (letters, digits, _ or -)")
        self.tags = tags
        self.name = name
        blocks = r"\s*".join(rf"<{t}>.*?</{t}>" for t in tags)
        self._full = re.compile(rf"\s*{blocks}\s*", re.DOTALL)
        self._pairs = [re.compile(rf"<{t}>.*?</{t}>", re.DOTALL) for t in tags]

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        return [self.score(c) for c in completions]

    def score(self, text: str) -> float:
        """Score one completion."""
        once = [len(pair.findall(text)) == 1 and text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1
                for tag, pair in zip(self.tags, self._pairs)]
        # The structure counts only with every tag exactly once: a lazy ".*?" could otherwise
        # stretch one block over a repeated tag.
        structure = all(once) and self._full.fullmatch(text) is not None
        return (sum(once) + structure) / (len(self.tags) + 1)


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (a ```json block first), or None.

    >>> extract_json('Sure: {"a": 1} done')
    {'a': 1}
    """
    fenced = _JSON_FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for match in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except ValueError:
                continue
            return value
    return None


def _load_jsonschema() -> Any:
    try:
        import jsonschema
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("JsonSchema needs jsonschema: pip install 'rftlab[verifiers]' (or pip install jsonschema)") from err
    return jsonschema


def _same(value: Any, reference: Any) -> bool:
    if isinstance(reference, str) and isinstance(value, str):
        return value.strip().casefold() == reference.strip().casefold()
    if isinstance(reference, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return abs(value - reference) <= 1e-9 * max(1.0, abs(reference))
    return value == reference


class JsonSchema:
    """The completion's JSON, validated against a JSON Schema, with partial credit per field.

    With ``F`` the schema's top-level ``properties``, a field counts when it is present and valid
    against its own sub-schema (and, with ``answer_key``, equal to the reference value: strings
    compared case-insensitively, numbers numerically); an absent field counts only when it is not
    required and the reference has no value for it::

        r = (number of fields that count + 1[the whole document validates]) / (F + 1)

    No JSON in the completion scores 0; a schema without ``properties`` scores 1[valid].

    Args:
        schema: a JSON Schema (dict); None reads it per sample from the ``schema_key`` column.
        answer_key: optional column with the reference object (a dict or a JSON string).
        schema_key: the column holding per-sample schemas when ``schema`` is None.
        name: the metric name.

    >>> JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})(['{"a": 1}', '{"a": "x"}'])  # doctest: +SKIP
    [1.0, 0.0]
    """

    def __init__(
        self,
        schema: dict[str, Any] | None = None,
        answer_key: str | None = None,
        schema_key: str = "schema",
        name: str = "json_schema",
    ) -> None:
        jsonschema = _load_jsonschema()
        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as err:
                raise ValueError(f"schema is not a valid JSON Schema: {err.message}") from err
        self.schema = schema
        self.answer_key = answer_key
        self.schema_key = schema_key
        self.name = name

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        n = len(completions)
        schemas = [self.schema] * n if self.schema is not None else columns.get(self.schema_key)
        if schemas is None:
            raise KeyError(f"json_schema has no schema: pass schema= or a {self.schema_key!r} column; got {sorted(columns)}")
        references = columns.get(self.answer_key, [None] * n) if self.answer_key else [None] * n
        if self.answer_key and self.answer_key not in columns:
            raise KeyError(f"json_schema needs the column {self.answer_key!r}; got {sorted(columns)}")
        return [self.score(c, s, r) for c, s, r in zip(completions, schemas, references)]

    def score(self, completion: str, schema: dict[str, Any] | str, reference: Any = None) -> float:
        """Score one completion against one schema (and reference object)."""
        jsonschema = _load_jsonschema()
        schema = json.loads(schema) if isinstance(schema, str) else schema
        reference = json.loads(reference) if isinstance(reference, str) else reference
        document = extract_json(completion)
        if document is None:
            return 0.0
        validator = jsonschema.validators.validator_for(schema)(schema)
        whole = validator.is_valid(document) and (reference is None or self._matches(document, reference))
        properties = schema.get("properties") or {}
        if not properties:
            return float(whole)
        required = set(schema.get("required", []))
        counted = 0
        for key, sub in properties.items():
            expected = reference.get(key) if isinstance(reference, dict) else None
            if isinstance(document, dict) and key in document:
                value = document[key]
                ok = type(validator)(sub).is_valid(value) and (expected is None or _same(value, expected))
            else:
                ok = key not in required and expected is None
            counted += ok
        return (counted + whole) / (len(properties) + 1)

    @staticmethod
    def _matches(document: Any, reference: Any) -> bool:
        if isinstance(reference, dict):
            return isinstance(document, dict) and all(_same(document.get(k), v) for k, v in reference.items())
        return _same(document, reference)
