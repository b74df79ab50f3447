"""The verdict is decided where the submission cannot reach.

The tests run in a judge process, apart from the submission's; the submission's names are handles
there, every call sends its arguments and its answer as plain data (fresh built-in values), and
the comparisons run in the judge. The tests never enter the submission's process.

Each attack is a completion a reward-hunting policy could write, tried against tests of several
forms (an expected literal, a HumanEval-style ``check(candidate)``, a computed comparison, a truth
value); after each, an honest sample still scores 1.0 and a wrong one 0.0.
"""

from __future__ import annotations

import textwrap

import pytest

from rftlab.rewards import CodeExecution

FORMS = {
    "literal": ["assert add(1, 2) == 3", "assert add(20, 22) == 42"],
    "check(candidate)": ["def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n\ncheck(add)"],
    "computed": ["assert abs(add(0.5, 0.25) - 3 / 4) < 1e-9", "assert add(2, 3) > add(1, 1)"],
    "truth value": ["assert add(1, 1) and not add(1, -1)", "assert add(2, 2) in (4,)"],
}
HONEST = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b - 1\n"


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=3.0, memory_mb=256, max_processes=8, max_output_bytes=4096)


def _then_honest(reward, tests):
    assert reward([HONEST, WRONG], tests=[tests, tests]) == [1.0, 0.0]


