"""Graders in OpenAI's RFT JSON form, run locally: bring your grader configs.

``from_openai_grader(config)`` turns a grader dict into a reward callable
``(completions, **columns) -> list[float]``. Supported types (OpenAI "Graders" guide):

- ``string_check``: ``operation`` eq | ne | like (input contains reference) | ilike (case-insensitive);
- ``text_similarity``: ``evaluation_metric`` fuzzy_match | bleu | rouge_1..rouge_5 | rouge_l | cosine
  (cosine needs ``embedder=``);
- ``python``: ``source`` defining ``grade(sample, item) -> float``, run in the sandbox;
- ``score_model``: a local Hugging Face causal LM (``model`` is a local folder or a model of the local
  Hugging Face cache) or ``judge=`` a callable, prompted with ``input`` messages; the first number
  of its reply, which must lie within ``range``;
- ``multi``: named ``graders`` combined by ``calculate_output``, a formula evaluated by a safe
  parser (``rftlab.rewards.expr``), never ``eval``.

Templates: ``{{sample.output_text}}``, ``{{sample.output_json.<field>}}``, ``{{item.<field>}}``;
``item`` holds the task columns of the sample (``answer``, ...), ``sample.output_text`` the completion.

The graders fail closed, since the policy they grade searches for reward wherever it leaks:

- a malformed template (unterminated, unknown placeholder) and a wrong grader nested anywhere in a
  ``multi`` config are construction errors naming the field;
- a completion without the JSON field a template reads scores the grader's minimum, counted in
  ``missing_fields``;
- a judge reply without a well-formed finite number scores the range's low end, counted in ``unparsed``;
- every grader's scores are finite and within its ``range`` (a ``multi`` grader's range follows
  from its formula and its graders' ranges).
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rftlab.rewards.checks import check_finite
from rftlab.rewards.expr import ExpressionError, SafeExpression
from rftlab.rewards.sandbox import Sandbox
from rftlab.rewards.similarity import bleu, cosine, fuzzy_ratio, rouge_l, rouge_n
from rftlab.rewards.structure import extract_json

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l", "cosine")
GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
REQUIRED_KEYS = {"string_check": ("input", "reference", "operation"),
                 "text_similarity": ("input", "reference", "evaluation_metric"),
                 "python": ("source",), "score_model": ("input",), "multi": ("graders", "calculate_output")}
ALLOWED_PLACEHOLDERS = "sample.output_text, sample.output_json.<key>, item.<column>"

_SEGMENT = r"[^\s.{}]+"
_PLACEHOLDER = re.compile(rf"sample\.output_text|sample\.output_json(?:\.{_SEGMENT})+|item(?:\.{_SEGMENT})+")
# A whole decimal token: not glued to a word, a sign, or other digits by "." or "," ("Qwen2.5",
# "1.2.3", "3,5", "5th" are no scores); ASCII digits only, as float() would read other scripts' too.
# A whole decimal number: not glued to a word, another number, a sign or a fraction bar ("7/10"
# says nothing of the scale it is on, so it is not read as 7, nor as 10).
_SCORE = re.compile(r"(?<![\w.,+\-\u2212/])[-+]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                    r"(?![\w]|[.,][0-9]|\s*/\s*[.0-9])")
# What the hub accepts as a model id; anything else given as ``model`` can only be a folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")

Interval = tuple[float, float]
Judge = Callable[[list[list[dict[str, str]]]], list[str]]
Embedder = Callable[[list[str]], Sequence[Sequence[float]]]
UNBOUNDED: Interval = (-math.inf, math.inf)


class _MissingField(KeyError):
    """The completion lacks a ``sample`` field that a template reads (not a configuration error)."""


# ---- templates -----------------------------------------------------------------------------------------
def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _placeholders(template: str) -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of each ``{{ path }}`` of ``template``; ValueError for a malformed one.

    Args:
        template: the template text.
    """
    found: list[tuple[int, int, str]] = []
    start = template.find("{{")
    while start != -1:
        end = template.find("}}", start + 2)
        if end == -1:
            raise ValueError(f"unterminated placeholder {_excerpt(template[start:])}")
        path = template[start + 2 : end].strip()
        if not _PLACEHOLDER.fullmatch(path):
            raise ValueError(f"unknown placeholder {path!r} (allowed: {ALLOWED_PLACEHOLDERS})")
        found.append((start, end + 2, path))
        start = template.find("{{", end + 2)
    return found


