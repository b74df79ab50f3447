"""Tools a policy may call: plain typed Python functions, their JSON schemas, the call format, execution.

A tool is a function with type hints and a Google-style docstring (one ``Args:`` line per
argument); its JSON schema comes from the signature and docstring, as transformers'
``get_json_schema`` builds it for chat templates. The model calls a tool by writing

    <tool_call>{"name": "calculator", "arguments": {"expression": "1234 * 5678"}}</tool_call>

(the Hermes/Qwen format that tool-aware chat templates document). Every call of a turn is parsed
from the text; each runs on its own thread with a timeout, and whatever goes wrong (malformed JSON,
an unknown name, bad arguments, an exception, a hang, a non-string result) becomes an error message
the model reads as the tool's answer, never an exception in the trainer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a tool's answer is cut here: it becomes prompt tokens of the next turn

#: Why a call produced no normal result (None: it did).
ToolError = Literal["malformed", "unknown_tool", "bad_arguments", "raised", "timeout", "not_string"]


@dataclass(frozen=True)
class Tool:
    """A callable tool with its schema.

    Attributes:
        name: the name the model calls it by (the function's name).
        function: the Python function; called with the model's arguments as keywords.
        schema: the JSON schema (``{"type": "function", "function": {"name", "description",
            "parameters"}}``) shown to the model.
    """

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]


def as_tool(function: Callable[..., Any] | Tool | str) -> Tool:
    """A ``Tool`` from a typed, documented function, or the import path of one (a ``Tool`` is returned as is).

    Raises:
        ValueError: naming the tool, when it is not callable, lacks type hints for an argument or
            the return value, or has no docstring describing every argument.
    """
    if isinstance(function, Tool):
        return function
    if isinstance(function, str):  # an import path, as YAML configs give it
        from rftlab.core.plugins import import_object

        try:
            function = import_object(function)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"tools: {function!r} is not the import path of a tool function such as "
                             f"'rftlab.environments.calculator' ({type(err).__name__}: {err})") from err
    name = getattr(function, "__name__", None) or str(function)
    if not callable(function):
        raise ValueError(f"tools: {name!r} is not callable; a tool is a typed Python function with a docstring")
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(function)
    except Exception as err:  # transformers raises its own parsing exceptions, not ValueError
        raise ValueError(f"tools: {name!r} cannot be a tool: {err}. A tool needs a type hint on every argument "
                         "and a docstring with an 'Args:' line for each") from err
    if "return" not in schema["function"]:
        raise ValueError(f"tools: {name!r} needs a return type hint (the model reads its result as text: -> str)")
    return Tool(name=schema["function"]["name"], function=function, schema=schema)


def as_tools(functions: Sequence[Callable[..., Any] | Tool | str] | None) -> dict[str, Tool]:
    """Tools by name, checked (see ``as_tool``); two tools of one name are refused."""
    tools: dict[str, Tool] = {}
    for fn in functions or []:
        tool = as_tool(fn)
        if tool.name in tools:
            raise ValueError(f"tools: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a turn.

    Attributes:
        name: the tool's name ("" when the call could not be read).
        arguments: the keyword arguments.
        error: "malformed" when the text between the tags is not a JSON object with a string
            "name" and an object "arguments"; None otherwise.
        detail: what was wrong, for the error message the model reads.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: ToolError | None = None
    detail: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{...}</tool_call>`` of ``text``, in order (an unclosed last one included).

    A call whose body is not a JSON object ``{"name": str, "arguments": object}`` comes back with
    ``error="malformed"``. Nested JSON in the arguments is fine (the body is parsed as a whole).
    """
    calls = []
    for match in _CALL.finditer(text):
        body, closing = match.group(1).strip(), match.group(2)
        if not closing:
            calls.append(ToolCall("", error="malformed", detail=f"no {CALL_CLOSE} after {CALL_OPEN}"))
            continue
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", error="malformed", detail=f"not JSON ({err.msg} at character {err.pos})"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(ToolCall("", error="malformed", detail='expected {"name": ..., "arguments": {...}}'))
            continue
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(data["name"], error="malformed", detail='"arguments" must be a JSON object'))
            continue
        calls.append(ToolCall(data["name"], arguments))
    return calls


@dataclass(frozen=True)
class ToolResult:
    """The answer to one call.

    Attributes:
        name: the tool called ("" for a malformed call).
        content: the text the model reads (the result, or an error message).
        error: why there is no normal result, or None.
        seconds: time the call ran (up to its timeout).
    """

    name: str
    content: str
    error: ToolError | None = None
    seconds: float = 0.0


