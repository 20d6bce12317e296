"""Arithmetic expressions: a safe evaluator and a reproducible dataset generator.

Evaluator
---------
``evaluate_expression`` parses a whitespace-separated token stream with a small
recursive-descent parser (no ``eval``).  Tokens are integer literals (optionally
negative, e.g. ``-77``), the binary operators ``+``, ``-`` and ``*``, group
openers ``(`` and ``-(`` (the latter negates the group's value) and the closer
``)``.  ``*`` binds tighter than ``+``/``-``; operators of equal precedence are
applied left to right.  Grammar::

    expr   := term (("+" | "-") term)*
    term   := factor ("*" factor)*
    factor := INT | "(" expr ")" | "-(" expr ")"

Inputs longer than ``MAX_EXPRESSION_CHARS`` characters, nested deeper than
``MAX_NESTING`` groups, or malformed in any way raise
``ArithmeticExpressionError`` (a ``ValueError``) with a one-line message.

Dataset generator
-----------------
``generate_rows`` reproduces the published 100,000-row arithmetic dataset.  A
single ``random.Random(seed)`` supplies every draw, in this order:

1. ``num_terms = randint(2, 6)``, then ``num_digits = randint(1, 6)``.
2. Tokens from ``build(num_terms)``: draw ``left = randint(1, n)`` and set
   ``right = n - left``.  If ``left > 1 and random() > 0.5`` (short-circuit: no
   draw when ``left == 1``), draw ``random() > 0.5`` to choose ``"-("`` over
   ``"("``, recurse with ``build(left)`` and close with ``")"``.  Otherwise emit
   ``left`` integers ``randint(-(10**d) + 1, 10**d - 1)`` with an operator
   ``choice(["+", "-", "*"])`` drawn between consecutive ones (order: int, op,
   int, op, ..., int).  Then, if ``right > 0``, draw an operator and recurse with
   ``build(right)``.
3. Spacing: for each token, extra ``" "`` tokens are added while
   ``random() < 0.15``, then the token itself; everything is joined with single
   spaces, so runs of spaces appear.
4. The answer is the evaluated value.  A candidate with ``abs(answer) > 10**8``
   or ``abs(answer) < 10`` is rejected (no further draws for it).  Otherwise a
   template ``choice(["{0}", "{0} =", "{0} = ?", "What is {0}?", "Solve {0}"])``
   is drawn and the row ``{"id", "question", "answer", "num_terms",
   "num_digits"}`` is emitted, ``id`` counting accepted rows from 0.

Rows 0-79,999 form the train split and rows 80,000-99,999 the test split.  The
test split written by ``write_jsonl`` has sha256
``3c18c6916b96d4b4819dc5847c065fd19b59434892caa0662888a2b0084c563e``.

Difficulties
------------
A row belongs to a difficulty when ``num_terms <= max_terms`` and
``num_digits <= max_digits``.  The easy/normal/hard boundaries in
``DIFFICULTIES`` are krpo's own choice (the paper's are not public); "normal"
(at most 5 terms, at most 5 digits) is the setting used by the paper's code,
and "hard" is the whole dataset.
"""

from __future__ import annotations

import functools
import json
import random
from typing import IO, Iterable

MAX_EXPRESSION_CHARS = 4096
MAX_NESTING = 64

TOTAL_ROWS = 100_000
TRAIN_ROWS = 80_000
TEST_ROWS = TOTAL_ROWS - TRAIN_ROWS
DEFAULT_SEED = 42

DIFFICULTIES: dict[str, tuple[int, int]] = {
    "easy": (3, 3),
    "normal": (5, 5),
    "hard": (6, 6),
}

SPLITS = ("train", "test")
_OPERATORS = ["+", "-", "*"]
_TEMPLATES = ["{0}", "{0} =", "{0} = ?", "What is {0}?", "Solve {0}"]
_MIN_ABS_ANSWER = 10
_MAX_ABS_ANSWER = 10**8


class ArithmeticExpressionError(ValueError):
    """Raised for an arithmetic expression that is malformed or too large."""


def _parse_int(token: str) -> int | None:
    """Return the value of an integer literal token, or None if it is not one."""
    digits = token[1:] if token.startswith("-") else token
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    return int(token)


def _is_known_token(token: str) -> bool:
    return token in ("+", "-", "*", "(", "-(", ")") or _parse_int(token) is not None