def _lookup(path: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
    """The value at a validated placeholder ``path``.

    Args:
        path: ``sample.…`` or ``item.…``, dot-separated keys (digits index lists).
        sample: the completion's fields (``make_sample``).
        item: the task columns of the sample.
    """
    root, *rest = path.split(".")
    value: Any = sample if root == "sample" else item
    for i, key in enumerate(rest):
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, Sequence) and not isinstance(value, str) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            where = ".".join([root, *rest[:i]])
            keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            message = f"template variable {{{{{path}}}}}: {where} has no {key!r} (has {keys})"
            # The completion is the policy's doing and scores the minimum; a task column missing is
            # a configuration error and stays one.
            raise _MissingField(message) if root == "sample" else KeyError(message)
    return value


def render_template(template: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    """Fill ``{{sample.x}}`` / ``{{item.y}}`` placeholders, in one pass: the values are not templates.

    Raises ValueError for a malformed template and KeyError for a value that is not there.

    >>> render_template("{{ item.answer }} vs {{sample.output_text}}", {"output_text": "4"}, {"answer": 4})
    '4 vs 4'
    """
    parts, last = [], 0
    for start, end, path in _placeholders(template):
        parts += [template[last:start], str(_lookup(path, sample, item))]
        last = end
    parts.append(template[last:])
    return "".join(parts)


def _check_template(template: Any, field: str) -> None:
    """Refuse a template that is not a string or holds a malformed placeholder.

    Args:
        template: the template given.
        field: its name in errors, e.g. ``StringCheck.reference``.
    """
    if not isinstance(template, str):
        raise ValueError(f"{field}: must be a string template, got {type(template).__name__}")
    try:
        _placeholders(template)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


def make_sample(completion: str) -> dict[str, Any]:
    """The ``sample`` a grader sees for one completion."""
    return {"output_text": completion, "output_json": extract_json(completion)}


# ---- numbers and ranges --------------------------------------------------------------------------------
def _finite(owner: str, keyword: str, value: Any) -> float:
    """``value`` as a float once ``check_finite`` accepted it (a finite number, not a bool)."""
    check_finite(owner, keyword, value)
    return float(value)


def _checked_range(owner: str, bounds: Any) -> Interval:
    """``bounds`` as ``(low, high)``: two finite numbers with low < high.

    Args:
        owner: the class named in the error.
        bounds: the ``range`` given.
    """
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        raise ValueError(f"{owner}: range={bounds!r} is invalid: must be [low, high] with low < high")
    low, high = (_finite(owner, f"range[{i}]", v) for i, v in enumerate(bounds))
    if low >= high:
        raise ValueError(f"{owner}: range={list(bounds)!r} is invalid: must be [low, high] with low < high")
    return low, high


def _clamp(value: float, bounds: Interval) -> float:
    """``value`` within ``bounds``; NaN becomes the low end."""
    return bounds[0] if math.isnan(value) else min(bounds[1], max(bounds[0], value))


def parse_score(reply: Any) -> float | None:
    """The first whole decimal number of a judge's reply, or None when it has no finite one.

    >>> parse_score("Score: .5"), parse_score("1e-3"), parse_score("I say 7.")
    (0.5, 0.001, 7.0)
    >>> parse_score("version 1.2.3") is None, parse_score("3,5") is None, parse_score("1e999") is None
    (True, True, True)
    >>> parse_score("7/10") is None, parse_score("1 / 2") is None
    (True, True)
    """
    match = _SCORE.search(reply) if isinstance(reply, str) else None
    if match and reply[:match.start()].rstrip().endswith("/"):
        match = None  # the denominator of "1 / 2" (the regex's lookbehind cannot skip the spaces)
    value = float(match.group()) if match else math.nan
    return value if math.isfinite(value) else None


# ---- the range of a formula ----------------------------------------------------------------------------
def formula_range(expression: SafeExpression, ranges: Mapping[str, Interval]) -> Interval:
    """Bounds of ``expression`` while each name stays within its range (interval arithmetic);
    unbounded where a step has no bound: division by a range holding 0, ``//``, ``%``, an overflow.

    Args:
        expression: the parsed formula.
        ranges: name -> ``(low, high)`` of each name it uses.

    >>> formula_range(SafeExpression("2 * a - min(b, 1)", names=["a", "b"]), {"a": (0, 1), "b": (0, 5)})
    (-1.0, 2.0)
    """
    try:
        low, high = _interval(expression.tree, ranges)
    except (ArithmeticError, LookupError, ValueError, TypeError):
        return UNBOUNDED
    return UNBOUNDED if math.isnan(low) or math.isnan(high) or low > high else (float(low), float(high))


def _interval(node: ast.AST, ranges: Mapping[str, Interval]) -> Interval:
    """Bounds of one node of a formula checked by ``SafeExpression``."""
    if isinstance(node, ast.Constant):
        return float(node.value), float(node.value)
    if isinstance(node, ast.Name):
        return float(ranges[node.id][0]), float(ranges[node.id][1])
    if isinstance(node, ast.UnaryOp):
        low, high = _interval(node.operand, ranges)
        return (-high, -low) if isinstance(node.op, ast.USub) else (low, high)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _call_interval(node.func.id, [_interval(arg, ranges) for arg in node.args])
    if isinstance(node, ast.BinOp):
        return _binary_interval(node.op, _interval(node.left, ranges), _interval(node.right, ranges))
    return UNBOUNDED


def _hull(values: list[float]) -> Interval:
    # 0 * inf or inf / inf: no bound can be claimed.
    return UNBOUNDED if any(math.isnan(v) for v in values) else (min(values), max(values))


def _binary_interval(op: ast.operator, a: Interval, b: Interval) -> Interval:
    if isinstance(op, ast.Add):
        return a[0] + b[0], a[1] + b[1]
    if isinstance(op, ast.Sub):
        return a[0] - b[1], a[1] - b[0]
    if isinstance(op, ast.Mult):
        return _hull([x * y for x in a for y in b])
    if isinstance(op, ast.Div) and not b[0] <= 0.0 <= b[1]:
        return _hull([x / y for x in a for y in b])
    if isinstance(op, ast.Pow) and b[0] == b[1] and b[0] >= 0 and float(b[0]).is_integer():
        return _power_interval(a, int(b[0]))
    return UNBOUNDED


def _power_interval(a: Interval, n: int) -> Interval:
    """Bounds of ``x ** n`` for x in ``a``, n a non-negative integer."""
    low, high = a[0] ** n, a[1] ** n
    if n % 2 == 1:
        return low, high
    if a[0] < 0.0 < a[1]:
        return 0.0, max(low, high)
    return min(low, high), max(low, high)


_MONOTONE: dict[str, Callable[[float], float]] = {
    "floor": math.floor, "ceil": math.ceil, "round": round, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
}


def _call_interval(name: str, args: list[Interval]) -> Interval:
    """Bounds of ``name(*args)``: min and max, abs, and the monotone functions within their domain."""
    if name in ("min", "max") and args:
        pick = min if name == "min" else max
        return pick(a[0] for a in args), pick(a[1] for a in args)
    if len(args) != 1:
        return UNBOUNDED
    low, high = args[0]
    if name == "abs":
        return (low, high) if low >= 0 else (-high, -low) if high <= 0 else (0.0, max(-low, high))
    if name not in _MONOTONE or (name == "sqrt" and low < 0) or (name == "log" and low <= 0):
        return UNBOUNDED
    apply = _MONOTONE[name]

    def at(x: float) -> float:
        # floor/ceil/round of an infinite bound raise; the bound stays infinite.
        return x if math.isinf(x) and name in ("floor", "ceil", "round") else float(apply(x))

    return at(low), at(high)


# ---- the graders ---------------------------------------------------------------------------------------
class Grader:
    """Base of the graders: ``grade_batch(samples, items)``, callable as a reward function.

    Attributes:
        range: ``(low, high)``, the bounds of every score (unbounded for a python grader).
        missing_fields: samples scored the minimum because the completion lacked a field a
            template reads (``{{sample.output_json.answer}}`` without JSON or without ``answer``).
        unparsed: judge replies that held no usable number (none, a fraction, or one outside the
            range) and scored the range's low end.
    """

    name = "grader"
    range: Interval = UNBOUNDED
    missing_fields = 0
    unparsed = 0
    #: Counters ``RewardSet`` logs as ``reward/<fn>/count/<name>`` when they rise.
    counters = ("missing_fields", "unparsed")

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        return [self.grade(s, i) for s, i in zip(samples, items)]

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        columns.pop("prompts", None)
        items = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        return self.grade_batch([make_sample(c) for c in completions], items)

    def _render(self, templates: Sequence[str], sample: Mapping[str, Any], item: Mapping[str, Any]) -> list[str] | None:
        """The filled ``templates``, or None (counted) when the completion lacks a field they read.

        Args:
            templates: the templates to fill.
            sample: the completion's fields.
            item: the task columns of the sample.
        """
        try:
            return [render_template(t, sample, item) for t in templates]
        except _MissingField:
            self.missing_fields += 1
            return None


class StringCheck(Grader):
    """1.0 or 0.0 by ``operation``: eq (input == reference), ne, like (reference in input), ilike
    (same, case-insensitive); 0.0 when the completion lacks a field a template reads."""

    range = (0.0, 1.0)

    def __init__(self, input: str, reference: str, operation: str, name: str = "string_check") -> None:
        if operation not in STRING_OPERATIONS:
            raise ValueError(f"StringCheck: operation={operation!r} is invalid: must be one of "
                             f"{', '.join(STRING_OPERATIONS)}")
        _check_template(input, "StringCheck.input")
        _check_template(reference, "StringCheck.reference")
        self.input, self.reference, self.operation, self.name = input, reference, operation, name

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        rendered = self._render((self.input, self.reference), sample, item)
        if rendered is None:
            return 0.0  # even for "ne": a missing answer is not a different answer
        got, ref = rendered
        if self.operation == "eq":
            return float(got == ref)
        if self.operation == "ne":
            return float(got != ref)
        if self.operation == "like":
            return float(ref in got)
        return float(ref.lower() in got.lower())


class TextSimilarity(Grader):
    """A similarity score in [0, 1] between rendered ``input`` and ``reference``
    (``rftlab.rewards.similarity``); with ``pass_threshold``, 1.0 at or above it, else 0.0; 0.0
    when the completion lacks a field a template reads."""

    range = (0.0, 1.0)

    def __init__(self, input: str, reference: str, evaluation_metric: str, pass_threshold: float | None = None,
                 embedder: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
                 name: str = "text_similarity") -> None:
        if evaluation_metric not in SIMILARITY_METRICS:
            raise ValueError(f"TextSimilarity: evaluation_metric={evaluation_metric!r} is invalid: must be one of "
                             f"{', '.join(SIMILARITY_METRICS)}")
        if evaluation_metric == "cosine" and embedder is None:
            raise ValueError("TextSimilarity: evaluation_metric='cosine' needs embedder= (a callable texts -> vectors)")
        if pass_threshold is not None:
            pass_threshold = _finite("TextSimilarity", "pass_threshold", pass_threshold)
        _check_template(input, "TextSimilarity.input")
        _check_template(reference, "TextSimilarity.reference")
        self.input, self.reference, self.metric = input, reference, evaluation_metric
        self.pass_threshold, self.embedder, self.name = pass_threshold, embedder, name

    def similarity(self, a: str, b: str) -> float:
        if self.metric == "fuzzy_match":
            return fuzzy_ratio(a, b)
        if self.metric == "bleu":
            return bleu(a, b)
        if self.metric == "rouge_l":
            return rouge_l(a, b)
        if self.metric == "cosine":
            return cosine(a, b, self.embedder)
        return rouge_n(a, b, int(self.metric[-1]))

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        rendered = self._render((self.input, self.reference), sample, item)
        if rendered is None:
            return 0.0
        score = _clamp(float(self.similarity(*rendered)), self.range)
        return score if self.pass_threshold is None else float(score >= self.pass_threshold)


class PythonGrader(Grader):
    """``grade(sample, item) -> float`` from ``source``, run in the sandbox; a grader that fails,
    hangs, breaks a limit or returns a non-finite number scores ``failure_value``."""

    def __init__(self, source: str, sandbox: Sandbox | None = None, failure_value: float = 0.0,
                 name: str = "python") -> None:
        if not isinstance(source, str) or "def grade" not in source:
            raise ValueError("PythonGrader.source: must define grade(sample, item)")
        try:
            compile(source, "grader.py", "exec")
        except SyntaxError as err:
            raise ValueError(f"PythonGrader.source: does not compile: {err}") from err
        self.failure_value = _finite("PythonGrader", "failure_value", failure_value)
        self.source, self.sandbox, self.name = source, sandbox or Sandbox(), name
        self.last_results: list[Any] = []

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        result = self.sandbox.run(self.source, mode="grader", sample=dict(sample), item=_jsonable(item))
        self.last_results = [result]
        ok = result.completed and result.value is not None and math.isfinite(result.value)
        return result.value if ok else self.failure_value

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, max(1, len(samples)))) as pool:
            return list(pool.map(self.grade, samples, items))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