def run_tool_calls(calls: Sequence[ToolCall], tools: dict[str, Tool], timeout: float) -> list[ToolResult]:
    """Run ``calls`` concurrently, each on its own thread for at most ``timeout`` seconds.

    A call still running at its deadline is answered "timed out" and abandoned: a Python thread
    cannot be stopped, so it runs on as a daemon thread whose result is dropped (a tool that can
    hang forever belongs in a subprocess, as the ``python`` tool's sandbox is).

    Args:
        calls: the parsed calls of one or several turns.
        tools: the available tools, by name.
        timeout: seconds per call (> 0).
    """
    results: list[ToolResult | None] = [None] * len(calls)
    threads: list[tuple[int, threading.Thread, dict[str, Any]]] = []
    for i, call in enumerate(calls):
        if call.error is not None:
            results[i] = ToolResult(call.name, f"Error: malformed tool call: {call.detail}", call.error)
        elif call.name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            results[i] = ToolResult(call.name, f"Error: unknown tool {call.name!r}; available: {known}", "unknown_tool")
        else:
            box: dict[str, Any] = {}
            thread = threading.Thread(target=_call_into, args=(tools[call.name], call.arguments, box), daemon=True,
                                      name=f"rftlab-tool-{call.name}")
            thread.start()
            threads.append((i, thread, box))
    for i, thread, box in threads:
        thread.join(max(0.0, box["start"] + timeout - time.perf_counter()) if "start" in box else timeout)
        name = calls[i].name
        if thread.is_alive():
            results[i] = ToolResult(name, f"Error: {name} timed out after {timeout:g} s", "timeout", timeout)
        else:
            results[i] = box["result"]
    return [r for r in results if r is not None]


def _call_into(tool: Tool, arguments: dict[str, Any], box: dict[str, Any]) -> None:
    """Run one call and leave its ``ToolResult`` in ``box`` (the thread's target)."""
    box["start"] = start = time.perf_counter()
    try:
        value = tool.function(**arguments)
    except TypeError as err:
        # Wrong or missing argument names reach the function as a TypeError from the call itself.
        box["result"] = ToolResult(tool.name, f"Error: bad arguments for {tool.name}: {err}", "bad_arguments",
                                   time.perf_counter() - start)
        return
    except Exception as err:  # noqa: BLE001 - any failure of user code is an observation, never a crash
        box["result"] = ToolResult(tool.name, f"Error: {tool.name} raised {type(err).__name__}: {err}", "raised",
                                   time.perf_counter() - start)
        return
    seconds = time.perf_counter() - start
    if not isinstance(value, str):
        box["result"] = ToolResult(tool.name, f"Error: {tool.name} returned {type(value).__name__}, not text",
                                   "not_string", seconds)
        return
    if len(value) > MAX_RESULT_CHARS:
        value = value[:MAX_RESULT_CHARS] + " ...[cut]"
    box["result"] = ToolResult(tool.name, value, None, seconds)


def tool_instructions(tools: dict[str, Tool]) -> str:
    """The system-prompt text that describes ``tools`` to a model whose chat template cannot.

    Used when the tokenizer's chat template has no ``tools`` support (SmolLM2's has none): each
    tool's name, description and parameters as one JSON line inside ``<tools>`` tags, and the call
    format, as tool-aware templates (Qwen 2.5, Hermes) render them, kept short because every
    prompt token is paid for at every step.
    """
    lines = []
    for tool in tools.values():
        fn = tool.schema["function"]
        lines.append(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                 "parameters": fn.get("parameters", {}).get("properties", {})}, ensure_ascii=False))
    return ("You can call these tools:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
            'To call one, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call> and stop; '
            "the result comes back in <tool_response> tags. Give the final answer without a tool call.")


# ---- built-in tools -------------------------------------------------------------------------------

def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "1234 * 5678"
    """
    from rftlab.rewards.expr import evaluate_arithmetic

    value, _ = evaluate_arithmetic(expression)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


def python(code: str) -> str:
    """Run Python code in an isolated sandbox and return what it printed.

    Args:
        code: a Python program; print the values you want to see
    """
    from rftlab.rewards.sandbox import Sandbox

    result = Sandbox(timeout=5.0, memory_mb=256, max_output_bytes=4096).run(code, mode="script")
    out = result.stdout
    if result.error:
        out += ("\n" if out else "") + f"Error: {result.error}"
    if result.violation:
        out += ("\n" if out else "") + f"Error: the program was stopped ({result.violation})"
    return out or "(no output)"
