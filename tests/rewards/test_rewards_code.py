"""CodeExecution: code extraction, fraction of tests passed, the anti-hacking guard, bad input."""

from __future__ import annotations

import pickle

import pytest

from rftlab.rewards import CodeExecution, extract_code


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=3.0)


@pytest.mark.parametrize(
    "text, code",
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("Sure!\n```py\ny = 2\n```\nand\n```python\nz = 3\n```", "y = 2\n"),  # the FIRST python block
        ("```python\ncut = 'off by the token budget'", "cut = 'off by the token budget'"),
        ("```\nuntagged = 1\n```", "```\nuntagged = 1\n```"),  # not tagged python: the whole text
        ("plain = 4", "plain = 4"),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_fraction_of_tests_hand_computed(reward):
    completions = [
        "```python\ndef double(x):\n    return 2 * x\n```",   # passes 2 of 2
        "```python\ndef double(x):\n    return x + 2\n```",   # 2+2 == 4 passes, 0+2 == 0 fails: 1 of 2
        "def double(x):\n    return 'no'",                     # whole text is the code: 0 of 2
        "```python\ndef double(x) return\n```",                # SyntaxError: 0
    ]
    tests = [["assert double(2) == 4", "assert double(0) == 0"]] * 4
    assert reward(completions, tests=tests) == [1.0, 0.5, 0.0, 0.0]
    assert "SyntaxError" in reward.last_results[3].error


def test_tests_may_be_a_single_string_and_see_the_code_namespace(reward):
    code = "import math\nRADIUS = 2\ndef area():\n    return math.pi * RADIUS ** 2"
    assert reward([code], ["assert abs(area() - 4 * math.pi) < 1e-9"]) == [1.0]  # tests positional
    custom = CodeExecution(timeout=3.0, tests_key="unit_tests")
    assert custom([code], unit_tests=[["assert RADIUS == 2", "assert RADIUS == 3"]]) == [0.5]


def test_guard_scores_tests_that_do_not_depend_on_the_code():
    # Test 1 passes whatever `solve` is. With the guard only the tests that fail with the code's own
    # functions stubbed out count: 2 of 3 for the honest code. The hack patches a builtin instead of
    # defining `solve`: the tests run in the judge, whose builtins the code cannot touch, so it
    # passes only the vacuous test, which the guard then discounts.
    tests = ["assert True or solve()", "assert solve(3) == 9", "assert solve(0) == 0"]
    honest = "def solve(x):\n    return x * x"
    hack = "import builtins\nbuiltins.solve = lambda x=0: x * x"  # patches instead of defining solve
    plain, guarded = CodeExecution(timeout=3.0), CodeExecution(timeout=3.0, guard=True)
    assert plain([honest, hack], tests=[tests, tests]) == pytest.approx([1.0, 1 / 3])
    assert guarded([honest, hack], tests=[tests, tests]) == pytest.approx([2 / 3, 0.0])
    assert guarded.last_results[0].guard_passed == [True, False, False]
    assert guarded.last_results[1].guard_passed == [True, False, False]


def test_violation_value_is_configurable():
    reward = CodeExecution(timeout=0.5, violation_value=-1.0)
    assert reward(["while True:\n    pass"], tests=[["assert True"]]) == [-1.0]
    assert reward.last_results[0].violation == "timeout"


def test_no_tests_scores_zero(reward):
    assert reward(["x = 1"], tests=[[]]) == [0.0]


def test_bad_input(reward):
    with pytest.raises(KeyError, match="'tests'"):
        reward(["x = 1"], answer=["1"])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        reward(["x = 1"], tests=[42])
    with pytest.raises(ValueError, match="workers"):
        CodeExecution(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        CodeExecution(timeout=-1)


def test_picklable_for_process_pools(reward):
    reward(["x = 1"], tests=[["assert x == 1"]])
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.last_results == [] and clone(["x = 2"], tests=[["assert x == 2"]]) == [1.0]