class _Parser:
    """Recursive-descent parser that evaluates while it parses."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> int:
        value = self.expr()
        token = self.peek()
        if token is not None:
            if token == ")":
                raise ArithmeticExpressionError(
                    f"unbalanced parentheses: unexpected ')' at token {self.pos + 1}"
                )
            kind = "unexpected" if _is_known_token(token) else "unknown"
            raise ArithmeticExpressionError(
                f"{kind} token {token!r} at token {self.pos + 1}: expected an operator"
            )
        return value

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> int:
        value = self.factor()
        while self.peek() == "*":
            self.pos += 1
            value *= self.factor()
        return value

    def factor(self) -> int:
        token = self.peek()
        if token is None:
            raise ArithmeticExpressionError("unexpected end of expression: expected a number")
        if token in ("(", "-("):
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise ArithmeticExpressionError(f"groups nested deeper than {MAX_NESTING} levels")
            self.pos += 1
            value = self.expr()
            if self.peek() != ")":
                raise ArithmeticExpressionError(
                    "unbalanced parentheses: missing ')'"
                    if self.peek() is None
                    else f"unexpected token {self.peek()!r} at token {self.pos + 1}: expected ')'"
                )
            self.pos += 1
            self.depth -= 1
            return -value if token == "-(" else value
        value = _parse_int(token)
        if value is None:
            raise ArithmeticExpressionError(
                f"unknown token {token!r} at token {self.pos + 1}: expected a number or '('"
            )
        self.pos += 1
        return value


def evaluate_expression(expression: str) -> int:
    """Evaluate a whitespace-separated integer expression with ``+ - * ( -( )``."""
    if not isinstance(expression, str):
        raise ArithmeticExpressionError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ArithmeticExpressionError(
            f"expression is {len(expression)} characters long; the limit is {MAX_EXPRESSION_CHARS}"
        )
    tokens = expression.split()
    if not tokens:
        raise ArithmeticExpressionError("empty expression")
    return _Parser(tokens).parse()


def _build_tokens(rng: random.Random, n: int, num_digits: int, out: list[str]) -> None:
    """Append the tokens of an ``n``-term expression to ``out`` (see module doc)."""
    bound = 10**num_digits - 1
    while True:
        left = rng.randint(1, n)
        right = n - left
        if left > 1 and rng.random() > 0.5:
            out.append("-(" if rng.random() > 0.5 else "(")
            _build_tokens(rng, left, num_digits, out)
            out.append(")")
        else:
            out.append(str(rng.randint(-bound, bound)))
            for _ in range(left - 1):
                out.append(rng.choice(_OPERATORS))
                out.append(str(rng.randint(-bound, bound)))
        if right <= 0:
            return
        out.append(rng.choice(_OPERATORS))
        n = right  # tail call build(right), done iteratively


def _space_tokens(rng: random.Random, tokens: list[str]) -> str:
    spaced: list[str] = []
    for token in tokens:
        while rng.random() < 0.15:
            spaced.append(" ")
        spaced.append(token)
    return " ".join(spaced)


@functools.lru_cache(maxsize=4)
def _generate_cached(seed: int, total: int) -> tuple[dict, ...]:
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < total:
        num_terms = rng.randint(2, 6)
        num_digits = rng.randint(1, 6)
        tokens: list[str] = []
        _build_tokens(rng, num_terms, num_digits, tokens)
        expression = _space_tokens(rng, tokens)
        answer = evaluate_expression(expression)
        if abs(answer) > _MAX_ABS_ANSWER or abs(answer) < _MIN_ABS_ANSWER:
            continue
        template = rng.choice(_TEMPLATES)
        rows.append(
            {
                "id": str(len(rows)),
                "question": template.format(expression),
                "answer": str(answer),
                "num_terms": num_terms,
                "num_digits": num_digits,
            }
        )
    return tuple(rows)


def generate_rows(seed: int = DEFAULT_SEED, total: int = TOTAL_ROWS) -> list[dict]:
    """Return all ``total`` dataset rows, in order, as fresh dicts.

    Generation is deterministic, so results are cached in-process; the
    returned list and its dicts are copies and may be mutated freely.
    """
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    return [dict(row) for row in _generate_cached(seed, total)]


def difficulty_of(num_terms: int, num_digits: int) -> str:
    """Return the smallest difficulty preset that contains a row of this shape."""
    for name, (max_terms, max_digits) in DIFFICULTIES.items():
        if num_terms <= max_terms and num_digits <= max_digits:
            return name
    raise ValueError(f"no difficulty contains num_terms={num_terms}, num_digits={num_digits}")


def arithmetic_split(split: str, difficulty: str = "hard", seed: int = DEFAULT_SEED) -> list[dict]:
    """Return the rows of ``split`` ("train"/"test") within ``difficulty``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(
            f"unknown difficulty {difficulty!r}; expected one of {', '.join(DIFFICULTIES)}"
        )
    max_terms, max_digits = DIFFICULTIES[difficulty]
    rows = _generate_cached(seed, TOTAL_ROWS)
    selected = rows[:TRAIN_ROWS] if split == "train" else rows[TRAIN_ROWS:]
    return [
        dict(row)
        for row in selected
        if row["num_terms"] <= max_terms and row["num_digits"] <= max_digits
    ]


def write_jsonl(rows: Iterable[dict], stream: IO[str]) -> None:
    """Write each row as ``json.dumps(row)`` followed by a newline."""
    for row in rows:
        stream.write(json.dumps(row) + "\n")
