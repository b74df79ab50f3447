"""Graders in OpenAI's RFT JSON form, run locally: bring your grader configs.

``from_openai_grader(config)`` turns a grader dict into a reward callable
``(completions, **columns) -> list[float]``. Supported types (OpenAI "Graders" guide):

- ``string_check``: ``operation`` eq | ne | like (input contains reference) | ilike (case-insensitive);
- ``text_similarity``: ``evaluation_metric`` fuzzy_match | bleu | rouge_1..rouge_5 | rouge_l | cosine
  (cosine needs ``embedder=``);
- ``python``: ``source`` defining ``grade(sample, item) -> float``, run in the sandbox;
- ``score_model``: a local Hugging Face causal LM (``model`` is a local path) or ``judge=`` a callable,
  prompted with ``input`` messages; the first number of its reply, clipped to ``range``;
- ``multi``: named ``graders`` combined by ``calculate_output``, a formula evaluated by a safe
  parser (``rftlab.rewards.expr``), never ``eval``.

Templates: ``{{sample.output_text}}``, ``{{sample.output_json.<field>}}``, ``{{item.<field>}}``;
``item`` holds the task columns of the sample (``answer``, ...), ``sample.output_text`` the completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rftlab.rewards.expr import SafeExpression
from rftlab.rewards.sandbox import Sandbox
from rftlab.rewards.similarity import bleu, cosine, fuzzy_ratio, rouge_l, rouge_n
from rftlab.rewards.structure import extract_json

_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_FIRST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l", "cosine")
GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


def _lookup(path: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
    root, *rest = path.split(".")
    if root not in ("sample", "item"):
        raise KeyError(f"template variable {{{{{path}}}}} must start with 'sample.' or 'item.'")
    value: Any = sample if root == "sample" else item
    for i, key in enumerate(rest):
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, Sequence) and not isinstance(value, str) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            where = ".".join([root, *rest[:i]])
            keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise KeyError(f"template variable {{{{{path}}}}}: {where} has no {key!r} (has {keys})")
    return value


def render_template(template: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    """Fill ``{{sample.x}}`` / ``{{item.y}}`` placeholders.

    >>> render_template("{{ item.answer }} vs {{sample.output_text}}", {"output_text": "4"}, {"answer": 4})
    '4 vs 4'
    """
    return _TEMPLATE.sub(lambda m: str(_lookup(m.group(1), sample, item)), template)


def _check_template(template: Any, field: str) -> None:
    if not isinstance(template, str):
        raise ValueError(f"{field} must be a string template, got {type(template).__name__}")
    for path in _TEMPLATE.findall(template):
        if path.split(".")[0] not in ("sample", "item"):
            raise ValueError(f"{field}: template variable {{{{{path}}}}} must start with 'sample.' or 'item.'")


def make_sample(completion: str) -> dict[str, Any]:
    """The ``sample`` a grader sees for one completion."""
    return {"output_text": completion, "output_json": extract_json(completion)}


class Grader:
    """Base of the graders: ``grade_batch(samples, items)``, callable as a reward function."""

    name = "grader"

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        return [self.grade(s, i) for s, i in zip(samples, items)]

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        columns.pop("prompts", None)
        items = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        return self.grade_batch([make_sample(c) for c in completions], items)


class StringCheck(Grader):
    """1.0 or 0.0 by ``operation``: eq (input == reference), ne, like (reference in input), ilike
    (same, case-insensitive)."""

    def __init__(self, input: str, reference: str, operation: str, name: str = "string_check") -> None:
        if operation not in STRING_OPERATIONS:
            raise ValueError(f"string_check operation={operation!r}; valid: {', '.join(STRING_OPERATIONS)}")
        _check_template(input, "input")
        _check_template(reference, "reference")
        self.input, self.reference, self.operation, self.name = input, reference, operation, name

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        got, ref = render_template(self.input, sample, item), render_template(self.reference, sample, item)
        if self.operation == "eq":
            return float(got == ref)
        if self.operation == "ne":
            return float(got != ref)
        if self.operation == "like":
            return float(ref in got)
        return float(ref.lower() in got.lower())


class TextSimilarity(Grader):
    """A similarity score in [0, 1] between rendered ``input`` and ``reference``
    (``rftlab.rewards.similarity``); with ``pass_threshold``, 1.0 at or above it, else 0.0."""

    def __init__(self, input: str, reference: str, evaluation_metric: str, pass_threshold: float | None = None,
                 embedder: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
                 name: str = "text_similarity") -> None:
        if evaluation_metric not in SIMILARITY_METRICS:
            raise ValueError(f"evaluation_metric={evaluation_metric!r}; valid: {', '.join(SIMILARITY_METRICS)}")
        if evaluation_metric == "cosine" and embedder is None:
            raise ValueError("evaluation_metric='cosine' needs embedder= (a callable texts -> vectors)")
        _check_template(input, "input")
        _check_template(reference, "reference")
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
        score = self.similarity(render_template(self.input, sample, item), render_template(self.reference, sample, item))
        return score if self.pass_threshold is None else float(score >= self.pass_threshold)


class PythonGrader(Grader):
    """``grade(sample, item) -> float`` from ``source``, run in the sandbox; a grader that fails,
    hangs or breaks a limit scores ``failure_value``."""

    def __init__(self, source: str, sandbox: Sandbox | None = None, failure_value: float = 0.0,
                 name: str = "python") -> None:
        if not isinstance(source, str) or "def grade" not in source:
            raise ValueError("python grader source must define grade(sample, item)")
        try:
            compile(source, "grader.py", "exec")
        except SyntaxError as err:
            raise ValueError(f"python grader source does not compile: {err}") from err
        self.source, self.sandbox, self.failure_value, self.name = source, sandbox or Sandbox(), failure_value, name
        self.last_results: list[Any] = []

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        result = self.sandbox.run(self.source, mode="grader", sample=dict(sample), item=_jsonable(item))
        self.last_results = [result]
        return result.value if result.completed and result.value is not None else self.failure_value

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
    scores the first number of the reply, clipped to ``range``; no number scores ``range[0]``.

    Args:
        input: chat messages ``[{"role", "content"}]`` with templates.
        model: a local model folder (Hugging Face causal LM), loaded on first use, offline.
        range: [low, high] of the score.
        judge: instead of ``model``, a callable ``list of message lists -> list of reply texts``.
        max_new_tokens: reply budget of the local model.
    """

    def __init__(self, input: list[dict[str, str]], model: str | None = None, range: Sequence[float] = (0.0, 1.0),
                 judge: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
                 max_new_tokens: int = 16, name: str = "score_model") -> None:
        if not isinstance(input, list) or not all(isinstance(m, dict) and "content" in m for m in input):
            raise ValueError("score_model input must be a list of chat messages {'role', 'content'}")
        for m in input:
            _check_template(m["content"], "input content")
        if len(range) != 2 or range[0] >= range[1]:
            raise ValueError(f"score_model range must be [low, high] with low < high, got {list(range)}")
        if judge is None and model is None:
            raise ValueError("score_model needs model= (a local model folder) or judge= (a callable)")
        self.messages, self.model, self.range, self.name = input, model, (float(range[0]), float(range[1])), name
        self.judge = judge if judge is not None else _LocalJudge(model, max_new_tokens)

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        conversations = [[{"role": m.get("role", "user"), "content": render_template(m["content"], s, i)}
                          for m in self.messages] for s, i in zip(samples, items)]
        replies = self.judge(conversations)
        return [self.parse(r) for r in replies]

    def parse(self, reply: str) -> float:
        """The first number of ``reply`` clipped to the range, or the range's low end."""
        match = _FIRST_NUMBER.search(reply)
        if match is None:
            return self.range[0]
        return min(self.range[1], max(self.range[0], float(match.group())))


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
            self._model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).eval()
        tok = self._tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) if tok.chat_template
                 else "\n".join(m["content"] for m in c) + "\n" for c in conversations]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self._model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class MultiGrader(Grader):
    """Named graders combined by ``calculate_output``, e.g. ``"0.7 * correct + 0.3 * style"``."""

    def __init__(self, graders: Mapping[str, Grader], calculate_output: str, name: str = "multi") -> None:
        if not graders:
            raise ValueError("multi grader needs at least one grader in graders")
        bad = [k for k in graders if not k.isidentifier()]
        if bad:
            raise ValueError(f"multi grader names must be identifiers to appear in calculate_output, got {bad}")
        self.graders, self.name = dict(graders), name
        self.formula = SafeExpression(calculate_output, names=list(graders))

    def grade_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[float]:
        scores = {name: g.grade_batch(samples, items) for name, g in self.graders.items()}
        return [float(self.formula.evaluate({k: v[i] for k, v in scores.items()})) for i in range(len(samples))]


