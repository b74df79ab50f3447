"""Code: write a small Python function; the verifier runs its unit tests in the sandbox."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from rftlab.rewards.answers import RegexFormat
from rftlab.rewards.base import RewardFn
from rftlab.rewards.code import CodeExecution
from rftlab.tasks.base import Row, Task

DEFAULT_SYSTEM_PROMPT = "You are a helpful Python programmer."
DEFAULT_TEMPLATE = "Write a Python function `{signature}` that {description} Reply with the function in a ```python code block."

# (signature, description, tests). Tests are assert statements run after the submitted code; none
# may pass with the function stubbed to return None (the task's guard would not count it).
PROBLEMS: list[tuple[str, str, list[str]]] = [
    ("add(a, b)", "returns the sum of a and b.", ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]),
    ("square(x)", "returns x squared.", ["assert square(3) == 9", "assert square(-4) == 16", "assert square(0) == 0"]),
    ("is_even(n)", "returns True if the integer n is even, else False.", ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"]),
    ("maximum(xs)", "returns the largest element of the non-empty list xs.", ["assert maximum([1, 5, 3]) == 5", "assert maximum([-2, -9]) == -2", "assert maximum([7]) == 7"]),
    ("reverse_string(s)", "returns the string s reversed.", ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''", "assert reverse_string('ab ba') == 'ab ba'"]),
    ("count_vowels(s)", "returns the number of vowels (a, e, i, o, u, either case) in s.", ["assert count_vowels('hello') == 2", "assert count_vowels('SKY') == 0", "assert count_vowels('AEiou') == 5"]),
    ("factorial(n)", "returns n! for an integer n >= 0.", ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(10) == 3628800"]),
    ("fibonacci(n)", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.", ["assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55"]),
    ("is_palindrome(s)", "returns True if the string s reads the same backwards, else False.", ["assert is_palindrome('racecar') is True", "assert is_palindrome('abca') is False", "assert is_palindrome('') is True"]),
    ("sum_list(xs)", "returns the sum of the numbers in the list xs (0 for an empty list).", ["assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0", "assert sum_list([-1, 1, 5]) == 5"]),
    ("celsius_to_fahrenheit(c)", "converts a temperature from Celsius to Fahrenheit.", ["assert celsius_to_fahrenheit(0) == 32", "assert celsius_to_fahrenheit(100) == 212", "assert celsius_to_fahrenheit(-40) == -40"]),
    ("count_words(s)", "returns the number of whitespace-separated words in s.", ["assert count_words('a b  c') == 3", "assert count_words('') == 0", "assert count_words(' one ') == 1"]),
    ("is_prime(n)", "returns True if the integer n is a prime number, else False.", ["assert is_prime(2) is True", "assert is_prime(15) is False", "assert is_prime(97) is True", "assert is_prime(1) is False"]),
    ("gcd(a, b)", "returns the greatest common divisor of two positive integers.", ["assert gcd(12, 18) == 6", "assert gcd(7, 5) == 1", "assert gcd(10, 10) == 10"]),
    ("unique(xs)", "returns the elements of xs without duplicates, in order of first appearance.", ["assert unique([1, 2, 1, 3, 2]) == [1, 2, 3]", "assert unique([]) == []", "assert unique(['a', 'a']) == ['a']"]),
    ("flatten(xss)", "flattens a list of lists into one list.", ["assert flatten([[1, 2], [3], []]) == [1, 2, 3]", "assert flatten([]) == []", "assert flatten([['a'], ['b', 'c']]) == ['a', 'b', 'c']"]),
    ("capitalize_words(s)", "returns s with the first letter of every space-separated word upper-cased.", ["assert capitalize_words('hello world') == 'Hello World'", "assert capitalize_words('a') == 'A'", "assert capitalize_words('') == ''"]),
    ("second_largest(xs)", "returns the second largest distinct value of xs (a list with at least two distinct values).", ["assert second_largest([1, 3, 2]) == 2", "assert second_largest([5, 5, 4]) == 4", "assert second_largest([-1, -2]) == -2"]),
    ("digit_sum(n)", "returns the sum of the decimal digits of the non-negative integer n.", ["assert digit_sum(123) == 6", "assert digit_sum(0) == 0", "assert digit_sum(9999) == 36"]),
    ("count_char(s, c)", "returns how many times the character c occurs in s.", ["assert count_char('banana', 'a') == 3", "assert count_char('', 'x') == 0", "assert count_char('aaa', 'b') == 0"]),
    ("merge_sorted(a, b)", "merges two sorted lists into one sorted list.", ["assert merge_sorted([1, 3], [2, 4]) == [1, 2, 3, 4]", "assert merge_sorted([], [1]) == [1]", "assert merge_sorted([1, 1], [1]) == [1, 1, 1]"]),
    ("is_anagram(a, b)", "returns True if the strings a and b are anagrams of each other, else False.", ["assert is_anagram('listen', 'silent') is True", "assert is_anagram('abc', 'abd') is False", "assert is_anagram('', '') is True"]),
    ("running_sum(xs)", "returns the list of prefix sums of xs.", ["assert running_sum([1, 2, 3]) == [1, 3, 6]", "assert running_sum([]) == []", "assert running_sum([5, -5]) == [5, 0]"]),
    ("clamp(x, low, high)", "returns x limited to the interval [low, high].", ["assert clamp(5, 0, 3) == 3", "assert clamp(-1, 0, 3) == 0", "assert clamp(2, 0, 3) == 2"]),
    ("to_binary(n)", "returns the binary representation of the non-negative integer n as a string without prefix.", ["assert to_binary(5) == '101'", "assert to_binary(0) == '0'", "assert to_binary(8) == '1000'"]),
    ("remove_spaces(s)", "returns s with all space characters removed.", ["assert remove_spaces('a b c') == 'abc'", "assert remove_spaces('   ') == ''", "assert remove_spaces('ab') == 'ab'"]),
    ("average(xs)", "returns the arithmetic mean of the non-empty list of numbers xs.", ["assert average([1, 2, 3]) == 2", "assert average([5]) == 5", "assert abs(average([1, 2]) - 1.5) < 1e-9"]),
    ("chunk(xs, n)", "splits xs into consecutive lists of length n (the last may be shorter).", ["assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]", "assert chunk([], 3) == []", "assert chunk([1, 2], 2) == [[1, 2]]"]),
    ("count_positive(xs)", "returns how many numbers in xs are greater than zero.", ["assert count_positive([1, -2, 3, 0]) == 2", "assert count_positive([]) == 0", "assert count_positive([-1]) == 0"]),
    ("last_element(xs)", "returns the last element of xs, or None if xs is empty.", ["assert last_element([1, 2, 3]) == 3", "assert last_element([]) is None and last_element([0]) == 0", "assert last_element(['x']) == 'x'"]),
]


class CodeFunctions(Task):
    """Small Python functions with unit tests, verified in the sandbox (``CodeExecution``).

    The held-out split is ``num_test`` problems drawn by ``seed``; training uses the others.

    Args:
        num_test: held-out problems (0 to len(PROBLEMS) - 1).
        seed: chooses the held-out problems.
        guard: the anti-reward-hacking guard of ``CodeExecution`` (tests passing without the code score 0).
        timeout: sandbox seconds per sample.
        format_weight: weight of "the reply has a ```python block" (0 drops it).
        template: user message with ``{signature}`` and ``{description}``.
        system_prompt: system message; "" for none.
    """

    name = "code"

    def __init__(self, num_test: int = 6, seed: int = 0, guard: bool = True, timeout: float = 5.0,
                 format_weight: float = 0.1, template: str = DEFAULT_TEMPLATE,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        if not 0 <= num_test < len(PROBLEMS):
            raise ValueError(f"num_test must be in [0, {len(PROBLEMS) - 1}], got {num_test}")
        for key in ("{signature}", "{description}"):
            if key not in template:
                raise ValueError(f"template must contain {key}, got {template!r}")
        self.seed, self.guard, self.timeout, self.format_weight = seed, guard, timeout, format_weight
        self.template, self.system_prompt = template, system_prompt
        order = list(range(len(PROBLEMS)))
        random.Random(f"code-{seed}").shuffle(order)
        rows = [self._row(*PROBLEMS[i]) for i in order]
        self._test, self._train = rows[:num_test], rows[num_test:]

    def _row(self, signature: str, description: str, tests: list[str]) -> Row:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self.template.format(signature=signature, description=description)})
        return {"prompt": messages, "tests": list(tests), "signature": signature}

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        rewards: dict[str, RewardFn] = {"tests": CodeExecution(timeout=self.timeout, guard=self.guard)}
        if self.format_weight:
            rewards["format"] = RegexFormat(r"```python\s*\n.*?```", name="format")
        return rewards

    def reward_weights(self) -> Sequence[float]:
        return [1.0, self.format_weight] if self.format_weight else [1.0]
