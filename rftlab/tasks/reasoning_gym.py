"""Any procedural dataset of reasoning-gym as a task: its questions, its own verifier, a fixed held-out split.

reasoning-gym (``pip install 'rftlab[gym]'``) generates ~100 kinds of problems (arithmetic,
counting, string manipulation, logic, sequences, games) from a seed, each with a ``score_answer``
verifier. ``ReasoningGym("basic_arithmetic", min_terms=2, max_terms=3)`` wraps one: training rows
come from one seed and the held-out split from another, the model's answer is extracted from its
completion (``<answer>`` tags, or a stated answer when a small model writes none) and scored by
the dataset's own ``score_answer``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rftlab.rewards.answers import _NUMBER  # the numbers NumericAnswer reads, thousands separators included
from rftlab.rewards.base import RewardFn
from rftlab.tasks.arithmetic import _GeneratedRows
from rftlab.tasks.base import Row, Task

#: How the answer is read from a completion: the last ``<answer>...</answer>`` (reasoning-gym's own
#: format); "flexible", the tag or else an "answer is X" phrase or else the last line, tidied;
#: "last_number", the tag or else the last number written (the GSM8K convention, for numeric
#: answers); the last non-empty line; or the whole completion.
EXTRACTIONS = ("answer_tag", "flexible", "last_number", "last_line", "whole")
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful solver. Be brief. End your reply with the final answer in <answer></answer> "
    "tags, like <answer>7</answer>."
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
TEST_SEED_OFFSET = 1_000_003  # the held-out split's seed: the training seed + this, unless test_seed is given
#: reasoning-gym generates row i of a dataset from ``Random(seed + i)``, so datasets seeded 0 and 1
#: would share all rows but one. A task's seed is spread by this factor (beyond the held-out and spare
#: offsets) so that every seed draws its own rows; seed 0 draws what it always did.
SEED_STRIDE = 10_000_019


def _tidy(answer: str) -> str:
    """Markdown, quotes and a closing full stop removed; an equation's right-hand side kept.

    >>> _tidy('**"5 - 5 = 0."**')
    '0'
    """
    text, before = answer, None
    while text != before:  # peel nested markup: **"0."**
        before, text = text, text.strip().strip("*`\"'").rstrip(".")
    return text.rsplit("=", 1)[-1].strip() if "=" in text else text


def extract_answer(completion: str, how: str | Callable[[str], str | None] = "answer_tag") -> str | None:
    """The answer part of ``completion`` (None when there is none).

    Every mode returns one string, so writing several candidate answers never helps a policy: the
    verifier sees only the one picked here.

    Args:
        completion: the model's text.
        how: one of ``EXTRACTIONS``, or a function from the completion to the answer (or None).

    >>> extract_answer("5 - 5 = 0", "flexible"), extract_answer("There are 3 + 4 = 7 legs.", "last_number")
    ('0', '7')
    """
    if callable(how):
        return how(completion)
    if how == "last_line":
        lines = [line.strip() for line in completion.splitlines() if line.strip()]
        return lines[-1] if lines else None
    if how == "whole":
        return completion.strip() or None
    found = _ANSWER.findall(completion)
    tagged = found[-1].strip() if found else None
    if how == "answer_tag":
        return tagged
    if how == "last_number":
        numbers = _NUMBER.findall(completion if tagged is None else tagged)
        if numbers:
            return numbers[-1].replace(",", "")
        return tagged or None
    # flexible: the tag, else the last "answer is X" / "Answer: X", else the last line.
    if tagged is None:
        phrases = _ANSWER_PHRASE.findall(completion)
        lines = [line for line in completion.splitlines() if line.strip()]
        tagged = phrases[-1] if phrases else (lines[-1] if lines else "")
    return _tidy(tagged) or None


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("ReasoningGym needs the reasoning-gym package: pip install 'rftlab[gym]' "
                          "(or pip install reasoning-gym)") from err
    return reasoning_gym


class GymScore:
    """The reward of a reasoning-gym dataset: ``score_answer(extracted answer, entry)``, in [0, 1].

    A completion without an answer scores 0, and so does a verifier that raises or returns a value
    outside [0, 1] or NaN (clamped), so the reward stays in its documented range.

    Args:
        dataset: the reasoning-gym dataset whose ``score_answer`` verifies.
        extract: how the answer is read (see ``extract_answer``).
    """

    name = "gym_score"

    def __init__(self, dataset: Any, extract: str | Callable[[str], str | None] = "flexible") -> None:
        self.dataset = dataset
        self.extract = extract

    def __call__(self, completions: Sequence[str], entry: Sequence[Mapping[str, Any]] | None = None,
                 **_: Any) -> list[float]:
        if entry is None:
            raise KeyError("gym_score needs the task column 'entry' (the reasoning-gym item)")
        return [self.score(c, e) for c, e in zip(completions, entry)]

    def score(self, completion: str, entry: Mapping[str, Any]) -> float:
        """Score one completion against one reasoning-gym item."""
        answer = extract_answer(completion, self.extract)
        if answer is None:
            return 0.0
        try:
            value = float(self.dataset.score_answer(answer, dict(entry)))
        except Exception:  # noqa: BLE001 - a verifier's bug is a wrong answer, never a crashed run
            return 0.0
        return 0.0 if math.isnan(value) else min(1.0, max(0.0, value))


class ReasoningGym(Task):
    """A reasoning-gym procedural dataset as a task (needs ``pip install 'rftlab[gym]'``).

    Rows: ``prompt`` (system + user messages), ``answer`` (the reference, for SFT and reading) and
    ``entry`` (the reasoning-gym item the verifier needs). The held-out split is generated from its
    own seed and never shares a question with the training rows. A few reasoning-gym generators
    (``isomorphic_strings``) iterate over Python sets, so their rows also depend on the string hash
    seed: set ``PYTHONHASHSEED`` when rows must match across processes.

    Args:
        name: the dataset's name in reasoning-gym (``basic_arithmetic``, ``letter_counting``, ...).
        num_train: training rows (generated lazily, row i from ``(seed, i)``).
        num_test: held-out rows.
        seed: seeds the training rows (reasoning-gym's seed ``seed * 10000019``: its row i comes from
            its seed + i, so nearby seeds are spread apart).
        test_seed: reasoning-gym's seed of the held-out rows (default: ``seed * 10000019 + 1000003``).
        extract: how the answer is read from a completion: "flexible" (the last ``<answer>...</answer>``,
            else an "answer is X" phrase, else the last line), "answer_tag" (the tag only),
            "last_number" (for numeric answers), "last_line", "whole", or a function.
        system_prompt: the system message ("" for none); the default asks for a brief reply ending in
            ``<answer>`` tags.
        config: the dataset's own options (``min_terms``, ``max_digits``, ...), as from YAML.
        **options: the dataset's own options, as keywords (merged over ``config``).
    """

    name = "reasoning_gym"

    def __init__(
        self,
        name: str,
        num_train: int = 10_000,
        num_test: int = 200,
        seed: int = 0,
        test_seed: int | None = None,
        extract: Literal["flexible", "answer_tag", "last_number", "last_line", "whole"] | Callable[[str], str | None] = "flexible",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        config: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not callable(extract) and extract not in EXTRACTIONS:
            raise ValueError(f"extract={extract!r} is invalid: must be one of {', '.join(EXTRACTIONS)} or a function")
        if num_train < 1:
            raise ValueError(f"num_train={num_train!r} is invalid: must be >= 1")
        if num_test < 0:
            raise ValueError(f"num_test={num_test!r} is invalid: must be >= 0")
        gym = _import_reasoning_gym()
        known = sorted(getattr(getattr(gym, "factory", None), "DATASETS", {}) or [])
        if known and name not in known:
            close = [k for k in known if name.split("_")[0] in k][:8] or known[:8]
            raise ValueError(f"name={name!r} is not a reasoning-gym dataset; e.g. {', '.join(close)} "
                             f"({len(known)} in all: reasoning_gym.factory.DATASETS)")
        self.gym_name = name
        self.name = name
        self.options = {**dict(config or {}), **options}
        self.seed = seed
        base = seed * SEED_STRIDE
        self.test_seed = base + TEST_SEED_OFFSET if test_seed is None else test_seed
        self.extract = extract
        self.system_prompt = system_prompt
        try:
            self._train_ds = gym.create_dataset(name, size=num_train, seed=base, **self.options)
            self._spare_ds = gym.create_dataset(name, size=num_train, seed=base + 2 * TEST_SEED_OFFSET, **self.options)
            test_ds = gym.create_dataset(name, size=max(num_test, 1), seed=self.test_seed, **self.options)
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"reasoning-gym dataset {name!r} refused the options {self.options}: "
                             f"{type(err).__name__}: {err}") from err
        self._test = [self._row(test_ds[i]) for i in range(num_test)]
        self._test_questions = {r["entry"]["question"] for r in self._test}
        self._train = _GeneratedRows(num_train, self._train_row)

    def _train_row(self, index: int) -> Row:
        entry = self._train_ds[index]
        if entry["question"] in self._test_questions:  # keep the held-out split unseen
            entry = self._spare_ds[index]
        return self._row(entry)

    def _row(self, entry: Mapping[str, Any]) -> Row:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": str(entry["question"])})
        return {"prompt": messages, "answer": str(entry["answer"]), "entry": dict(entry)}

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"correct": GymScore(self._train_ds, self.extract)}

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"ReasoningGym({self.gym_name!r}{options}, seed={self.seed})"
