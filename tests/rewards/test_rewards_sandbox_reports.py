"""A forged or malformed message from the submission is a counted failure, never a score.

The submission holds one way out: the pipe on which it answers the judge (it does not hold the
result pipe). Whatever it writes there, or on any other descriptor it can find, the score stays in
[0, 1], the reward never raises, the forgery is counted, and the next honest sample still scores
right. The parent checks every report too, as untrusted input.
"""

from __future__ import annotations

import math
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rftlab.rewards import CodeExecution, RewardSet
from rftlab.rewards.sandbox import SandboxResult, _parse_report

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=2.0, memory_mb=256, max_processes=8, max_output_bytes=4096)


def _forge(report: str, then_exit: bool = True) -> str:
    # Written to every descriptor the code might hold, the way a policy that cannot see which one
    # leads to the judge would try.
    return textwrap.dedent(f"""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, ({report!r} + "\\n").encode())
            except OSError:
                pass
        {"os._exit(0)" if then_exit else ""}
    """) + ADD


@pytest.mark.parametrize("report, then_exit", [
    ('{"stage": "done", "passed": [' + ", ".join(["true"] * 20) + '], "error": null}', True),  # 20 passes for 2 tests
    ('{"stage": "done", "passed": "yes", "error": null}', True),                             # not a list
    ('{"stage": "done", "passed": [1, 2], "error": null}', True),                            # not booleans
    ('{"stage": "done", "passed": [true, true], "guard_passed": "no", "error": null}', True),
    ('{"stage": "done", "passed": [true, true], "error": null}', False),                     # then the real one
    ('{"stage": "ready", "names": {"add": {"v": NaN}}, "defined": []}', True),              # not JSON
    ('{"stage": "ready", "names": {"add": {"int": "\u00b2"}}, "defined": []}', True),      # not an integer
    ('{"stage": "ready", "names": {"__builtins__": {"v": 1}}, "defined": []}', True),       # not a name
    ('{"stage": "ready", "names": {"add": {"ref": 0}}, "defined": []}\n{"value": {"v": 3}}\n{"oops": 1}', False),
])
def test_a_forged_report_is_a_counted_failure(reward, report, then_exit):
    before = reward.malformed_reports
    score = reward([_forge(report, then_exit)], tests=[TESTS])[0]
    assert 0.0 <= score <= 1.0
    assert score == 0.0 and reward.last_results[0].violation == "malformed_report"
    assert reward.malformed_reports == before + 1
    assert reward([ADD], tests=[TESTS])[0] == 1.0


@pytest.mark.parametrize("value", ["1e999", '"1.0"', "true", "[1]"])
def test_a_grader_value_that_is_not_a_finite_number_is_malformed(value):
    result = SandboxResult()
    data = ('{"status": {}}\n{"stage": "done", "value": ' + value + ', "error": null}\n').encode()
    assert _parse_report(data, result) == "malformed"
    assert result.value is None and not result.completed


def test_through_the_reward_set_nothing_raises(reward):
    rewards = RewardSet({"code": reward})
    result = rewards.score([_forge('{"stage": "done", "passed": {"a": 1}}')], ["p"], [{"tests": TESTS}])
    assert float(result.total[0]) == 0.0 and not any(result.errors.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))), max_size=4))
def test_no_report_bytes_break_the_parser(lines):
    # Arbitrary lines on the result pipe: a result that is either a failure or a well-formed report.
    result = SandboxResult()
    data = ('{"status": {"network_isolated": true}}\n' + "\n".join(lines)).encode("utf-8", "replace")
    _parse_report(data, result, n_tests=2)
    assert result.passed == [] or (len(result.passed) == 2 and all(isinstance(p, bool) for p in result.passed))
    assert result.value is None or math.isfinite(result.value)


_TO_EVERY_FD = "import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, {!r})\n    except OSError:\n        pass\n"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([
    "import os, sys\n", _TO_EVERY_FD.format(b'{"stage": "done", "passed": [true, true, true]}\n'),
    _TO_EVERY_FD.format(b'\xff\xfe not json\n'), _TO_EVERY_FD.format(b'{"value": {"v": 3}}\n'),
    "os._exit(0)\n", "raise SystemExit(3)\n",
    "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n", "print('x' * 10)\n",
    "import builtins\nbuiltins.AssertionError = ValueError\n", "1/0\n",
]), max_size=6).map("".join) | st.text(max_size=120))
def test_no_submission_string_scores_outside_0_1_or_raises(reward, submission):
    score = reward([submission], tests=[TESTS])[0]
    assert 0.0 <= score <= 1.0


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, st.dictionaries(st.sampled_from(["v", "int", "float", "list", "tuple", "set", "dict", "bytes",
                                                          "complex", "ref"]), _JSON, min_size=1, max_size=1)))
def test_decoding_what_the_code_sends_raises_nothing_but_malformed(obj):
    # The judge decodes whatever the code writes on its pipe: the only error is Malformed.
    from rftlab.rewards import _sandbox_boot as boot

    try:
        boot.decode(obj, lambda n: ("handle", n))
    except boot.Malformed:
        pass


@pytest.mark.parametrize("digits", ["--5", "²", "٣", "1_000", " 5", "", "0x5", "A", "-", "1" * 100_001])
def test_a_forged_big_integer_is_malformed_not_a_crash(digits):
    from rftlab.rewards import _sandbox_boot as boot

    with pytest.raises(boot.Malformed):
        boot.decode({"int": digits}, lambda n: n)
