import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from krpo_cli.rewards import (
    GRADERS,
    Grade,
    GraderError,
    extract_boxed,
    extract_gsm8k_answer,
    get_grader,
    grade_answer_tags,
    grade_last_number,
    grade_math_verify,
    grade_numeric,
    load_grader,
    reference_from_solution,
    user_grader_specs,
)
from conftest import write_recipe


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


# --- extraction helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{x^{2^{3}}} and \boxed {y}", "y"),
        (r"\boxed{1} and \boxed{\frac{1}{2}", None),  # the last box is unclosed
        ("no box here {}", None),
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("She pays 3 * 24 = <<3*24=72>>72 dollars.\n#### 72", "72"),
        ("In total 1000 grams.\n#### 1,000", "1000"),
        ("#### 1,234,567 ", "1234567"),
        ("a #### 3 then\n#### -5", "-5"),  # the last marker
        ("no marker 72", None),
        ("####   ", None),
    ],
)
def test_extract_gsm8k_answer(solution, expected):
    assert extract_gsm8k_answer(solution) == expected


def test_reference_from_solution():
    assert reference_from_solution("work\n#### 1,000") == "1000"
    assert reference_from_solution(r"so $\boxed{\frac{3}{4}}$.") == r"\frac{3}{4}"
    assert reference_from_solution("  42 \n") == "42"


# --- numeric ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, reference, correct, formatted, extracted",
    [
        ("<answer>72</answer>", "72", True, True, "72"),
        ("<answer>72.0</answer>", "72", True, True, "72.0"),
        ("<answer>72</answer>", "72.0", True, True, "72"),
        ("<answer>-3.5</answer>", "-3.5", True, True, "-3.5"),
        ("<answer>3.5</answer>", "-3.5", False, True, "3.5"),
        ("<answer>1,234</answer>", "1234", True, True, "1,234"),
        ("<answer>1234</answer>", "1,234", True, True, "1234"),
        ("<answer>1000</answer>", "#### 1,000", True, True, "1000"),
        ("<answer>7</answer> and later 9", "7", True, True, "7"),  # tags beat trailing numbers
        ("<answer>9</answer> and later 7", "7", False, True, "9"),
        ("<answer>x = 7</answer>", "7", True, True, "x = 7"),
        ("<answer>1/2</answer>", "0.5", True, True, "1/2"),
        ("<answer>0.5</answer>", "1/2", True, True, "0.5"),
        ("<answer>0.75</answer>", r"\frac{3}{4}", True, True, "0.75"),
        (r"<answer>\boxed{-\frac{3}{4}}</answer>", "-0.75", True, True, r"-\frac{3}{4}"),
        ("<answer>25%</answer>", "25", True, True, "25%"),
        ("<answer>none</answer> 7", "7", False, True, "none"),  # tags found, no number
        (r"so 5 then \boxed{6} and 7", "6", True, True, "6"),  # the box beats bare numbers
        (r"\boxed{5} \boxed{\frac{12}{2}}", "6", True, True, r"\frac{12}{2}"),
        ("2 - 6 = -4", "-4", True, False, "-4"),
        ("so there are 1,234 apples.", "1234", True, False, "1,234"),
        ("it is 0.1 + 0.2 = 0.30000000001", "0.3", True, False, "0.30000000001"),  # rel 1e-6
        ("it is 0.3001", "0.3", False, False, "0.3001"),
        ("it is 0.0000000001", "0", True, False, "0.0000000001"),  # abs 1e-9 near zero
        ("it is 0.001", "0", False, False, "0.001"),
        ("3 / 0 and 1/0", "1", False, False, "1/0"),  # division by zero is no number
        ("no digits", "7", False, False, None),
        ("<answer>7</answer>", "seven", False, True, "7"),  # a non-numeric reference
    ],
)
def test_numeric(completion, reference, correct, formatted, extracted):
    grade = grade_numeric(completion, reference)
    assert grade == Grade(1.0 if correct else 0.0, correct, formatted, extracted)


def test_numeric_huge_numbers_do_not_blow_up():
    assert not grade_numeric("<answer>1e999999999</answer>", "1").correct
    assert not grade_numeric("<answer>" + "9" * 5000 + "</answer>", "1").correct
    assert grade_numeric("<answer>1e300</answer>", "1e300").correct


