"""Environments: what answers the model between the turns of a multi-turn episode.

One environment object lives for one episode. The DataModule calls ``reset(row)`` once, samples a
turn, calls ``step(turn_text)``, shows the returned observation messages to the model, and repeats
until ``done``, ``max_turns`` or the token budget. The task's reward functions then score the whole
episode (see ``rftlab.rollout.episodes``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rftlab.environments.tools import Tool, ToolResult, as_tools, parse_tool_calls, run_tool_calls

Message = dict[str, Any]


@dataclass
class Step:
    """What the environment answers to one turn.

    Attributes:
        observation: chat messages the model reads before its next turn (``{"role": "user" or
            "tool", "content": ...}``); ignored when ``done``.
        done: the episode is over.
        reward: an optional reward for this turn; the episode's sum reaches reward functions as
            the ``env_reward`` column (``rftlab.environments.environment_reward`` returns it).
    """

    observation: list[Message] = field(default_factory=list)
    done: bool = False
    reward: float | None = None


class Environment:
    """Base class of multi-turn environments (subclass it, or implement the same methods).

    Attributes:
        tools: tools shown to the model in the prompt (by name); empty for plain environments.
    """

    tools: dict[str, Tool] = {}

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        """The messages that open the episode for task ``row``; None keeps ``row["prompt"]``.

        Must return the same messages for the same row: the G episodes of a group share one prompt.
        """
        return None

    def step(self, text: str) -> Step:
        """Answer the model's turn ``text`` (special tokens removed)."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Counters of this episode (tool calls, errors, ...), summed into the rollout's metrics."""
        return {}


class ToolEnvironment(Environment):
    """Runs the tool calls of each turn; a turn without a call goes to ``inner`` (or ends the episode).

    Args:
        tools: the callable tools, by name (``as_tools``).
        inner: the episode's own environment (a game, a checker), or None: then the first turn
            without a tool call is the answer and ends the episode.
        timeout: seconds per tool call (> 0).
    """

    def __init__(self, tools: dict[str, Tool], inner: Environment | None = None, timeout: float = 10.0) -> None:
        self.tools = dict(tools)
        self.inner = inner
        self.timeout = timeout
        self.counts: dict[str, float] = {}

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        return self.inner.reset(row) if self.inner is not None else None

    def step(self, text: str) -> Step:
        calls = parse_tool_calls(text)
        if not calls:
            return self.inner.step(text) if self.inner is not None else Step(done=True)
        results = run_tool_calls(calls, self.tools, self.timeout)
        self._count(results)
        return Step(observation=[{"role": "tool", "name": r.name, "content": r.content} for r in results])

    def _count(self, results: Sequence[ToolResult]) -> None:
        c = self.counts
        for r in results:
            c["tool_calls"] = c.get("tool_calls", 0) + 1
            c["tool_seconds"] = c.get("tool_seconds", 0.0) + r.seconds
            if r.name in self.tools:
                c[f"calls/{r.name}"] = c.get(f"calls/{r.name}", 0) + 1
            if r.error is not None:
                key = "tool_timeouts" if r.error == "timeout" else "tool_errors"
                c[key] = c.get(key, 0) + 1
                c[f"errors/{r.error}"] = c.get(f"errors/{r.error}", 0) + 1

    def stats(self) -> dict[str, float]:
        inner = self.inner.stats() if self.inner is not None else {}
        return {**inner, **self.counts}


def environment_factory(environment: Callable[[], Environment] | Environment | None, tools: Sequence[Any] | None,
                        tool_timeout: float) -> Callable[[], Environment] | None:
    """One fresh environment per episode: the user's, wrapped in a ``ToolEnvironment`` when tools are given.

    Args:
        environment: a class or function returning a new ``Environment``; or an environment object,
            copied (``copy.deepcopy``) for each episode, as YAML configs give it; or None.
        tools: typed, documented functions (checked here, so a bad tool fails at construction).
        tool_timeout: seconds per tool call.
    """
    checked = as_tools(tools)
    if isinstance(environment, Environment) or (not isinstance(environment, type) and hasattr(environment, "step")):
        template = environment
        environment = lambda: copy.deepcopy(template)  # noqa: E731 - one episode's state per copy
    if environment is not None and not callable(environment):
        raise ValueError(f"environment={environment!r} must be an Environment, or a class or function returning a "
                         "new one for each episode (an environment object holds one episode's state)")
    if not checked:
        return environment
    return lambda: ToolEnvironment(checked, environment() if environment is not None else None, tool_timeout)


def environment_reward(completions: list[str], env_reward: list[float | None] | None = None, **_: Any) -> list[float | None]:
    """The sum of the rewards an environment gave in its ``Step``s (None where it gave none).

    Args:
        completions: the episodes' texts (unused; the reward comes from the environment).
        env_reward: per episode, the sum of its steps' rewards, or None.
    """
    return list(env_reward) if env_reward is not None else [None] * len(completions)