ATTACKS = {
    # An object whose comparisons, truth value and arithmetic all say "yes": it stays a handle in the
    # judge, where it equals no plain value and has no arithmetic.
    "always-equal object": """
        class Anything:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            def __lt__(self, other): return True
            __gt__ = __le__ = __ge__ = __lt__
            def __bool__(self): return False
            def __sub__(self, other): return 0
            __rsub__ = __add__ = __radd__ = __sub__
            def __abs__(self): return 0
            def __hash__(self): return 0
        def add(a, b):
            return Anything()
    """,
    # Subclasses of built-in types cross as the value they hold (int.__index__, str.__str__ ...),
    # so their own __eq__ never runs in the judge.
    "always-equal int and str subclasses": """
        class I(int):
            def __eq__(self, other): return True
            def __bool__(self): return False
            __hash__ = int.__hash__
        class T(tuple):
            def __eq__(self, other): return True
            __hash__ = tuple.__hash__
        def add(a, b):
            return I(-999) if isinstance(a, int) else T()
    """,
    # Look for the hidden tests in every object of the process, and answer them if found.
    "read the tests from memory": """
        import gc, re, sys
        answers = {}
        seen = [o for o in gc.get_objects() if isinstance(o, (dict, list, tuple))]
        frame = sys._getframe()
        while frame is not None:
            seen.append(frame.f_locals)
            frame = frame.f_back
        for obj in seen:
            for text in (obj.values() if isinstance(obj, dict) else obj):
                for m in re.finditer(r"add\\((-?[\\d.]+), (-?[\\d.]+)\\)", str(text)):
                    answers[(float(m[1]), float(m[2]))] = True
        assert answers, "no test is in this process"
        def add(a, b):
            return a + b
    """,
    # Patch the builtins the comparison and the assertion would use.
    "patched builtins": """
        import builtins
        builtins.AssertionError = type("Never", (Exception,), {})
        builtins.bool = lambda *a: True
        builtins.abs = lambda *a: 0
        builtins.isinstance = lambda *a: True
        def add(a, b):
            return None
    """,
    # From inside the function under test, walk up the stack to the harness and rewrite it: its
    # globals, its functions, its verdict.
    "rewrite the harness from the call stack": """
        import sys
        def add(a, b):
            frame = sys._getframe(1)
            while frame is not None:
                g = frame.f_globals
                for name in list(g):
                    if callable(g[name]) and name.startswith("_") and not name.startswith("__"):
                        g[name] = lambda *x, **k: {"stage": "done", "passed": [True] * 9}
                g["AssertionError"] = KeyboardInterrupt
                frame = frame.f_back
            return None
    """,
    # Replace the harness module of its process so that every answer is a comparison that succeeds.
    "replace the harness module": """
        import sys
        for harness in [m for m in list(sys.modules.values()) if hasattr(m, "_answer")]:
            for name in dir(harness):
                if name.startswith("_") and callable(getattr(harness, name)) and not name.startswith("__"):
                    setattr(harness, name, lambda *a, **k: {"value": {"v": True}, "args": [], "kwargs": {}})
        assert harness, "no harness module found"
        def add(a, b):
            return None
    """,
    # Kill whatever else it can see, the judge included, then answer.
    "kill the judge": """
        import os, signal
        for target in (os.getppid(), -1):
            try:
                os.kill(target, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        def add(a, b):
            return None
    """,
    # Leave in the middle of the tests, hoping the verdicts so far count.
    "leave during the tests": """
        import os
        calls = []
        def add(a, b):
            calls.append(1)
            if len(calls) > 1:
                os._exit(0)
            return a + b
    """,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_on_the_verdict_scores_nothing(reward, name, form):
    score = reward([textwrap.dedent(ATTACKS[name])], tests=[FORMS[form]])[0]
    assert score == 0.0, f"{name} against {form} tests: scored {score} ({reward.last_results[0]})"
    _then_honest(reward, FORMS[form])


def test_the_tests_never_enter_the_submission(reward):
    # The function answers correctly only if no object of its process holds the marker of the tests.
    probe = textwrap.dedent("""
        import gc
        def add(a, b):
            marker = "-".join(["MARKER", "7f3a"])  # built here, so that this source does not hold it
            leaked = any(marker in repr(o) for o in gc.get_objects() if isinstance(o, (dict, list, tuple)))
            return "leaked" if leaked else a + b
    """)
    assert reward([probe], tests=[["assert add(1, 2) == 3  # MARKER-7f3a"]]) == [1.0]
    # The probe does find what is in its process: a marker in its own data.
    assert reward([probe + "SEEN = ['MARKER-7f3a']\n"], tests=[["assert add(1, 2) == 3"]]) == [0.0]


def test_values_keep_their_python_semantics(reward):
    cases = {
        "def f():\n    return (1, 2)\n": (["assert f() == (1, 2)", "assert f() == [1, 2]"], [True, False]),
        "def f():\n    return 3.0\n": (["assert f() == 3", "assert f() is True", "assert isinstance(f(), float)"], [True, False, True]),
        "def f():\n    return {1: 'a', (2, 3): {4}}\n": (["assert f() == {1: 'a', (2, 3): {4}}"], [True]),
        "def f():\n    return float('nan')\n": (["assert f() == float('nan')", "assert f() != f()"], [False, True]),
        "def f():\n    return 10 ** 5000\n": (["assert f() == 10 ** 5000", "assert f() == 10 ** 5000 + 1"], [True, False]),
        "def f():\n    return b'ab', 1 + 2j, frozenset({1})\n": (["assert f() == (b'ab', 1 + 2j, frozenset({1}))"], [True]),
        # Subclasses arrive as the built-in value they hold.
        "from collections import namedtuple, Counter\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2), Counter('aab')\n":
            (["assert f()[0] == (1, 2)", "assert f()[1] == {'a': 2, 'b': 1}"], [True, True]),
        # Lists, dicts and sets changed in place travel back.
        "def srt(xs):\n    xs.sort()\n": (["xs = [3, 1, 2]\nsrt(xs)\nassert xs == [1, 2, 3]"], [True]),
        # Exceptions keep their built-in type.
        "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n":
            (["try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')"], [True]),
        # Objects that are not plain data are handles: their methods, attributes, items, length and iteration work.
        "class Node:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n    def __len__(self):\n        return 1 + (len(self.nxt) if self.nxt else 0)\n"
        "def build(xs):\n    h = None\n    for x in reversed(xs):\n        h = Node(x, h)\n    return h\n":
            (["h = build([1, 2])\nassert h.v == 1 and h.nxt.v == 2 and h.nxt.nxt is None and len(h) == 2"], [True]),
        "class Solution:\n    def two(self, nums, t):\n        return [i for i in range(len(nums)) for j in range(i) if nums[i] + nums[j] == t][:1]\n":
            (["assert Solution().two([2, 7, 11], 9) == [1]"], [True]),
        "def gen(n):\n    yield from range(n)\n": (["assert list(gen(3)) == [0, 1, 2]", "assert sum(gen(4)) == 6"], [True, True]),
        "def big():\n    return list(range(300_000))\n": (["assert len(big()) == 300_000 and big()[7] == 7"], [True]),
        # Standard modules the code imported are the judge's own copies.
        "import math\nmath = type(math)('math')\nmath.isclose = lambda *a, **k: True\ndef f():\n    return 1.0\n":
            (["assert math.isclose(f(), 1.0)", "assert not math.isclose(f(), 2.0)"], [True, True]),
    }
    for code, (tests, expected) in cases.items():
        reward([code], tests=[tests])
        assert reward.last_results[0].passed == expected, (code, tests, reward.last_results[0])


def test_what_cannot_cross_fails_the_test_not_the_run(reward):
    # A function passed as an argument is not plain data: that test fails, the others still count.
    code = "def apply(f, x):\n    return f(x)\ndef twice(x):\n    return 2 * x\n"
    assert reward([code], tests=[["assert apply(abs, -1) == 1", "assert twice(4) == 8"]]) == [0.5]
    assert reward.last_results[0].violation is None


# HumanEval-style problems (prompt, canonical body, check function), written for this test.
PROBLEMS = [
    ('def below_zero(operations: list) -> bool:\n    """True if a running balance ever drops below zero."""\n',
     "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n",
     "def check(candidate):\n    assert candidate([]) is False\n    assert candidate([1, 2, -4, 5]) is True\n"
     "    assert candidate([1, -1, 2, -2]) is False\n\ncheck(below_zero)"),
    ('from typing import List\n\ndef rolling_max(numbers: List[int]) -> List[int]:\n    """The running maximum."""\n',
     "    out, best = [], None\n    for n in numbers:\n        best = n if best is None else max(best, n)\n        out.append(best)\n    return out\n",
     "def check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\n\ncheck(rolling_max)"),
    ('import math\n\ndef circle_area(r: float) -> float:\n    """The area of a circle of radius r."""\n',
     "    return math.pi * r * r\n",
     "import math\n\ndef check(candidate):\n    assert math.isclose(candidate(1.0), math.pi)\n    assert candidate(0) == 0\n\ncheck(circle_area)"),
]


def test_humaneval_style_canonical_solutions_score_one_and_empty_bodies_do_not(reward):
    canonical = [prompt + body for prompt, body, _ in PROBLEMS]
    empty = [prompt + "    pass\n" for prompt, _, _ in PROBLEMS]
    tests = [[check] for _, _, check in PROBLEMS]
    assert reward(canonical, tests=tests) == [1.0, 1.0, 1.0]
    assert all(score < 1.0 for score in reward(empty, tests=tests))