# --- math_verify ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, reference",
    [
        (r"<answer>\frac{1}{2}</answer>", "0.5"),
        ("<answer>0.5</answer>", r"\frac{1}{2}"),
        ("<answer>1/2</answer>", r"\frac{1}{2}"),
        (r"<answer>\sqrt 2</answer>", r"\sqrt{2}"),
        (r"so \boxed{\sqrt{2}}", r"\sqrt 2"),
        ("<answer>[1,2)</answer>", "[1, 2)"),
        (r"<answer>$\dfrac{3}{4}$</answer>", "0.75"),
        (r"first \boxed{3} then \boxed{\frac{12}{2}}", "6"),
        ("<answer>72</answer>", "72"),
        (r"<answer>\boxed{72}</answer>", r"\boxed{72}"),
        ("<answer>1000</answer>", "#### 1,000"),
    ],
)
def test_math_verify_equivalent(completion, reference):
    grade = grade_math_verify(completion, reference)
    assert (grade.reward, grade.correct, grade.formatted) == (1.0, True, True)


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("<answer>0.33</answer>", r"\frac{1}{3}"),
        ("<answer>(1, 2)</answer>", "[1, 2)"),
        ("<answer>[1, 2]</answer>", "[1, 2)"),
        (r"<answer>\sqrt{3}</answer>", r"\sqrt{2}"),
        ("<answer>73</answer>", "72"),
        ("<answer>-72</answer>", "72"),
    ],
)
def test_math_verify_not_equivalent(completion, reference):
    grade = grade_math_verify(completion, reference)
    assert (grade.reward, grade.correct, grade.formatted) == (0.0, False, True)


def test_math_verify_needs_tags_or_box():
    assert grade_math_verify("the answer is 72", "72") == Grade(0.0, False, False, None)
    assert grade_math_verify(r"\boxed{72", "72").formatted is False  # unclosed box


@pytest.mark.parametrize(
    "completion",
    [r"<answer>\frac{}{</answer>", "<answer></answer>", r"<answer>}}{{\sqrt{</answer>", "<answer>" + "(" * 500 + "</answer>"],
)
def test_math_verify_weird_input_scores_zero(completion):
    grade = grade_math_verify(completion, "3")
    assert grade.reward == 0.0 and grade.correct is False


def test_math_verify_exception_inside_package_scores_zero(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy fell over")

    monkeypatch.setattr(math_verify, "verify", broken)
    assert grade_math_verify("<answer>1</answer>", "1").reward == 0.0


def test_math_verify_works_off_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(grade_math_verify(r"<answer>\frac{2}{4}</answer>", "0.5"))
    )
    worker.start()
    worker.join(timeout=60)
    assert results and results[0].correct


def test_math_verify_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(GraderError, match="pip install math-verify"):
        grade_math_verify("<answer>1</answer>", "1")
    with pytest.raises(ValueError, match="pip install math-verify"):
        get_grader("math_verify")


# --- registry and user graders ------------------------------------------------------------


def test_registered_graders():
    assert {"answer_tags", "last_number", "numeric", "math_verify"} <= set(GRADERS)
    assert get_grader("numeric") is grade_numeric
    assert load_grader("math_verify") is grade_math_verify
    assert issubclass(GraderError, ValueError)


