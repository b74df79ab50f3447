"""A safe arithmetic expression evaluator: Python's parser, our own interpreter, never ``eval``.

Used by the ``multi`` grader's ``calculate_output`` and by Countdown's verifier. Only numbers, the
given variable names, ``+ - * / // % **``, unary ``+ -``, parentheses and a few named functions are
accepted; anything else (attributes, subscripts, calls of other names, comprehensions, lambdas,
strings) is rejected when the expression is parsed, with the offending construct named.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

MAX_LENGTH = 1000
MAX_EXPONENT = 1000  # 2 ** 10**9 would hang the trainer: bounded powers only

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "round": round,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
}
_OP_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


class ExpressionError(ValueError):
    """The expression is malformed, uses a forbidden construct, or cannot be evaluated."""


class SafeExpression:
    """A parsed arithmetic expression that can be evaluated many times.

    Args:
        source: the expression, e.g. ``"0.5 * accuracy + 0.5 * min(format, 1)"``.
        names: the variable names it may use (others are an error at construction).
        operators: the binary operators allowed, as symbols (default: all of ``+ - * / // % **``).
        functions: the callable names allowed (default: min, max, abs, floor, ceil, round, sqrt, exp, log).

    >>> SafeExpression("0.5 * a + b ** 2", names=["a", "b"]).evaluate({"a": 1, "b": 3})
    9.5
    """

    def __init__(
        self,
        source: str,
        names: list[str] | tuple[str, ...] = (),
        operators: tuple[str, ...] | None = None,
        functions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError(f"expression must be a non-empty string, got {source!r}")
        if len(source) > MAX_LENGTH:
            raise ExpressionError(f"expression longer than {MAX_LENGTH} characters")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as err:
            raise ExpressionError(f"expression {source!r} is not valid: {err.msg}") from err
        self.source = source
        self.names = set(names)
        self.functions = dict(FUNCTIONS if functions is None else functions)
        allowed = set(_OP_SYMBOL.values()) if operators is None else set(operators)
        self.operators = {op for op, sym in _OP_SYMBOL.items() if sym in allowed}
        self.tree = tree.body
        self.numbers: list[int | float] = []
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ExpressionError(f"only numbers are allowed, got {node.value!r}")
            self.numbers.append(node.value)
        elif isinstance(node, ast.Name):
            if node.id not in self.names:
                raise ExpressionError(f"unknown name {node.id!r}; allowed: {sorted(self.names) or 'none'}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in self.operators:
                allowed = " ".join(_OP_SYMBOL[op] for op in _OP_SYMBOL if op in self.operators)
                raise ExpressionError(f"operator {_OP_SYMBOL.get(type(node.op), type(node.op).__name__)} not allowed; allowed: {allowed}")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            self._check(node.operand)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in self.functions:
                raise ExpressionError(f"unknown function {node.func.id!r}; allowed: {sorted(self.functions)}")
            for arg in node.args:
                self._check(arg)
        else:
            raise ExpressionError(f"{type(node).__name__} is not allowed in an expression (numbers, names, "
                                  "arithmetic and the listed functions only)")

    def evaluate(self, values: Mapping[str, Any] | None = None, exact: bool = False) -> Any:
        """The value, with ``values`` for the names; ``exact`` computes in ``Fraction``s.

        Raises ``ExpressionError`` on division by zero, an oversized power, or a missing value.
        """
        values = dict(values or {})
        missing = self.names & _used_names(self.tree) - set(values)
        if missing:
            raise ExpressionError(f"no value for {sorted(missing)}")
        try:
            return self._eval(self.tree, values, exact)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
            raise ExpressionError(f"cannot evaluate {self.source!r}: {err}") from err

    def _eval(self, node: ast.AST, values: dict[str, Any], exact: bool) -> Any:
        if isinstance(node, ast.Constant):
            return Fraction(node.value) if exact else node.value
        if isinstance(node, ast.Name):
            return Fraction(values[node.id]) if exact else values[node.id]
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, values, exact))
        if isinstance(node, ast.Call):
            args = [self._eval(a, values, exact) for a in node.args]
            return self.functions[node.func.id](*args)
        left, right = self._eval(node.left, values, exact), self._eval(node.right, values, exact)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (exact and right.denominator != 1)):
            raise ExpressionError(f"power {right} not allowed (integer exponents up to {MAX_EXPONENT})")
        return _BINARY[type(node.op)](left, right)


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - set(FUNCTIONS)


def evaluate_arithmetic(source: str, operators: tuple[str, ...] = ("+", "-", "*", "/")) -> tuple[Fraction, list[int]]:
    """Exact value of a numbers-only expression and the integers it uses, for puzzle verifiers.

    >>> evaluate_arithmetic("(6 - 2) * 25 / 5")
    (Fraction(20, 1), [6, 2, 25, 5])
    """
    expression = SafeExpression(source, operators=operators, functions={})
    if any(not isinstance(n, int) for n in expression.numbers):
        raise ExpressionError(f"only integers may appear in {source!r}")
    return expression.evaluate(exact=True), [int(n) for n in expression.numbers]
