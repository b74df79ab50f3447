"""The code task: every problem's tests accept a reference solution and reject a wrong one."""

from __future__ import annotations

import pytest

from rftlab.rewards import CodeExecution
from rftlab.tasks import CodeFunctions
from rftlab.tasks.coding import PROBLEMS

REFERENCE = {
    "add": "def add(a, b):\n    return a + b",
    "square": "def square(x):\n    return x * x",
    "is_even": "def is_even(n):\n    return n % 2 == 0",
    "maximum": "def maximum(xs):\n    return max(xs)",
    "reverse_string": "def reverse_string(s):\n    return s[::-1]",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)",
    "factorial": "import math\ndef factorial(n):\n    return math.factorial(n)",
    "fibonacci": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "is_palindrome": "def is_palindrome(s):\n    return s == s[::-1]",
    "sum_list": "def sum_list(xs):\n    return sum(xs)",
    "celsius_to_fahrenheit": "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32",
    "count_words": "def count_words(s):\n    return len(s.split())",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
    "gcd": "import math\ndef gcd(a, b):\n    return math.gcd(a, b)",
    "unique": "def unique(xs):\n    return list(dict.fromkeys(xs))",
    "flatten": "def flatten(xss):\n    return [x for xs in xss for x in xs]",
    "capitalize_words": "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
    "second_largest": "def second_largest(xs):\n    return sorted(set(xs))[-2]",
    "digit_sum": "def digit_sum(n):\n    return sum(int(d) for d in str(n))",
    "count_char": "def count_char(s, c):\n    return s.count(c)",
    "merge_sorted": "def merge_sorted(a, b):\n    return sorted(a + b)",
    "is_anagram": "def is_anagram(a, b):\n    return sorted(a) == sorted(b)",
    "running_sum": "import itertools\ndef running_sum(xs):\n    return list(itertools.accumulate(xs))",
    "clamp": "def clamp(x, low, high):\n    return max(low, min(high, x))",
    "to_binary": "def to_binary(n):\n    return bin(n)[2:]",
    "remove_spaces": "def remove_spaces(s):\n    return s.replace(' ', '')",
    "average": "def average(xs):\n    return sum(xs) / len(xs)",
    "chunk": "def chunk(xs, n):\n    return [xs[i:i + n] for i in range(0, len(xs), n)]",
    "count_positive": "def count_positive(xs):\n    return sum(x > 0 for x in xs)",
    "last_element": "def last_element(xs):\n    return xs[-1] if xs else None",
}


def test_every_problem_is_solvable_and_its_tests_are_not_vacuous():
    names = [signature.split("(")[0] for signature, _, _ in PROBLEMS]
    assert sorted(names) == sorted(REFERENCE)
    reward = CodeExecution(timeout=5.0, guard=True)
    solutions = [f"```python\n{REFERENCE[n]}\n```" for n in names]
    tests = [t for _, _, t in PROBLEMS]
    # With the guard, a test that passes with the function stubbed out would score less than 1.
    assert reward(solutions, tests=tests) == [1.0] * len(PROBLEMS)
    wrong = [f"def {n}(*args, **kwargs):\n    return 'wrong'" for n in names]
    assert reward(wrong, tests=tests) == [0.0] * len(PROBLEMS)


def test_split_prompt_and_rewards():
    task = CodeFunctions(num_test=6, seed=3)
    test_sigs = {r["signature"] for r in task.test_rows()}
    train_sigs = {r["signature"] for r in task.train_rows()}
    assert len(test_sigs) == 6 and len(train_sigs) == len(PROBLEMS) - 6 and not test_sigs & train_sigs
    assert CodeFunctions(num_test=6, seed=3).test_rows() == task.test_rows()
    row = task.test_rows()[0]
    assert row["signature"] in row["prompt"][-1]["content"] and "```python" in row["prompt"][-1]["content"]
    assert list(task.reward_functions()) == ["tests", "format"]
    name = row["signature"].split("(")[0]
    assert task.is_correct(f"```python\n{REFERENCE[name]}\n```", row)
    assert not task.is_correct("```python\npass\n```", row)


@pytest.mark.parametrize("kwargs, name", [(dict(num_test=len(PROBLEMS)), "num_test"), (dict(template="x"), "template")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CodeFunctions(**kwargs)