USER_GRADERS = """
from krpo_cli.rewards import Grade

def as_float(completion, reference):
    return 0.25 if reference in completion else 0.0

def full_int(completion, reference):
    return 1

def as_bool(completion, reference):
    return completion.strip() == reference

def as_grade(completion, reference):
    return Grade(0.5, False, True, completion.upper())

def as_string(completion, reference):
    return "1.0"

NOT_CALLABLE = 3

def raises(completion, reference):
    raise ValueError("no score for\\nthis one")

def one_argument(completion):
    return 1.0
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "my_graders_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(USER_GRADERS)
    (tmp_path / "broken_grader_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_graders_pkg.scoring"
    for name in ("my_graders_pkg", "my_graders_pkg.scoring", "broken_grader_mod"):
        sys.modules.pop(name, None)


def test_user_grader_returning_float(user_module):
    grader = load_grader(f"{user_module}:as_float")
    assert grader("it is 7", "7") == Grade(0.25, False, True, None)
    assert grader("it is 8", "7") == Grade(0.0, False, True, None)
    assert grader.__name__ == "as_float"


def test_user_grader_returning_int_bool_and_grade(user_module):
    assert load_grader(f"{user_module}:full_int")("x", "y") == Grade(1.0, True, True, None)
    as_bool = load_grader(f"{user_module}:as_bool")
    assert as_bool("7", "7") == Grade(1.0, True, True, None)
    assert as_bool("8", "7") == Grade(0.0, False, True, None)
    assert get_grader(f"{user_module}:as_grade")("abc", "x") == Grade(0.5, False, True, "ABC")


def test_user_grader_bad_return_type(user_module):
    grader = load_grader(f"{user_module}:as_string")
    with pytest.raises(GraderError, match="returned str"):
        grader("x", "y")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown grader 'nope'"),
        ("my_graders_pkg.scoring", "unknown grader"),  # no colon
        ("my_graders_pkg/scoring:as_float", "unknown grader"),
        ("my_graders_pkg.scoring:as_float:x", "unknown grader"),
        ("1pkg:f", "unknown grader"),
        ("pkg.:f", "unknown grader"),
    ],
)
def test_load_grader_bad_form(user_module, spec, message):
    with pytest.raises(GraderError, match=message):
        load_grader(spec)


def test_load_grader_module_not_found(user_module):
    with pytest.raises(GraderError, match=r"'no_such_pkg_xyz\.mod:f'.*not found.*PYTHONPATH"):
        load_grader("no_such_pkg_xyz.mod:f")
    with pytest.raises(GraderError, match="my_graders_pkg.nothing_here.*not found"):
        load_grader("my_graders_pkg.nothing_here:f")


def test_load_grader_module_import_fails(user_module):
    with pytest.raises(GraderError, match="importing 'broken_grader_mod' failed.*no_such_dependency_xyz"):
        load_grader("broken_grader_mod:f")


def test_load_grader_missing_attribute(user_module):
    with pytest.raises(GraderError, match="has no attribute 'missing'"):
        load_grader(f"{user_module}:missing")


def test_load_grader_not_callable(user_module):
    with pytest.raises(GraderError, match="'NOT_CALLABLE' is a int, not a function"):
        load_grader(f"{user_module}:NOT_CALLABLE")


def test_math_verify_timeout_on_main_thread(monkeypatch):
    import time

    from krpo_cli import rewards

    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    grade = grade_math_verify("<answer>10^{10^{10}}</answer>", "3")  # hangs without a timeout
    assert grade.reward == 0.0 and grade.formatted
    assert time.monotonic() - start < 30


def test_a_grader_that_cannot_take_completion_and_reference_is_refused_at_load(user_module):
    for spec, shown in [("os:system", "system(command)"), (f"{user_module}:one_argument", "one_argument(completion)")]:
        with pytest.raises(GraderError, match=re.escape(f"{shown} cannot be called as function(completion, reference)")):
            load_grader(spec)


def test_a_builtin_without_a_signature_fails_at_its_first_call_in_one_line():
    grader = load_grader("builtins:iter")  # no signature to check: iter("x", "7") raises TypeError
    with pytest.raises(GraderError, match="user grader 'builtins:iter' raised TypeError: "):
        grader("x", "7")


def test_a_grader_that_raises_ends_in_one_line_naming_it(user_module):
    grader = load_grader(f"{user_module}:raises")
    with pytest.raises(GraderError) as raised:
        grader("x", "7")
    assert str(raised.value) == f"user grader '{user_module}:raises' raised ValueError: no score for this one"


def test_user_grader_specs_names_only_user_graders():
    from krpo_cli.config import RewardSettings

    assert user_grader_specs(RewardSettings(grader="numeric")) == []
    assert user_grader_specs(RewardSettings(grader="pkg.mod:score")) == ["pkg.mod:score"]


def test_a_grader_module_in_the_current_folder_is_imported_for_the_import_only(tmp_path, monkeypatch):
    (tmp_path / "grader_in_cwd_mod.py").write_text("def score(completion, reference):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert load_grader("grader_in_cwd_mod:score")("a", "b").reward == 1.0
    finally:
        sys.modules.pop("grader_in_cwd_mod", None)
    assert str(tmp_path) not in sys.path


GRADER_IN_FOLDER = "def score(completion, reference):\n    return float(completion == reference)\n"


@pytest.mark.parametrize("entry_point", ["krpo", "python -m krpo_cli"])
def test_both_entry_points_import_a_grader_from_the_current_folder(tmp_path, entry_point):
    (tmp_path / "folder_grader_mod.py").write_text(GRADER_IN_FOLDER)
    write_recipe(tmp_path / "mine.yaml", {"reward": {"grader": "folder_grader_mod:score"}})
    write_recipe(tmp_path / "missing.yaml", {"reward": {"grader": "no_such_folder_mod_xyz:score"}})
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "krpo")] if entry_point == "krpo" else [sys.executable, "-m", "krpo_cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([*command, "validate", "mine.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([*command, "validate", "missing.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "module 'no_such_folder_mod_xyz' not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_validate_imports_the_user_grader(tmp_path, user_module):
    from typer.testing import CliRunner

    from krpo_cli.cli import app

    runner = CliRunner()
    good = write_recipe(tmp_path / "good.yaml", {"reward": {"grader": f"{user_module}:as_float"}})
    assert runner.invoke(app, ["validate", str(good)]).exit_code == 0
    for spec, message in [("no_such_pkg_xyz.mod:f", "not found"), (f"{user_module}:one_argument", "cannot be called")]:
        result = runner.invoke(app, ["validate", str(good), f"reward.grader={spec}"])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_validate_imports_a_user_grader_but_not_torch(tmp_path):
    (tmp_path / "light_grader_mod.py").write_text(GRADER_IN_FOLDER)
    write_recipe(tmp_path / "r.yaml", {"reward": {"grader": "light_grader_mod:score"}})
    script = (
        "import sys; from typer.testing import CliRunner; from krpo_cli.cli import app; "
        "result = CliRunner().invoke(app, ['validate', 'r.yaml']); "
        "print(result.exit_code, 'light_grader_mod' in sys.modules, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["0", "True", "False"], done.stderr
