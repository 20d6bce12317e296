"""Tests for krpo_cli.arithmetic: evaluator, dataset reproduction, splits."""

import hashlib
import io
import json
from collections import Counter

import pytest

from krpo_cli.arithmetic import (
    DIFFICULTIES,
    MAX_EXPRESSION_CHARS,
    MAX_NESTING,
    TOTAL_ROWS,
    TRAIN_ROWS,
    ArithmeticExpressionError,
    arithmetic_split,
    difficulty_of,
    evaluate_expression,
    generate_rows,
    write_jsonl,
)

TEST_SPLIT_SHA256 = "3c18c6916b96d4b4819dc5847c065fd19b59434892caa0662888a2b0084c563e"
FIRST_TEST_ROW = {
    "id": "80000",
    "question": "Solve 53   +   -77 -   8 + -31 - -59   +   24",
    "answer": "20",
    "num_terms": 6,
    "num_digits": 2,
}
EXPECTED_COUNTS = {
    "easy": (19_277, 4_739),
    "normal": (59_852, 15_020),
    "hard": (80_000, 20_000),
}
TEMPLATE_AFFIXES = [("Solve ", ""), ("What is ", "?"), ("", " = ?"), ("", " ="), ("", "")]


def _expression_of(question: str) -> str:
    for prefix, suffix in TEMPLATE_AFFIXES:
        if question.startswith(prefix) and question.endswith(suffix):
            return question[len(prefix) : len(question) - len(suffix)]
    raise AssertionError(f"no template matches {question!r}")


# --- dataset reproduction ---------------------------------------------------


def test_test_split_sha256_matches_published_dataset():
    buffer = io.StringIO()
    write_jsonl(arithmetic_split("test"), buffer)
    digest = hashlib.sha256(buffer.getvalue().encode("utf-8")).hexdigest()
    assert digest == TEST_SPLIT_SHA256


def test_first_rows_of_each_split():
    test_rows = arithmetic_split("test")
    train_rows = arithmetic_split("train")
    assert test_rows[0] == FIRST_TEST_ROW
    assert list(test_rows[0]) == ["id", "question", "answer", "num_terms", "num_digits"]
    assert train_rows[0]["id"] == "0"
    assert len(train_rows) == TRAIN_ROWS
    assert len(test_rows) == TOTAL_ROWS - TRAIN_ROWS
    assert test_rows[-1]["id"] == str(TOTAL_ROWS - 1)


@pytest.mark.parametrize("difficulty", sorted(EXPECTED_COUNTS))
def test_difficulty_counts(difficulty):
    train = arithmetic_split("train", difficulty)
    test = arithmetic_split("test", difficulty)
    assert (len(train), len(test)) == EXPECTED_COUNTS[difficulty]
    max_terms, max_digits = DIFFICULTIES[difficulty]
    assert all(r["num_terms"] <= max_terms and r["num_digits"] <= max_digits for r in train + test)


def test_difficulty_of_matches_split_membership():
    rows = generate_rows()
    counts = Counter(difficulty_of(r["num_terms"], r["num_digits"]) for r in rows[TRAIN_ROWS:])
    assert counts["easy"] == 4_739
    assert counts["easy"] + counts["normal"] == 15_020
    assert sum(counts.values()) == 20_000
    assert difficulty_of(3, 3) == "easy"
    assert difficulty_of(2, 4) == "normal"
    assert difficulty_of(6, 1) == "hard"
    with pytest.raises(ValueError):
        difficulty_of(7, 1)


def test_generated_rows_evaluate_to_their_answers():
    rows = generate_rows()[:2000]
    assert len(rows) == 2000
    for row in rows:
        answer = int(row["answer"])
        assert evaluate_expression(_expression_of(row["question"])) == answer
        assert 10 <= abs(answer) <= 10**8
        assert 2 <= row["num_terms"] <= 6 and 1 <= row["num_digits"] <= 6


def test_generate_rows_returns_copies_and_respects_arguments():
    first = generate_rows()
    first[0]["answer"] = "mutated"
    assert generate_rows()[0]["answer"] != "mutated"
    assert arithmetic_split("train")[0]["answer"] != "mutated"
    assert generate_rows(total=5) == generate_rows()[:5]
    assert generate_rows(seed=7, total=5) != generate_rows(total=5)


def test_arithmetic_split_rejects_unknown_names():
    with pytest.raises(ValueError, match="train"):
        arithmetic_split("validation")
    with pytest.raises(ValueError, match="normal"):
        arithmetic_split("train", "extreme")


def test_write_jsonl_format():
    buffer = io.StringIO()
    write_jsonl([{"a": 1}, {"b": "x"}], buffer)
    assert buffer.getvalue() == '{"a": 1}\n{"b": "x"}\n'
    assert [json.loads(line) for line in buffer.getvalue().splitlines()] == [{"a": 1}, {"b": "x"}]


# --- evaluator --------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 + 3 * 4", 14),
        ("2 * 3 - 4 * 5", -14),
        ("10 - 3 - 2", 5),
        ("-7 * -3", 21),
        ("( 1 + 2 ) * 3", 9),
        ("-( 1 + 2 ) * 3", -9),
        ("2 * -( 3 - 5 )", 4),
        ("( ( 1 + 2 ) * -( 4 - 6 ) ) - 1", 5),
        ("-( -( 2 * 3 ) + ( 10 - -( 1 ) ) )", -5),
        ("   7   *    ( 2 +   -3 )  ", -7),
        ("42", 42),
        ("-0", 0),
    ],
)
def test_evaluate_expression(expression, expected):
    assert evaluate_expression(expression) == expected


def test_evaluate_expression_accepts_nesting_at_limit():
    expression = "( " * MAX_NESTING + "5" + " )" * MAX_NESTING
    assert evaluate_expression(expression) == 5


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "   ",
        "1 +",
        "( 1 + 2",
        "1 + 2 )",
        "1 2",
        "1 / 2",
        "__import__('os')",
        "1 + * 2",
        "( )",
        "- 1",
        "1.5 + 2",
        "(1 + 2)",
        "1 " + "+ 1 " * (MAX_EXPRESSION_CHARS // 4),
        "( " * 100 + "1" + " )" * 100,
        "( " * (MAX_NESTING + 1) + "1" + " )" * (MAX_NESTING + 1),
    ],
)
def test_malformed_expressions_raise(expression):
    with pytest.raises(ArithmeticExpressionError) as info:
        evaluate_expression(expression)
    message = str(info.value)
    assert message and "\n" not in message


def test_error_messages_say_what_is_wrong():
    cases = {
        "": "empty",
        "1 / 2": "unknown token '/'",
        "( 1 + 2": "missing ')'",
        "1 + 2 )": "unbalanced",
        "1 2": "expected an operator",
        "1 +": "end of expression",
        "1 " + "+ 1 " * (MAX_EXPRESSION_CHARS // 4): "limit",
        "( " * 100 + "1" + " )" * 100: "nested deeper",
    }
    for expression, fragment in cases.items():
        with pytest.raises(ArithmeticExpressionError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            evaluate_expression(expression)
    assert issubclass(ArithmeticExpressionError, ValueError)
