"""Graders: turn a completion and its reference answer into a reward.

The grader that scores rewards during training is the one evaluation uses, so a
reported accuracy means the same thing as the training reward.

- answer_tags (the paper's): the text inside the first <answer>…</answer> is compared
  with the reference: 1.0 when equal, 0.5 when it contains the reference, 0.01 when
  the tags are there but the answer is wrong, 0.0 when there are no tags. Surrounding
  whitespace inside the tags is ignored (the paper compares the raw text; we strip it
  so that `<answer> 20 </answer>` is not half-credited).
- last_number: 1.0 when the last integer in the completion equals the reference, else 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool  # full credit
    formatted: bool  # the answer was in the expected format
    extracted: str | None  # what the grader read as the answer


def grade_answer_tags(completion: str, reference: str) -> Grade:
    """The paper's reward: 1.0 exact, 0.5 contains, 0.01 tags only, 0.0 no tags."""
    match = _ANSWER_TAGS.search(completion)
    if match is None:
        return Grade(0.0, False, False, None)
    answer = match.group(1).strip()
    reference = reference.strip()
    if answer == reference:
        return Grade(1.0, True, True, answer)
    if reference in answer:
        return Grade(0.5, False, True, answer)
    return Grade(0.01, False, True, answer)


def grade_last_number(completion: str, reference: str) -> Grade:
    """1.0 when the last integer in the completion equals the reference integer, else 0.0."""
    numbers = _INTEGER.findall(completion)
    if not numbers:
        return Grade(0.0, False, False, None)
    answer = numbers[-1]
    try:
        correct = int(answer) == int(reference.strip())
    except ValueError:
        correct = False
    return Grade(1.0 if correct else 0.0, correct, True, answer)


GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "answer_tags": grade_answer_tags,
    "last_number": grade_last_number,
}


def get_grader(name: str) -> Callable[[str, str], Grade]:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; expected one of {', '.join(GRADERS)}") from None
