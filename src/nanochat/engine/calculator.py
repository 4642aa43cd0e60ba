"""The chat model's calculator tool: whitelisted arithmetic, evaluated by walking the parsed tree.

The model writes an expression between `<|python_start|>` and `<|python_end|>`; `calculate` returns the text
forced back as the tool output, or None (no output) when the expression is refused or fails.

The input is never handed to `eval`/`exec`/`compile`: `ast.parse` only builds a syntax tree, and only these
nodes are evaluated, everything else is refused:

* int and float literals (not bool, complex, bytes); commas between digits are removed first, so
  `1,234*2` -> `1234*2` (nanochat drops every comma; here those inside string literals are kept);
* binary `+ - * / // %` and `**`, unary `-` and `+`, parentheses;
* `**` only with |exponent| <= 100 and an estimated result of at most 100 decimal digits, checked *before*
  computing, so `9**9**9` or `2**10000000` are refused at once instead of hanging;
* `'literal'.count('literal')` -- the only call: a string literal receiver, one string literal argument.

Limits that keep every input cheap by construction (no timeouts needed): at most 1,000 characters (which also
bounds string literals), 1,000 tree nodes, nesting depth 100 (a chain `1+2+...` nests one level per operator,
so about 100 terms), and |value| <= 10**100 for every literal and intermediate result (floats must also be
finite). Division or modulo by zero is refused.

Results: ints exactly as `str(int)`. Floats are rounded to 12 significant digits, then printed like Python's
`repr` of the rounded value, so `7/2` -> `3.5`, `0.1+0.2` -> `0.3` (not `0.30000000000000004`),
`10/3` -> `3.33333333333`, `4/2` -> `2.0`, `1e20/3` -> `3.33333333333e+19`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 1_000
MAX_NODES = 1_000
MAX_DEPTH = 100
MAX_DIGITS = 100
MAX_MAGNITUDE = 10**MAX_DIGITS
MAX_POWER_EXPONENT = 100
SIGNIFICANT_DIGITS = 12

Number = int | float


class _Refused(Exception):
    """The expression steps outside the whitelist or the limits."""


def _power(base: Number, exponent: Number) -> Number:
    # Estimate the size first: computing 2**10000000 just to reject it afterwards would take seconds.
    if abs(exponent) > MAX_POWER_EXPONENT:
        raise _Refused
    if exponent > 0 and abs(base) > 1 and exponent * math.log10(abs(base)) > MAX_DIGITS + 1:
        raise _Refused
    return base**exponent


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# A string literal (kept as is) or a comma with digits on both sides (dropped).
_LITERAL_OR_DIGIT_COMMA = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?<=\d),(?=\d)""")


def calculate(expression: str) -> str | None:
    """The result of a whitelisted expression as the text the model will see, or None if refused or failing."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = _parse(_drop_digit_commas(expression).strip())
        _check_size(tree)
        return _format(_evaluate(tree.body))
    # Anything going wrong (syntax, zero division, overflow, a refused node) means "no tool output": the
    # generation loop calling this must never crash because of what the model wrote.
    except Exception:
        return None


def _drop_digit_commas(text: str) -> str:
    return _LITERAL_OR_DIGIT_COMMA.sub(lambda m: m.group(1) or "", text)


def _parse(text: str) -> ast.Expression:
    with warnings.catch_warnings():
        # e.g. SyntaxWarning for "'\d'" or "1 is 1": the text is the model's, nothing for our log.
        warnings.simplefilter("ignore")
        return ast.parse(text, mode="eval")


def _check_size(tree: ast.AST) -> None:
    # Iterative, so a deep tree is refused here rather than overflowing the recursive evaluator.
    stack = [(tree, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise _Refused
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _evaluate(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.Call):
        return _count(node)
    raise _Refused


def _checked(value: object) -> Number:
    # `type(...) in` rather than isinstance: bool is an int subclass, and a negative base to a fractional
    # power gives a complex number; both are refused.
    if type(value) not in (int, float):
        raise _Refused
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused
    if abs(value) > MAX_MAGNITUDE:
        raise _Refused
    return value


def _count(call: ast.Call) -> int:
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count" and len(call.args) == 1 and not call.keywords):
        raise _Refused
    return _string_literal(func.value).count(_string_literal(call.args[0]))


def _string_literal(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return node.value
    raise _Refused


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    # Rounding away the last few binary-to-decimal digits hides noise like 0.30000000000000004.
    return repr(float(f"{value:.{SIGNIFICANT_DIGITS}g}"))
