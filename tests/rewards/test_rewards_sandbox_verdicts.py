"""The verdict is decided where the submission cannot reach: for ``assert <expression> == <literal>``
tests only the expression runs in the sandbox, its value comes back as plain data, and the trainer
compares it with the expected value, which never enters the sandbox.

Each attack is a completion a reward-hunting policy could write; after each, an honest sample
still scores 1.0 and a wrong one 0.0.
"""

from __future__ import annotations

import textwrap

import pytest

from rftlab.rewards import CodeExecution
from rftlab.rewards.code import split_test

TESTS = ["assert add(1, 2) == 3", "assert add(20, 22) == 42"]
HONEST = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=2.0, memory_mb=256, max_processes=8, max_output_bytes=4096)


def _then_honest(reward):
    assert reward([HONEST, WRONG], tests=[TESTS, TESTS]) == [1.0, 0.0]


ATTACKS = {
    # An object whose comparisons always succeed: only plain data crosses, and == runs in the trainer.
    "always-equal object": """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def add(a, b):
            return Anything()
    """,
    # An int subclass that equals everything.
    "always-equal int subclass": """
        class S(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return S(0)
    """,
    # Read the hidden tests (with their expected values) from the harness's memory and answer them.
    "read the tests from memory": """
        import gc, re
        answers = {}
        for obj in gc.get_objects():
            if isinstance(obj, dict) and isinstance(obj.get("tests"), list):
                for test in obj["tests"]:
                    m = re.match(r"assert add\\((\\d+), (\\d+)\\) == (\\d+)", str(test))
                    if m:
                        answers[(int(m[1]), int(m[2]))] = int(m[3])
        assert answers, "the expected values are not in the sandbox"
        def add(a, b):
            return answers[(a, b)]
    """,
    # Replace the builtins the comparison would use.
    "patched builtins": """
        import builtins
        builtins.AssertionError = type("Never", (Exception,), {})
        builtins.bool = lambda *a: True
        def add(a, b):
            return None
    """,
    # Write a verdict of its own and leave before the harness reports.
    "forged verdict": """
        import os, sys
        os.write(int(sys.argv[1]), b'{"stage": "done", "passed": [true, true], "error": null}\\n')
        os._exit(0)
    """,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_on_the_verdict_scores_nothing(reward, name):
    score = reward([textwrap.dedent(ATTACKS[name])], tests=[TESTS])[0]
    assert score == 0.0, f"{name}: scored {score}"
    _then_honest(reward)


def test_the_expected_values_never_enter_the_sandbox():
    assert split_test("assert add(1, 2) == 3") == ("add(1, 2)", 3, "==")
    assert split_test("assert is_even(4) is True") == ("is_even(4)", True, "is")
    assert split_test("assert f([1, (2, 3)]) == {'a': [1.5]}") == ("f([1, (2, 3)])", {"a": [1.5]}, "==")
    for other in ["assert add(1, 2) == x", "assert add(1, 2) > 2", "assert add(1, 2) == 3, 'msg'",
                  "check(add)", "assert f(1) is 3", "x = 1\nassert x == 1"]:
        assert split_test(other) is None, other


def test_values_keep_their_python_semantics(reward):
    cases = {
        "def f():\n    return (1, 2)\n": (["assert f() == (1, 2)", "assert f() == [1, 2]"], [True, False]),
        "def f():\n    return 3.0\n": (["assert f() == 3", "assert f() is True"], [True, False]),
        "def f():\n    return {'k': [1, None, 'x']}\n": (["assert f() == {'k': [1, None, 'x']}"], [True]),
        "def f():\n    return float('nan')\n": (["assert f() == float('nan')"], [False]),
        # Not a literal: the whole list falls back to asserts run in the sandbox, with Python's result.
        "def f():\n    return 10 ** 30\n": (["assert f() == 10 ** 30", "assert f() == 1000000000000000000000000000000"], [True, True]),
        "def f():\n    return 2 ** 70\n": (["assert f() == 1180591620717411303424"], [True]),
    }
    for code, (tests, expected) in cases.items():
        reward([code], tests=[tests])
        assert reward.last_results[0].passed == expected, (code, tests)
