"""Multi-turn environments and tools: what answers the model between its turns.

``RolloutDataModule(tools=[...], environment=..., max_turns=...)`` samples episodes through them;
see ``rftlab.rollout.episodes`` for how an episode becomes one Rollout row.
"""

from rftlab.environments.base import Environment, Step, ToolEnvironment, environment_factory, environment_reward
from rftlab.environments.games import TryAgain, WordleGame
from rftlab.environments.tools import (Tool, ToolCall, ToolResult, as_tool, as_tools, calculator, parse_tool_calls,
                                       python, run_tool_calls, tool_instructions)

__all__ = [
    "Environment",
    "Step",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "TryAgain",
    "WordleGame",
    "as_tool",
    "as_tools",
    "calculator",
    "environment_factory",
    "environment_reward",
    "parse_tool_calls",
    "python",
    "run_tool_calls",
    "tool_instructions",
]
