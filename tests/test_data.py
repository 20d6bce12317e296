"""Datasets through the `datasets` library: local files, field mapping, answer extraction,
filters, held-out splits and an unreachable hub — all offline."""

import json
import time

import pytest
from typer.testing import CliRunner

from krpo_cli.cli import app
from krpo_cli.config import DataSettings
from krpo_cli.data import DataError, load_rows
from conftest import read_jsonl

runner = CliRunner()

GSM8K_ROWS = [
    {"question": f"Tom has {i} apples and buys {i + 2} more. How many now?", "answer": f"He has {i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2:,}"}
    for i in range(0, 1200, 60)
]
MATH_ROWS = [
    {
        "problem": f"Compute $\\frac{{{i}}}{{2}}$.",
        "solution": f"We get $\\boxed{{\\frac{{{i}}}{{2}}}}$.",
        "answer": f"\\frac{{{i}}}{{2}}",
        "subject": ["Algebra", "Geometry", "Number Theory"][i % 3],
        "level": i % 5 + 1,
    }
    for i in range(1, 31)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def file_settings(path, **extra) -> DataSettings:
    return DataSettings(source="file", path=str(path), **extra)


def test_gsm8k_answers_are_extracted_and_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    settings = file_settings(path, answer_format="gsm8k", test_size=5)
    train, test = load_rows(settings, "train"), load_rows(settings, "test")
    assert len(train) == 15 and len(test) == 5
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in test)
    assert load_rows(settings, "test") == test  # the same seed gives the same hold-out
    by_question = {r["question"]: r["answer"] for r in train + test}
    assert by_question[GSM8K_ROWS[-1]["question"]] == "2,282".replace(",", "")  # '#### 2,282' → '2282'
    other_seed = load_rows(file_settings(path, answer_format="gsm8k", test_size=5, split_seed=1), "test")
    assert other_seed != test


def test_math_format_boxed_answers_filters_and_groups(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    settings = file_settings(
        path, question_field="problem", answer_field="solution", answer_format="boxed", test_size=0.2,
        filters={"subject": ["Algebra", "Geometry"]},
    )
    rows = load_rows(settings, "train") + load_rows(settings, "test")
    assert len(rows) == 20 and {r["subject"] for r in rows} == {"Algebra", "Geometry"}
    first = next(r for r in rows if r["question"] == MATH_ROWS[0]["problem"])
    assert first["answer"] == "\\frac{1}{2}" and first["level"] == 2
    short = load_rows(file_settings(path, question_field="problem", answer_field="answer", max_question_chars=22), "train")
    assert short and all(len(r["question"]) <= 22 for r in short) and len(short) <= 9


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_other_file_formats(tmp_path, suffix):
    import datasets

    table = datasets.Dataset.from_list([{"q": f"{i} + {i}", "a": str(2 * i)} for i in range(10)])
    path = tmp_path / f"data{suffix}"
    {".csv": table.to_csv, ".parquet": table.to_parquet, ".json": table.to_json}[suffix](str(path))
    rows = load_rows(file_settings(path, question_field="q", answer_field="a", test_size=0), "train")
    assert len(rows) == 10 and rows[3] == {"question": "3 + 3", "answer": "6"}


@pytest.mark.parametrize(
    "content, settings_extra, message",
    [
        ('{"question": "1+1"}\n', {}, "no field 'answer'"),
        ("", {}, "empty"),
        (b"\xff\xfe\x00bad", {}, "UTF-8"),
        ('{"question": "1+1", "answer": "2"}\n', {"filters": {"subject": ["x"]}}, "no field 'subject'"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, settings_extra, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        load_rows(file_settings(path, **settings_extra), "train")


def test_unreachable_hub_fails_fast_with_advice():
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_rows(DataSettings(source="hub", path="openai/gsm8k", config="main"), "train")
    assert time.perf_counter() - started < 10  # the library's own retry loop takes ~20 s
    assert "data.source=file data.path=FILE" in str(info.value)


@pytest.mark.parametrize(
    "recipe_name, rows, fields",
    [
        ("gsm8k", GSM8K_ROWS, []),
        ("math", MATH_ROWS, ["data.answer_field=solution"]),
        ("openmath", [{"problem": r["problem"], "expected_answer": r["answer"], "problem_source": r["subject"]} for r in MATH_ROWS], []),
    ],
)
def test_shipped_hub_recipes_train_offline_on_a_local_copy(tmp_path, tiny_model_dir, recipe_name, rows, fields):
    path = write_jsonl(tmp_path / "local.jsonl", rows)
    result = runner.invoke(
        app,
        ["train", recipe_name, "data.source=file", f"data.path={path}", "data.test_split=null", "data.test_size=6",
         f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path}", "train.steps=1",
         "train.prompts_per_step=2", "algorithm.group_size=2", "train.minibatch_size=4", "generation.max_new_tokens=4",
         "eval.every=0", *fields],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / recipe_name
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    evaluated = runner.invoke(app, ["eval", str(run_dir), "--max-new-tokens", "3"])
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["num_questions"] == 6
    if recipe_name != "gsm8k":  # per-category results from the subject / source column
        assert results["by_group"], results


def test_hub_recipe_offline_exits_2_quickly(tmp_path):
    started = time.perf_counter()
    result = runner.invoke(app, ["train", "gsm8k", f"run.output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "data.source=file" in result.output and "Traceback" not in result.output
    assert time.perf_counter() - started < 10