class ScoreModel(Grader):
    """A local language model as judge: renders ``input`` (chat messages), generates greedily, and
    scores the first whole decimal number of the reply (``parse_score``). A reply without one, or
    with one outside ``range`` (a judge off its scale), scores ``range[0]`` (counted in
    ``unparsed``); so does a completion lacking a field a template reads (counted in
    ``missing_fields``, and never shown to the judge).

    Args:
        input: chat messages ``[{"role", "content"}]`` with templates.
        model: a local model folder (Hugging Face causal LM) or a model of the local Hugging Face
            cache, checked at construction, loaded on first use, offline.
        range: [low, high] of the score, finite.
        judge: instead of ``model``, a callable ``list of message lists -> list of reply texts``.
        max_new_tokens: reply budget of the local model.
        name: the grader's name.
    """

    def __init__(self, input: list[dict[str, str]], model: str | None = None, range: Sequence[float] = (0.0, 1.0),
                 judge: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
                 max_new_tokens: int = 16, name: str = "score_model") -> None:
        _check_messages(input)
        self.range = _checked_range("ScoreModel", range)
        if judge is None and model is None:
            raise ValueError("ScoreModel: needs model= (a local model folder) or judge= (a callable)")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"ScoreModel: max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
        self.messages, self.model, self.name = input, model, name
        self.judge = judge if judge is not None else _LocalJudge(_judge_model(model), max_new_tokens)

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        conversations = [self._conversation(s, i) for s, i in zip(samples, items)]
        replies = iter(self._ask([c for c in conversations if c is not None]))
        return [self.range[0] if c is None else self.parse(next(replies)) for c in conversations]

    def _conversation(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> list[dict[str, str]] | None:
        contents = self._render([m["content"] for m in self.messages], sample, item)
        if contents is None:
            return None
        return [{"role": m.get("role", "user"), "content": c} for m, c in zip(self.messages, contents)]

    def _ask(self, conversations: list[list[dict[str, str]]]) -> list[Any]:
        if not conversations:
            return []
        replies = list(self.judge(conversations))
        if len(replies) != len(conversations):
            raise ValueError(f"score_model {self.name!r}: the judge returned {len(replies)} replies for "
                             f"{len(conversations)} conversations")
        return replies

    def parse(self, reply: Any) -> float:
        """The reply's score (``parse_score``) when within the range, else the range's low end (counted)."""
        value = parse_score(reply)
        if value is None or not self.range[0] <= value <= self.range[1]:
            self.unparsed += 1
            return self.range[0]
        return value


def _check_messages(messages: Any) -> None:
    """Refuse ``ScoreModel.input`` unless chat messages whose contents are valid templates."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, Mapping) and "content" in m and isinstance(m.get("role", "user"), str) for m in messages):
        raise ValueError("ScoreModel.input: must be a non-empty list of chat messages {'role', 'content'}")
    for k, message in enumerate(messages):
        _check_template(message["content"], f"ScoreModel.input[{k}].content")


def _judge_model(model: Any) -> str:
    """The folder or cached hub model the local judge will load; ValueError when there is none.

    Args:
        model: the ``model`` given.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"ScoreModel.model: must be a local model folder, got {model!r}")
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        return folder
    if not _HUB_ID.fullmatch(model):
        raise ValueError(f"ScoreModel.model: no such folder {model!r}")
    if not _in_hub_cache(model):
        raise ValueError(f"ScoreModel.model: no such folder {model!r}, nor a model in the local Hugging Face cache "
                         "(models are never downloaded here; pass judge= to grade with a callable)")
    return model


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the model ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # a name the hub could not hold
        return False