def from_openai_grader(
    config: Mapping[str, Any],
    judge: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
    embedder: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
    sandbox: Sandbox | None = None,
) -> Grader:
    """A reward callable from an OpenAI grader config (see the module docstring).

    Args:
        config: the grader dict, e.g. ``{"type": "string_check", "name": "exact",
            "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}``.
        judge: for ``score_model`` graders: a callable used instead of loading ``model``.
        embedder: for ``text_similarity`` with ``cosine``.
        sandbox: for ``python`` graders (default: ``Sandbox()``).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"grader config must be a dict, got {type(config).__name__}")
    kind = config.get("type")
    if kind not in GRADER_TYPES:
        raise ValueError(f"grader type={kind!r}; valid: {', '.join(GRADER_TYPES)}")
    name = config.get("name", kind)

    def need(key: str) -> Any:
        if key not in config:
            raise ValueError(f"{kind} grader {name!r} needs {key!r}; got keys {sorted(config)}")
        return config[key]

    if kind == "string_check":
        return StringCheck(need("input"), need("reference"), need("operation"), name=name)
    if kind == "text_similarity":
        return TextSimilarity(need("input"), need("reference"), need("evaluation_metric"),
                              config.get("pass_threshold"), embedder=embedder, name=name)
    if kind == "python":
        return PythonGrader(need("source"), sandbox=sandbox, name=name)
    if kind == "score_model":
        return ScoreModel(need("input"), model=config.get("model"), range=config.get("range", (0.0, 1.0)),
                          judge=judge, name=name)
    graders = need("graders")
    if not isinstance(graders, Mapping):
        raise ValueError(f"multi grader {name!r}: graders must be a dict name -> grader config")
    subs = {k: from_openai_grader({**v, "name": v.get("name", k)}, judge, embedder, sandbox) for k, v in graders.items()}
    return MultiGrader(subs, need("calculate_output"), name=name)
