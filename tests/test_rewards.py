import pytest

from krpo_cli.rewards import get_grader, grade_answer_tags, grade_last_number


@pytest.mark.parametrize(
    "completion, reward, correct, formatted",
    [
        ("<think>3+4</think><answer>7</answer>", 1.0, True, True),
        ("<answer> 7 </answer>", 1.0, True, True),  # whitespace inside the tags is ignored
        ("<answer>x = 7</answer>", 0.5, False, True),  # contains the reference
        ("<answer>-7</answer>", 0.5, False, True),  # contains "7": the paper's partial credit
        ("<answer>8</answer>", 0.01, False, True),
        ("<answer>8</answer><answer>7</answer>", 0.01, False, True),  # only the first tag counts
        ("the answer is 7", 0.0, False, False),
        ("<answer>7", 0.0, False, False),  # unclosed tag
        ("<answer>\n7\n</answer>", 1.0, True, True),
    ],
)
def test_answer_tags(completion, reward, correct, formatted):
    grade = grade_answer_tags(completion, "7")
    assert (grade.reward, grade.correct, grade.formatted) == (reward, correct, formatted)


def test_answer_tags_negative_reference():
    assert grade_answer_tags("<answer>-12</answer>", "-12").reward == 1.0
    assert grade_answer_tags("<answer>12</answer>", "-12").reward == 0.01


@pytest.mark.parametrize(
    "completion, reward, extracted",
    [
        ("7", 1.0, "7"),
        ("3 + 4 = 7", 1.0, "7"),
        ("7 or maybe 8", 0.0, "8"),
        ("2 - 6 = -4", 0.0, "-4"),
        ("no digits here", 0.0, None),
        ("The answer is 07.", 1.0, "07"),
    ],
)
def test_last_number(completion, reward, extracted):
    grade = grade_last_number(completion, "7")
    assert grade.reward == reward
    assert grade.extracted == extracted


def test_last_number_negative_reference():
    assert grade_last_number("2 - 6 = -4", "-4").correct


def test_get_grader():
    assert get_grader("last_number") is grade_last_number
    with pytest.raises(ValueError, match="unknown grader"):
        get_grader("nope")