class _LocalJudge:
    """Greedy generation with a local Hugging Face causal LM (loaded lazily, never from the hub)."""

    def __init__(self, path: str, max_new_tokens: int) -> None:
        self.path, self.max_new_tokens = path, max_new_tokens
        self._model = self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "max_new_tokens": self.max_new_tokens, "_model": None, "_tokenizer": None}

    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._model is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True, padding_side="left")
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
            self._model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True,
                                                               use_kernels=False).eval()  # no hub kernels: no network
        tok = self._tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) if tok.chat_template
                 else "\n".join(m["content"] for m in c) + "\n" for c in conversations]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self._model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class MultiGrader(Grader):
    """Named graders combined by ``calculate_output``, e.g. ``"0.7 * correct + 0.3 * style"``.

    ``range`` follows from the formula and the graders' ranges (``formula_range``); a formula that
    cannot be evaluated or gives a non-finite value (possible only where that range is unbounded,
    e.g. dividing by a grader that can score 0) raises ``ExpressionError``, which ``RewardSet``
    reports or counts by its ``on_error``. ``missing_fields`` and ``unparsed`` sum the graders' counts.

    Args:
        graders: name -> grader; the names are the formula's variables.
        calculate_output: the formula.
        name: the grader's name.
    """

    def __init__(self, graders: Mapping[str, Grader], calculate_output: str, name: str = "multi") -> None:
        if not isinstance(graders, Mapping) or not graders:
            raise ValueError("MultiGrader.graders: needs at least one grader (a dict name -> grader)")
        for key, grader in graders.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"MultiGrader.graders: names must be identifiers to appear in calculate_output, "
                                 f"got {key!r}")
            if not isinstance(grader, Grader):
                raise ValueError(f"MultiGrader.graders.{key}: expected a Grader, got {type(grader).__name__}")
        try:
            self.formula = SafeExpression(calculate_output, names=list(graders))
        except ExpressionError as err:
            raise ExpressionError(f"MultiGrader.calculate_output: {err}") from None
        self.graders, self.name = dict(graders), name
        self.range = formula_range(self.formula, {k: g.range for k, g in self.graders.items()})

    @property
    def missing_fields(self) -> int:  # type: ignore[override]
        return sum(g.missing_fields for g in self.graders.values())

    @property
    def unparsed(self) -> int:  # type: ignore[override]
        return sum(g.unparsed for g in self.graders.values())

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        scores = {name: g.grade_batch(samples, items) for name, g in self.graders.items()}
        return [self._combine({k: v[i] for k, v in scores.items()}) for i in range(len(samples))]

    def _combine(self, values: dict[str, float]) -> float:
        try:
            value = float(self.formula.evaluate(values))
        except OverflowError as err:
            raise ExpressionError(f"multi grader {self.name!r}: calculate_output overflows for {values}") from err
        if not math.isfinite(value):
            raise ExpressionError(f"multi grader {self.name!r}: calculate_output gives {value} for {values}")
        return _clamp(value, self.range)  # the range is exact up to float rounding


