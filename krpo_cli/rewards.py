r"""Graders: turn a completion and its reference answer into a reward.

A grader is a function `(completion: str, reference: str) -> Grade`. The grader that
scores rewards during training is the one evaluation uses, so a reported accuracy means
the same thing as the training reward, and `Grade.correct` means full credit.

Built-in graders (the names a recipe's `reward.grader` may use):

- answer_tags (the paper's): the text inside the first <answer>…</answer> is compared
  with the reference: 1.0 when equal, 0.5 when it contains the reference, 0.01 when
  the tags are there but the answer is wrong, 0.0 when there are no tags. Surrounding
  whitespace inside the tags is ignored (the paper compares the raw text; we strip it
  so that `<answer> 20 </answer>` is not half-credited).
- last_number: 1.0 when the last integer in the completion equals the reference, else 0.
- numeric: the answer is the first <answer>…</answer> content, else the last
  `\boxed{…}` (or `\fbox{…}`), else the last number in the completion. It and the
  reference are read as numbers (signs, decimals, `1,234` thousands separators, a
  trailing `%` ignored, `a/b` and `\frac{a}{b}` fractions) and compared with relative
  tolerance 1e-6 (absolute 1e-9 near zero): 1.0 when equal, else 0.0. `formatted` is
  true only when the answer came from tags or a box, not from a bare number.
- math_verify: mathematical equivalence for competition math, decided by the
  `math-verify` package (`pip install math-verify`; imported only when this grader is
  asked for). The answer is the first <answer>…</answer> content, else the last
  `\boxed{…}`; the reference may be bare LaTeX, boxed, or a `####` solution.
  `\frac{1}{2}`, `0.5` and `1/2` are equal, as are `\sqrt{2}` and `\sqrt 2`, and
  intervals such as `[1, 2)` are compared as sets. 1.0 when equivalent, else 0.0;
  anything math-verify cannot parse scores 0.0. math-verify's signal-based timeouts
  (MATH_VERIFY_TIMEOUT_S) guard against answers such as `10^{10^{10}}` when grading
  runs on the main thread; on other threads they cannot work and are turned off.
- think_format: a format reward, TRL's think_format_reward: 1.0 when the completion starts
  with <think>, has a </think> and no second <think>, else 0.0; never `correct`.

Several graders (`reward.graders`: spec → weight, in order): the reward is the weighted sum
of their rewards; `correct`, `formatted` and `extracted` come from the first one, the
correctness grader (`WeightedGrader`, `load_reward`).

User graders: a recipe may name `package.module:function` instead of a built-in name.
`load_grader` imports the module from the current working folder, else from PYTHONPATH
and the installed packages (the same for `krpo` and `python -m krpo_cli`: the folder is
put on sys.path for the import only), and checks that the function can be called as
`function(completion, reference)`. It may return a `Grade`, or a plain number (bool, int
or float) that becomes `Grade(reward=float(x), correct=reward >= 1.0, formatted=True,
extracted=None)`; anything else (or NaN/infinity), and any exception it raises, is a
GraderError that names it. User code is imported and run only when a recipe names it
explicitly; nothing is discovered or imported otherwise, and a recipe krpo reads from a
folder (a run's, a merged model's) may not name it (see docs/security.md).

Answer extraction helpers: `extract_boxed`, `extract_gsm8k_answer` and
`reference_from_solution` (the last one is for dataset loading).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import numbers
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from krpo_cli.errors import KrpoError

_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool  # full credit
    formatted: bool  # the answer was in the expected format
    extracted: str | None  # what the grader read as the answer
    parts: tuple[float, ...] = ()  # under reward.graders: each grader's own reward, in the recipe's order


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


def grade_think_format(completion: str, reference: str) -> Grade:
    """1.0 when the completion opens with <think>, closes it with </think> and opens no second one,
    else 0.0 (TRL's think_format_reward). A format reward: `correct` is always False."""
    opened = completion.startswith("<think>")
    formatted = opened and "</think>" in completion and "<think>" not in completion[len("<think>"):]
    return Grade(1.0 if formatted else 0.0, False, formatted, None)


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (TRL's get_soft_overlong_punishment), from a completion's length in
    tokens: 0 up to max_length - buffer, then falling linearly to -1 at max_length, -1 beyond."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0


class GraderError(KrpoError, ValueError):
    """A grader cannot be found, loaded or run (bad spec, missing package, bad return)."""


# ---------------------------------------------------------------------------------------
# Answer extraction


_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{…}` or `\fbox{…}` in `text`, braces balanced.

    Nested braces are matched (`\boxed{\frac{1}{2}}` gives `\frac{1}{2}`) and escaped
    braces `\{`/`\}` are skipped. None when there is no box or the last one is unclosed.
    """
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    i = begin
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, `\{` and `\}` included
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None


_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def extract_gsm8k_answer(solution: str) -> str | None:
    """The answer after the last `####` of a GSM8K solution, stripped, `1,000` -> `1000`.

    None when there is no `####` or nothing follows it.
    """
    _, sep, tail = solution.rpartition("####")
    if not sep:
        return None
    answer = _DIGIT_COMMA.sub("", tail.strip())
    return answer or None


def reference_from_solution(text: str) -> str:
    """The reference answer of a dataset solution: its `####` answer, else its last boxed
    content, else the whole text stripped."""
    answer = extract_gsm8k_answer(text)
    if answer is not None:
        return answer
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return text.strip()


def _tagged_or_boxed(completion: str) -> str | None:
    """The first <answer> content (its last box if it holds one), else the last box."""
    match = _ANSWER_TAGS.search(completion)
    if match is not None:
        content = match.group(1)
        boxed = extract_boxed(content)
        return boxed if boxed is not None else content.strip()
    return extract_boxed(completion)


# ---------------------------------------------------------------------------------------
# numeric

# A number: optional sign, digits with optional `1,234` thousands groups, optional
# decimals and a short exponent (kept short so that `1e999999999` cannot be built); or
# `.5`. No match starts inside another number.
_NUMBER = (
    r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d{1,3}(?!\d))?"
    r"|(?<![\d.])-?\.\d+"
)
_NUMERIC_TOKEN = re.compile(
    rf"(?P<sign>-\s*)?\\[dt]?frac\s*\{{\s*(?P<fnum>{_NUMBER})\s*\}}\s*\{{\s*(?P<fden>{_NUMBER})\s*\}}"
    rf"|(?P<num>{_NUMBER})/(?P<den>{_NUMBER})"
    rf"|(?P<value>{_NUMBER})"
)
_NUMERIC_NOISE = re.compile(r"\\[!,;:]|\\\$|\\%|\$")


def _number(token: str) -> Fraction:
    return Fraction(token.replace(",", "").replace(" ", ""))


def _parse_number(text: str) -> Fraction | None:
    """The last number written in `text` (see _NUMERIC_TOKEN) as an exact fraction."""
    text = _NUMERIC_NOISE.sub("", text.replace("\u2212", "-").replace("{,}", ","))
    matches = list(_NUMERIC_TOKEN.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    try:
        if match.group("value") is not None:
            return _number(match.group("value"))
        if match.group("fnum") is not None:
            value = _number(match.group("fnum")) / _number(match.group("fden"))
            return -value if match.group("sign") else value
        return _number(match.group("num")) / _number(match.group("den"))
    except (ValueError, ZeroDivisionError):  # a zero denominator, too many digits
        return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Equal within relative tolerance 1e-6, or absolute 1e-9 near zero (exact arithmetic)."""
    return abs(a - b) <= max(Fraction(1, 10**6) * max(abs(a), abs(b)), Fraction(1, 10**9))


def grade_numeric(completion: str, reference: str) -> Grade:
    """1.0 when the answer (tags, else last box, else last number) equals the reference number."""
    answer = _tagged_or_boxed(completion)
    formatted = answer is not None
    if answer is None:
        bare = list(_NUMERIC_TOKEN.finditer(completion))
        if not bare:
            return Grade(0.0, False, False, None)
        answer = bare[-1].group(0)
    value = _parse_number(answer)
    gold = _parse_number(reference_from_solution(reference))
    correct = value is not None and gold is not None and _numbers_equal(value, gold)
    return Grade(1.0 if correct else 0.0, correct, formatted, answer)


# ---------------------------------------------------------------------------------------
# math_verify

MATH_VERIFY_TIMEOUT_S = 5  # per parse/comparison; used only on the main thread


def _import_math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:
        raise GraderError(
            f"the math_verify grader needs the math-verify package ({error}); "
            "install it with `pip install math-verify`"
        ) from None
    return math_verify


_MATH_DELIMITERS = re.compile(r"^\s*(?:\$\$?|\\\(|\\\[)(.*?)(?:\$\$?|\\\)|\\\])\s*$", re.DOTALL)


def _as_boxed(answer: str) -> str:
    match = _MATH_DELIMITERS.match(answer)
    if match is not None:
        answer = match.group(1)
    return "\\boxed{" + answer.strip() + "}"


def grade_math_verify(completion: str, reference: str) -> Grade:
    """1.0 when math-verify finds the answer (tags, else last box) equivalent to the reference."""
    mv = _import_math_verify()
    answer = _tagged_or_boxed(completion)
    if answer is None:
        return Grade(0.0, False, False, None)
    gold_text = reference_from_solution(reference)
    # math-verify's timeouts use signal.alarm, which only works on the main thread.
    on_main = threading.current_thread() is threading.main_thread()
    limit = MATH_VERIFY_TIMEOUT_S if on_main else None
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    try:
        gold = mv.parse(_as_boxed(gold_text), extraction_config=config, parsing_timeout=limit)
        target = mv.parse(_as_boxed(answer), extraction_config=config, parsing_timeout=limit)
        correct = bool(gold) and bool(target) and bool(mv.verify(gold, target, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 -- math-verify or sympy choking on odd input: no credit, no crash
        correct = False
    return Grade(1.0 if correct else 0.0, correct, True, answer)


# ---------------------------------------------------------------------------------------
# registry and user graders

GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "answer_tags": grade_answer_tags,
    "last_number": grade_last_number,
    "numeric": grade_numeric,
    "math_verify": grade_math_verify,
    "think_format": grade_think_format,
}

USER_GRADER_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


def _as_grade(spec: str, result: object) -> Grade:
    if isinstance(result, Grade):
        return result
    if isinstance(result, numbers.Real):
        reward = float(result)
        if not math.isfinite(reward):
            raise GraderError(f"user grader {spec!r} returned {reward}; return a finite number")
        return Grade(reward, reward >= 1.0, True, None)
    raise GraderError(
        f"user grader {spec!r} returned {type(result).__name__}; return a Grade or a number"
    )


def load_grader(spec: str) -> Callable[[str, str], Grade]:
    """A registered grader by name, or a user grader `package.module:function`.

    A user grader's module is imported here; its function may return a Grade or a
    number, and the returned callable always gives a Grade.
    """
    if spec in GRADERS:
        if spec == "math_verify":
            _import_math_verify()  # fail now, not at the first reward
        return GRADERS[spec]
    if not USER_GRADER_SPEC.fullmatch(spec):
        raise GraderError(
            f"unknown grader {spec!r}; expected one of {', '.join(GRADERS)} "
            "or a user grader written as package.module:function"
        )
    module_name, function_name = spec.split(":")
    try:
        with _current_folder_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            raise GraderError(
                f"grader {spec!r}: module {module_name!r} not found; "
                "put it in the current folder or on PYTHONPATH, or install its package"
            ) from None
        raise GraderError(f"grader {spec!r}: importing {module_name!r} failed: {error}") from error
    except Exception as error:
        raise GraderError(
            f"grader {spec!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error
    try:
        function = getattr(module, function_name)
    except AttributeError:
        raise GraderError(
            f"grader {spec!r}: module {module_name!r} has no attribute {function_name!r}; "
            "check the name after the colon"
        ) from None
    if not callable(function):
        raise GraderError(
            f"grader {spec!r}: {function_name!r} is a {type(function).__name__}, not a function "
            "(completion, reference) -> Grade | float"
        )
    _check_signature(spec, function)

    @functools.wraps(function)
    def user_grader(completion: str, reference: str) -> Grade:
        try:
            result = function(completion, reference)
        except Exception as error:  # noqa: BLE001 -- the user's code: one line naming it, not a traceback
            detail = " ".join(str(error).split())
            detail = detail if len(detail) <= 200 else detail[:197] + "…"
            raise GraderError(f"user grader {spec!r} raised {type(error).__name__}: {detail}") from error
        return _as_grade(spec, result)

    return user_grader


def _check_signature(spec: str, function: Callable) -> None:
    """Refuses, at load time, a function that cannot be called as function(completion, reference)."""
    try:
        signature = inspect.signature(function)
    except (ValueError, TypeError):  # some builtins have none: a wrong one fails at the first call, in one line
        return
    try:
        signature.bind("completion", "reference")
    except TypeError:
        raise GraderError(
            f"grader {spec!r}: {spec.split(':')[1]}{signature} cannot be called as "
            "function(completion, reference); a grader takes those two strings and returns a Grade or a number"
        ) from None


@contextlib.contextmanager
def _current_folder_importable():
    """The current working folder on sys.path while a user grader's module is imported.

    So `krpo` finds a grader module in the folder it is run from, as `python -m krpo_cli` does
    (which puts that folder on sys.path for good); installed packages and PYTHONPATH come after it.
    """
    try:
        folder = os.getcwd()
    except OSError:  # the folder was deleted
        yield
        return
    if folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def user_grader_specs(reward) -> list[str]:
    """The user graders (`package.module:function`) that reward settings name, in order, each once.

    Built-in names are left out: these are the modules krpo would import, asked about before any is
    (`krpo validate` imports them; a recipe read from a folder may not name one, see docs/security.md).
    """
    specs = []
    for name in grader_names(reward):
        if name not in GRADERS and name not in specs:
            specs.append(name)
    return specs


def grader_names(reward) -> list[str]:
    """Every grader name in a reward section (RewardSettings), the correctness grader first: its graders
    when set, else its grader."""
    graders = getattr(reward, "graders", None)
    return list(graders) if graders else [reward.grader]


def get_grader(name: str) -> Callable[[str, str], Grade]:
    """The grader a recipe names: a registered name or a `package.module:function`."""
    return load_grader(name)


class WeightedGrader:
    """Several graders as one (`reward.graders`): the reward is the weighted sum of their rewards
    (TRL's reward_funcs with reward_weights); `correct`, `formatted` and `extracted` are the first
    grader's, the correctness grader that evaluation's accuracy counts; `parts` holds each
    grader's own, unweighted reward."""

    def __init__(self, graders: dict[str, Callable[[str, str], Grade]], weights: dict[str, float]):
        self.names = list(graders)
        self.graders = [graders[name] for name in self.names]
        self.weights = [float(weights[name]) for name in self.names]

    def __call__(self, completion: str, reference: str) -> Grade:
        grades = [grader(completion, reference) for grader in self.graders]
        reward = math.fsum(weight * grade.reward for weight, grade in zip(self.weights, grades))
        first = grades[0]
        return Grade(reward, first.correct, first.formatted, first.extracted, tuple(g.reward for g in grades))


def load_reward(
    grader: str, graders: dict[str, float], load: Callable[[str], Callable[[str, str], Grade]] = load_grader
) -> Callable[[str, str], Grade]:
    """The recipe's reward: `reward.graders` (spec → weight) weighted when given, else `reward.grader`.

    Each grader is loaded with `load` (load_grader: a built-in name or a user grader).
    """
    if not graders:
        return load(grader)
    return WeightedGrader({spec: load(spec) for spec in graders}, graders)
