"""Tools: schemas from typed functions, the call format, execution faults as observations."""

import threading
import time

import pytest

from rftlab.environments import (Step, ToolEnvironment, as_tool, as_tools, calculator, environment_factory,
                                 parse_tool_calls, run_tool_calls, tool_instructions)


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return str(a + b)


def test_schema_comes_from_signature_and_docstring():
    tool = as_tool(add)
    fn = tool.schema["function"]
    assert tool.name == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {"a": {"type": "integer", "description": "the first"},
                                              "b": {"type": "integer", "description": "the second"}}
    assert fn["parameters"]["required"] == ["a", "b"]
    assert '"name": "add"' in tool_instructions({"add": tool}) and "<tool_call>" in tool_instructions({"add": tool})


def untyped(a):
    """No hints.

    Args:
        a: something
    """
    return a


def undocumented(a: int) -> str:
    return str(a)


def no_return_hint(a: int):
    """Missing the return hint.

    Args:
        a: something
    """
    return str(a)


@pytest.mark.parametrize("fn", [untyped, undocumented, no_return_hint, "not a function"])
def test_tools_without_hints_or_docstring_are_refused_naming_the_tool(fn):
    name = getattr(fn, "__name__", "not a function")
    with pytest.raises(ValueError, match=f"tools: '{name}'"):
        environment_factory(None, [fn], 1.0)


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        as_tools([add, add])


def test_environment_is_a_factory_or_an_object_copied_per_episode():
    with pytest.raises(ValueError, match="environment=.*class or function"):
        environment_factory(42, None, 1.0)
    template = Guess()
    make = environment_factory(template, None, 1.0)
    first, second = make(), make()
    assert isinstance(first, Guess) and first is not second and first is not template


def test_parse_valid_nested_and_several_calls():
    text = ('I will call. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
            '<tool_call>\n{"name": "lookup", "arguments": {"q": {"nested": [1, {"x": "}"}]}}}\n</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("add", {"a": 1, "b": 2}, None), ("lookup", {"q": {"nested": [1, {"x": "}"}]}}, None)]
    assert parse_tool_calls("no call here") == []
    # arguments given as a JSON string are read too
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')[0].arguments == {"a": 1}


@pytest.mark.parametrize("body, detail", [
    ('{"name": "add", "arguments": {"a": 1', "not JSON"),
    ('["add"]', "expected"),
    ('{"arguments": {}}', "expected"),
    ('{"name": "add", "arguments": [1, 2]}', "must be a JSON object"),
])
def test_malformed_calls_are_marked(body, detail):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error == "malformed" and detail in call.detail
    (unclosed,) = parse_tool_calls('<tool_call>{"name": "add", "arguments": {}}')
    assert unclosed.error == "malformed" and "no </tool_call>" in unclosed.detail


def raises(x: int) -> str:
    """Always fails.

    Args:
        x: ignored
    """
    raise RuntimeError("boom")


def hangs(x: int) -> str:
    """Never returns in time.

    Args:
        x: seconds to sleep
    """
    time.sleep(x)
    return "late"


def not_text(x: int) -> str:
    """Returns a number despite its hint.

    Args:
        x: anything
    """
    return x  # type: ignore[return-value]


def test_every_fault_becomes_an_error_observation():
    tools = as_tools([add, raises, hangs, not_text])
    text = "".join(f"<tool_call>{body}</tool_call>" for body in [
        '{"name": "add", "arguments": {"a": 2, "b": 3}}',
        '{"name": "raises", "arguments": {"x": 1}}',
        '{"name": "hangs", "arguments": {"x": 30}}',
        '{"name": "not_text", "arguments": {"x": 7}}',
        '{"name": "nope", "arguments": {}}',
        '{"name": "add", "arguments": {"c": 1}}',
        '{"name": "add", "arguments": oops}',
    ])
    start = time.perf_counter()
    results = run_tool_calls(parse_tool_calls(text), tools, timeout=0.5)
    assert time.perf_counter() - start < 5  # the hanging call is abandoned at its timeout
    assert [r.error for r in results] == [None, "raised", "timeout", "not_string", "unknown_tool", "bad_arguments",
                                          "malformed"]
    assert results[0].content == "5"
    assert "RuntimeError: boom" in results[1].content and "timed out" in results[2].content
    assert "available: add, hangs, not_text, raises" in results[4].content
    assert all(r.content.startswith("Error:") for r in results[1:])


def sleepy(x: float) -> str:
    """Sleeps.

    Args:
        x: seconds
    """
    time.sleep(x)
    return str(threading.get_ident())


def test_calls_run_concurrently():
    tools = as_tools([sleepy])
    calls = parse_tool_calls('<tool_call>{"name": "sleepy", "arguments": {"x": 0.5}}</tool_call>' * 4)
    start = time.perf_counter()
    results = run_tool_calls(calls, tools, timeout=10)
    assert time.perf_counter() - start < 1.5  # four 0.5 s calls overlap
    assert all(r.error is None for r in results) and len({r.content for r in results}) == 4


def test_calculator_is_exact_and_refuses_code():
    assert calculator("1234 * 5678") == "7006652"
    assert calculator("(7 - 1) / 4") == "1.5"
    results = run_tool_calls(parse_tool_calls(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>'),
        as_tools([calculator]), timeout=5)
    assert results[0].error == "raised"


class Guess:  # an environment by duck typing (reset, step)
    """A one-question inner environment: "7" ends the episode with reward 1."""

    def reset(self, row):
        return None

    def step(self, text):
        return Step(done=True, reward=1.0) if "7" in text else Step([{"role": "user", "content": "try again"}])

    def stats(self):
        return {"guesses": 1}


def test_tool_environment_routes_calls_to_tools_and_answers_to_the_inner_environment():
    env = environment_factory(Guess, [add, raises], 2.0)()
    step = env.step('<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'
                    '<tool_call>{"name": "raises", "arguments": {"x": 0}}</tool_call>')
    assert not step.done
    assert [m["role"] for m in step.observation] == ["tool", "tool"] and step.observation[0]["content"] == "7"
    assert env.step("it is 6").observation == [{"role": "user", "content": "try again"}]
    final = env.step("it is 7")
    assert final.done and final.reward == 1.0
    stats = env.stats()
    assert stats["tool_calls"] == 2 and stats["calls/add"] == 1 and stats["tool_errors"] == 1
    assert stats["errors/raised"] == 1 and stats["guesses"] == 1
    # without an inner environment, the first answer without a call ends the episode
    alone = environment_factory(None, [add], 2.0)()
    assert alone.step("the answer is 7").done


def test_tools_by_import_path_as_yaml_gives_them():
    assert as_tools(["rftlab.environments.calculator"])["calculator"].function is calculator
    with pytest.raises(ValueError, match="tools: 'rftlab.environments.nope' is not the import path"):
        as_tools(["rftlab.environments.nope"])


def test_the_python_tool_runs_code_in_the_sandbox():
    from rftlab.environments import python

    assert python("print(6 * 7)").strip() == "42"
    assert "Error" in python("raise ValueError('no')") and python("x = 1") == "(no output)"