# ---- OpenAI configs ------------------------------------------------------------------------------------
def from_openai_grader(
    config: Mapping[str, Any],
    judge: Judge | None = None,
    embedder: Embedder | None = None,
    sandbox: Sandbox | None = None,
) -> Grader:
    """A reward callable from an OpenAI grader config (see the module docstring).

    Every nested grader is built, and so checked, here; an error names its place in the config
    (``graders.correct.type: ...``).

    Args:
        config: the grader dict, e.g. ``{"type": "string_check", "name": "exact",
            "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}``.
        judge: for ``score_model`` graders: a callable used instead of loading ``model``.
        embedder: for ``text_similarity`` with ``cosine``.
        sandbox: for ``python`` graders (default: ``Sandbox()``).
    """
    return _build(config, "", judge, embedder, sandbox)


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(config: Any, path: str, judge: Judge | None, embedder: Embedder | None, sandbox: Sandbox | None) -> Grader:
    """The grader of ``config``, found at ``path`` in the whole config ("" at its top).

    Args:
        config: the grader dict.
        path: where it sits, e.g. ``graders.correct``, to name in errors.
        judge: passed to ``score_model`` graders.
        embedder: passed to ``text_similarity`` graders.
        sandbox: passed to ``python`` graders.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"{path + ': ' if path else ''}grader config must be a dict, got {type(config).__name__}")
    kind = config.get("type")
    if kind not in GRADER_TYPES:
        raise ValueError(f"{_at(path, 'type')}: unknown grader type {kind!r} (allowed: {', '.join(GRADER_TYPES)})")
    name = config.get("name", kind)
    for key in REQUIRED_KEYS[kind]:
        if key not in config:
            raise ValueError(f"{_at(path, key)}: {kind} grader {name!r} needs {key!r}; got keys {sorted(config)}")
    subs = _build_subs(config, path, name, judge, embedder, sandbox) if kind == "multi" else {}
    try:
        return _construct(kind, config, name, subs, judge, embedder, sandbox)
    except ValueError as err:
        if not path:
            raise
        raise (ExpressionError if isinstance(err, ExpressionError) else ValueError)(f"{path}: {err}") from None


def _build_subs(config: Mapping[str, Any], path: str, name: Any, judge: Judge | None, embedder: Embedder | None,
                sandbox: Sandbox | None) -> dict[str, Grader]:
    """The graders of a ``multi`` config, each built at ``<path>.graders.<key>``."""
    graders = config["graders"]
    if not isinstance(graders, Mapping):
        raise ValueError(f"{_at(path, 'graders')}: multi grader {name!r}: graders must be a dict name -> grader config")
    subs = {}
    for key, sub in graders.items():
        where = _at(path, f"graders.{key}")
        if isinstance(sub, Mapping) and "name" not in sub:
            sub = {**sub, "name": key}
        subs[key] = _build(sub, where, judge, embedder, sandbox)
    return subs


def _construct(kind: str, config: Mapping[str, Any], name: Any, subs: dict[str, Grader], judge: Judge | None,
               embedder: Embedder | None, sandbox: Sandbox | None) -> Grader:
    """The grader of a config whose type and required keys are checked (``subs``: a multi's graders)."""
    if kind == "string_check":
        return StringCheck(config["input"], config["reference"], config["operation"], name=name)
    if kind == "text_similarity":
        return TextSimilarity(config["input"], config["reference"], config["evaluation_metric"],
                              config.get("pass_threshold"), embedder=embedder, name=name)
    if kind == "python":
        return PythonGrader(config["source"], sandbox=sandbox, name=name)
    if kind == "score_model":
        return ScoreModel(config["input"], model=config.get("model"), range=config.get("range", (0.0, 1.0)),
                          judge=judge, name=name)
    return MultiGrader(subs, config["calculate_output"], name=name)
