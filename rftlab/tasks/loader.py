"""Users' own data: local JSONL / CSV / Parquet files through Hugging Face ``datasets``.

Nothing is downloaded: only local files are read (``datasets``' packaged json/csv/parquet
builders). A column mapping renames the file's columns to rftlab's (``prompt``, ``answer``,
``tests``, ...); GSM8K's ``"... #### 72"`` answers become ``"72"`` (the worked solution is kept in
``solution``); list-valued columns stored as JSON text in CSV (``tests``) are decoded.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rftlab.rewards.answers import NumericAnswer
from rftlab.rewards.base import RewardFn
from rftlab.tasks.base import Row, Task

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
REWARDS = ("numeric", "math", "code")
ANSWER_FORMATS = ("auto", "gsm8k", "plain")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution: what follows ``####``, without thousands separators.

    >>> gsm8k_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\\n#### 1,080")
    '1080'
    """
    match = _GSM8K.search(text)
    if match is None:
        raise ValueError(f"no '#### answer' in {text[:80]!r}")
    return match.group(1).replace(",", "").strip()


def read_rows(path: str | Path, format: str | None = None, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """All rows of a local JSONL/CSV/Parquet file, as dicts, via ``datasets.load_dataset``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    kind = format or FORMATS.get(path.suffix.lower())
    if kind not in set(FORMATS.values()):
        raise ValueError(f"cannot tell the format of {path.name!r}: pass format= one of json, csv, parquet "
                         f"(known extensions: {', '.join(FORMATS)})")
    try:
        import datasets
    except ImportError as err:
        raise ImportError("DatasetTask needs Hugging Face datasets: pip install 'rftlab[data]'") from err
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:
        if kind == "json" and path.suffix.lower() == ".jsonl":
            _check_json_lines(path)  # datasets' error names neither the file nor the line
        raise
    return [dict(row) for row in dataset]


def _check_json_lines(path: Path) -> None:
    """Raise a ValueError naming the file and the first line of ``path`` that is not one JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r}, line {number}: not valid JSON ({err.msg}, column {err.colno}): "
                                 f"{line.strip()[:80]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r}, line {number}: a JSON {type(row).__name__}, not an object "
                                 f"(one row per line, as {{\"prompt\": ...}})")


def _decode_list(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class DatasetTask(Task):
    """A task from local files.

    Args:
        train: the training file (.jsonl, .json, .csv, .parquet).
        test: an optional held-out file; else ``test_size`` training rows are held out.
        columns: rftlab name -> the file's column name, e.g. ``{"prompt": "question"}``; unmapped
            columns keep their names. A ``prompt`` column is required after mapping.
        format: "json", "csv" or "parquet" (default: from the file extension).
        answer_format: "gsm8k" (``#### answer``), "plain", or "auto" (gsm8k when ``####`` appears).
        reward: the verifier: "numeric" (``NumericAnswer``), "math" (``MathAnswer``, math-verify) or
            "code" (``CodeExecution`` on the ``tests`` column).
        rewards: reward functions overriding ``reward`` (name -> fn).
        template: user message; ``{prompt}`` is the prompt column's text.
        system_prompt: system message; "" for none. Prompts already given as chat messages are kept.
        test_size: rows held out from ``train`` when there is no ``test`` file.
        seed: seeds the hold-out draw.
        name: the task name.
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its own).
    """

    def __init__(
        self,
        train: str,
        test: str | None = None,
        columns: Mapping[str, str] | None = None,
        format: str | None = None,
        answer_format: str = "auto",
        reward: str = "numeric",
        rewards: Mapping[str, RewardFn] | None = None,
        template: str = "{prompt}",
        system_prompt: str = "",
        test_size: int = 0,
        seed: int = 0,
        name: str = "dataset",
        cache_dir: str | None = None,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={answer_format!r}; valid: {', '.join(ANSWER_FORMATS)}")
        if reward not in REWARDS:
            raise ValueError(f"reward={reward!r}; valid: {', '.join(REWARDS)}")
        if "{prompt}" not in template:
            raise ValueError(f"template must contain {{prompt}}, got {template!r}")
        if test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}")
        self.columns, self.answer_format, self.reward = dict(columns or {}), answer_format, reward
        self.template, self.system_prompt, self.name = template, system_prompt, name
        self._rewards = dict(rewards) if rewards is not None else None
        rows = [self._convert(r, i, train) for i, r in enumerate(read_rows(train, format, cache_dir))]
        if not rows:
            raise ValueError(f"train file {train!r} has no rows")
        if test is not None:
            self._test = [self._convert(r, i, test) for i, r in enumerate(read_rows(test, format, cache_dir))]
            self._train = rows
        else:
            if test_size >= len(rows):
                raise ValueError(f"test_size={test_size} must be < the {len(rows)} rows of {train!r}")
            order = list(range(len(rows)))
            random.Random(f"dataset-{seed}").shuffle(order)
            held = set(order[:test_size])
            self._test = [rows[i] for i in sorted(held)] or None
            self._train = [r for i, r in enumerate(rows) if i not in held]

    def _convert(self, raw: Mapping[str, Any], index: int, source: str) -> Row:
        mapped = {k: v for k, v in raw.items() if k not in self.columns.values()}
        for ours, theirs in self.columns.items():
            if theirs not in raw:
                raise KeyError(f"{source}: column {theirs!r} (mapped to {ours!r}) not found; columns: {sorted(raw)}")
            mapped[ours] = raw[theirs]
        if "prompt" not in mapped:
            raise KeyError(f"{source}: no 'prompt' column; map one with columns={{'prompt': '<column>'}} "
                           f"(columns: {sorted(raw)})")
        row = {k: _decode_list(v) for k, v in mapped.items()}
        answer = row.get("answer")
        if isinstance(answer, str) and (self.answer_format == "gsm8k" or (self.answer_format == "auto" and "####" in answer)):
            row["solution"], row["answer"] = answer, gsm8k_answer(answer)
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": self.template.format(prompt=prompt)})
            row["prompt"] = messages
        elif not (isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise ValueError(f"{source} row {index}: prompt must be text or chat messages, got {type(prompt).__name__}")
        return row

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row] | None:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        if self._rewards is not None:
            return self._rewards
        return {"correct": _REWARD_FACTORIES[self.reward]()}


def _math() -> RewardFn:
    from rftlab.rewards.math_answer import MathAnswer

    return MathAnswer()


def _code() -> RewardFn:
    from rftlab.rewards.code import CodeExecution

    return CodeExecution()


_REWARD_FACTORIES: dict[str, Callable[[], RewardFn]] = {"numeric": NumericAnswer, "math": _math, "code": _code}
