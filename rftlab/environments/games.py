"""Ready-made multi-turn environments: a checker that says "try again", and Wordle with feedback."""

from __future__ import annotations

import re
from typing import Any

from rftlab.environments.base import Environment, Message, Step
from rftlab.tasks.base import Task
from rftlab.tasks.wordle import SYSTEM_PROMPT, feedback, load_words, render_feedback

_GUESS = re.compile(r"<guess>\s*([A-Za-z]+)\s*</guess>", re.IGNORECASE)


class TryAgain(Environment):
    """Answers every wrong turn with "try again", until the task's verifier accepts one.

    The episode ends at the first accepted turn (step reward ``decay ** attempts_before``) or after
    ``max_attempts`` turns. Held-out accuracy with it is "solved within the attempts": the task's
    verifier reads the episode, whose last number (or answer) is the last turn's.

    Args:
        task: the task whose ``is_correct`` checks each turn.
        max_attempts: turns the model gets (>= 1); match the DataModule's ``max_turns``.
        message: what the model reads after a wrong turn.
        decay: step reward of a turn accepted after k wrong ones: ``decay ** k`` (in (0, 1]).
    """

    def __init__(self, task: Task, max_attempts: int = 3, message: str = "That is not right. Try again.",
                 decay: float = 0.5) -> None:
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts!r} is invalid: must be an integer >= 1")
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay!r} is invalid: must be in (0, 1]")
        self.task, self.max_attempts, self.message, self.decay = task, max_attempts, message, decay
        self.row: dict[str, Any] = {}
        self.attempts = 0

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        self.row, self.attempts = dict(row), 0
        return None

    def step(self, text: str) -> Step:
        self.attempts += 1
        if self.task.is_correct(text, self.row):
            return Step(done=True, reward=self.decay ** (self.attempts - 1))
        if self.attempts >= self.max_attempts:
            return Step(done=True, reward=0.0)
        return Step([{"role": "user", "content": self.message}])

    def stats(self) -> dict[str, float]:
        return {"attempts": float(self.attempts)}


class WordleGame(Environment):
    """Wordle played over turns: the model guesses, the environment answers with per-letter feedback.

    Rows need a ``secret`` column (``rftlab.tasks.Wordle`` rows have one). The episode ends when
    the secret is guessed (step reward 1) or after ``max_guesses`` guesses (reward 0). A turn
    without a valid ``<guess>`` of a five-letter word costs a guess and says why.

    Args:
        max_guesses: guesses per game (>= 1); match the DataModule's ``max_turns``.
        allowed_words: accept only words of the bundled list (True) or any five letters.
    """

    def __init__(self, max_guesses: int = 6, allowed_words: bool = False) -> None:
        if not isinstance(max_guesses, int) or max_guesses < 1:
            raise ValueError(f"max_guesses={max_guesses!r} is invalid: must be an integer >= 1")
        self.max_guesses, self.allowed_words = max_guesses, allowed_words
        self.secret = ""
        self.guesses: list[str] = []

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        if "secret" not in row:
            raise ValueError(f"WordleGame needs rows with a 'secret' column; got {sorted(row)}")
        self.secret, self.guesses = str(row["secret"]).lower(), []
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Make your first guess. You have {self.max_guesses} guesses."}]

    def step(self, text: str) -> Step:
        match = _GUESS.findall(text)
        guess = match[-1].lower() if match else ""
        self.guesses.append(guess)
        left = self.max_guesses - len(self.guesses)
        if guess == self.secret:
            return Step(done=True, reward=1.0)
        if left <= 0:
            return Step(done=True, reward=0.0)
        if len(guess) != 5 or (self.allowed_words and guess not in load_words()):
            why = "no <guess>word</guess> found" if not guess else f"{guess!r} is not a five-letter word"
            return Step([{"role": "user", "content": f"Invalid guess: {why}. {left} guesses left."}])
        shown = render_feedback(guess, feedback(guess, self.secret))
        return Step([{"role": "user", "content": f"{shown}\n{left} guesses left."}])

    def stats(self) -> dict[str, float]:
        return {"guesses": float(len(self.guesses)), "solved": float(self.secret in self.guesses)}
