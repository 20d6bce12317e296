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


def test_rows_without_question_or_answer_are_skipped_and_counted_once(tmp_path, capsys, monkeypatch):
    import krpo_cli.data

    monkeypatch.setattr(krpo_cli.data, "_noted", set(), raising=False)  # notes already given in this process
    good = [{"question": f"{i} + 1", "answer": str(i + 1)} for i in range(8)]
    bad = [{"question": "no answer"}, {"question": "null answer", "answer": None}, {"answer": "7"},
           {"question": "  ", "answer": "3"}, {"question": "blank answer", "answer": " \t"}]
    path = write_jsonl(tmp_path / "gaps.jsonl", good[:4] + bad + good[4:])
    settings = file_settings(path, test_size=2)
    train, test = load_rows(settings, "train"), load_rows(settings, "test")
    assert sorted(r["question"] for r in train + test) == sorted(r["question"] for r in good)
    assert all(r["answer"] != "None" and r["question"].strip() for r in train + test)
    err = capsys.readouterr().err
    assert err.count("data: skipped 5 of 13 rows") == 1, err  # both splits read the file; one note
    assert "'question' or 'answer'" in err


def test_no_usable_row_is_an_error_naming_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"problem": "1+1", "solution": None}, {"problem": "", "solution": "2"}])
    with pytest.raises(DataError, match=r"none of its 2 rows has both a question \('problem'\) and an answer \('solution'\)"):
        load_rows(file_settings(path, question_field="problem", answer_field="solution"), "train")


def test_csv_cells_are_read_as_written(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text('question,answer,level\nq1,30,1\nq2,,2\nq3,1320,3\nq4,NA,4\nq5,007,5\n', encoding="utf-8")
    rows = load_rows(file_settings(path, test_size=0, answer_format="raw"), "train")
    # An empty cell made pandas read the column as float: every reference was "30.0", "1320.0".
    assert [(r["question"], r["answer"]) for r in rows] == [("q1", "30"), ("q3", "1320"), ("q4", "NA"), ("q5", "007")]


def test_json_numbers_keep_their_type(tmp_path):
    # pyarrow reads a column of 30 and 2.5 as floats, which made the int 30 the reference "30.0"
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"question": "a", "answer": 30}, {"question": "b", "answer": 2.5},
                                                    {"question": "c", "answer": 30.0}])
    rows = load_rows(file_settings(path, test_size=0, answer_format="raw"), "train")
    assert [r["answer"] for r in rows] == ["30", "2.5", "30.0"]


def test_test_size_that_leaves_fewer_training_rows_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", GSM8K_ROWS + GSM8K_ROWS[:10])  # 30 rows
    for size, held in ((500, 30), (16, 16), (0.6, 18)):  # openmath's 500 silently held out 29 and trained on 1
        with pytest.raises(DataError) as info:
            load_rows(file_settings(path, test_size=size), "train")
        assert str(info.value) == (
            f"data.test_size={size:g} would hold out {held} of the 30 rows of '{path}', "
            f"leaving {30 - held} to train on; set data.test_size to at most 15"
        )
    train, test = load_rows(file_settings(path, test_size=15), "train"), load_rows(file_settings(path, test_size=15), "test")
    assert (len(train), len(test)) == (15, 15)
    assert len(load_rows(file_settings(path, test_size=0.5), "test")) == 15


@pytest.mark.parametrize("size", [1.5, 500.25])
def test_test_size_is_a_fraction_or_a_whole_count(size):
    with pytest.raises(ValueError, match=rf"data.test_size: {size:g} is neither a fraction below 1 .* nor a whole number"):
        DataSettings(test_size=size)
    assert DataSettings(test_size=0.25).test_size == 0.25 and DataSettings(test_size=500).test_size == 500


def test_validate_refuses_an_unsupported_file_suffix(tmp_path):
    result = runner.invoke(app, ["validate", "quickstart", "data.source=file", "data.path=t.tsv"])
    assert result.exit_code == 2
    assert "data.path: 't.tsv' has an unsupported format (.tsv); use one of .jsonl, .json, .parquet, .csv" in result.output
    assert runner.invoke(app, ["validate", "quickstart", "data.source=file", "data.path=t.CSV"]).exit_code == 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("header_only.csv", "question,answer\n\n", r"dataset file '.*header_only.csv' has no rows \(only a header\)"),
        ("blank.jsonl", "\n  \n", r"dataset file '.*blank.jsonl' has no rows"),
        ("broken.jsonl", '{"question": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": "4"}}\n',
         r"dataset file '.*broken.jsonl' line 3: not valid JSON: Extra data \(column 35\)"),
        ("list.jsonl", '{"question": "1+1", "answer": "2"}\n[1, 2]\n', r"dataset file '.*list.jsonl' line 2: not a JSON object \(list\)"),
        ("ragged.csv", "question,answer\n1+1,2\n2+2,4,extra\n",
         r"cannot read '.*ragged.csv' as csv: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"),
        ("pretty.json", '[\n  {"question": "1+1", "answer": "2"},\n  {"question": "2+2" "answer": "4"}\n]\n',
         r"dataset file '.*pretty.json' line 3: not valid JSON: Expecting ',' delimiter"),
    ],
)
def test_unreadable_files_say_where_without_library_noise(tmp_path, capfd, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_rows(file_settings(path), "train")
    assert "Failed to" not in capfd.readouterr().err  # the datasets library's own log line


def test_empty_parquet_has_no_rows(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=r"dataset file '.*empty.parquet' has no rows"):
        load_rows(file_settings(path), "train")
    assert "Failed to" not in capfd.readouterr().err


def test_relative_file_path_is_stored_absolute_and_resumes(tmp_path, monkeypatch):
    from krpo_cli.config import Recipe
    from krpo_cli.recipe_loading import recipe_to_yaml
    from krpo_cli.run_dir import check_resumable

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    write_jsonl(work / "small.jsonl", GSM8K_ROWS)
    monkeypatch.chdir(work)
    recipe = Recipe.model_validate({"data": {"source": "file", "path": "small.jsonl", "test_split": None, "test_size": 5}})
    assert recipe.data.path == str((work / "small.jsonl").resolve())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    check_resumable(run_dir, Recipe.model_validate({"data": {"source": "file", "path": "small.jsonl", "test_split": None, "test_size": 5}}))
    # A run saved by an older krpo holds the path as typed, and still resumes from the same directory.
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe).replace(recipe.data.path, "small.jsonl"), encoding="utf-8")
    assert "path: small.jsonl" in (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    check_resumable(run_dir, recipe)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    monkeypatch.chdir(elsewhere)  # `krpo eval RUN` from another directory reads the saved recipe
    import yaml

    saved = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
    assert len(load_rows(saved.data, "test")) == 5
    monkeypatch.setenv("HOME", str(work))
    assert DataSettings(source="file", path="~/small.jsonl").path == str((work / "small.jsonl").resolve())
    assert DataSettings(source="hub", path="openai/gsm8k").path == "openai/gsm8k"


def test_filters_find_a_field_the_first_row_lacks(tmp_path):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4", "subject": "sums"}]
    path = write_jsonl(tmp_path / "ragged.jsonl", rows)
    kept = load_rows(file_settings(path, test_size=0, filters={"subject": ["sums"]}), "train")
    assert [r["question"] for r in kept] == ["2+2"]


def test_a_hub_split_is_read_row_by_row_and_its_test_split_alone(monkeypatch):
    import datasets

    from krpo_cli import data

    splits = {
        "train": datasets.Dataset.from_list([{"q": "1 + 1", "a": "2"}, {"q": "2 + 2", "a": None}]),
        "test": datasets.Dataset.from_list([{"q": "3 + 3", "a": "6"}]),
    }
    loaded = []

    def load_table(settings, split_name):  # stands in for the hub: datasets.Dataset objects, as load_dataset returns
        loaded.append(split_name)
        return splits.get(split_name)

    monkeypatch.setattr(data, "_load_table", load_table)
    settings = DataSettings(source="hub", path="org/set", question_field="q", answer_field="a", answer_format="raw")
    assert load_rows(settings, "test") == [{"question": "3 + 3", "answer": "6"}]
    assert loaded == ["test"]  # the train split is not read to evaluate
    assert load_rows(settings, "train") == [{"question": "1 + 1", "answer": "2"}]  # the row without an answer skipped


def test_a_jsonl_file_holding_one_json_array_is_read(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([{"question": "1 + 1", "answer": 2}, {"question": "2 + 2", "answer": 4}], indent=1))
    rows = load_rows(file_settings(path, test_size=0, answer_format="raw"), "train")
    assert [r["answer"] for r in rows] == ["2", "4"]


def test_half_the_rows_may_be_held_out_whatever_their_parity(tmp_path):
    for total in (7, 9, 30):
        path = write_jsonl(tmp_path / f"rows{total}.jsonl", [{"question": f"{i} + 0", "answer": str(i)} for i in range(total)])
        test = load_rows(file_settings(path, test_size=0.5, answer_format="raw"), "test")
        assert len(test) == round(total / 2)


def test_no_held_out_rows_names_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", GSM8K_ROWS)
    with pytest.raises(DataError, match=r"no test rows: data.test_size is 0; .* or set eval.every=0"):
        load_rows(file_settings(path, test_size=0), "test")


def test_the_rows_digest_follows_content_and_order_and_takes_any_text():
    from krpo_cli.data import rows_digest

    rows = [{"question": "1 + 1", "answer": "2"}, {"question": "lone surrogate \ud83d", "answer": "3", "level": 2}]
    assert rows_digest(rows) == rows_digest([dict(reversed(list(r.items()))) for r in rows])  # key order aside
    assert rows_digest(rows) != rows_digest(rows[::-1])
    assert rows_digest(rows) != rows_digest([rows[0], {**rows[1], "answer": "4"}])


def test_a_hold_out_never_takes_every_row(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"question": "1 + 0", "answer": "1"}])
    with pytest.raises(DataError, match="would hold out 1 of the 1 rows .* at most 0"):
        load_rows(file_settings(path, test_size=1, answer_format="raw"), "train")


def test_list_or_mapping_questions_and_answers_are_skipped_and_counted(tmp_path, capsys, monkeypatch):
    import krpo_cli.data

    monkeypatch.setattr(krpo_cli.data, "_noted", set(), raising=False)
    good = [{"question": f"{i} + 1", "answer": str(i + 1)} for i in range(6)]
    bad = [{"question": {"text": "1 + 1"}, "answer": "2"}, {"question": ["1 + 1"], "answer": "2"},
           {"question": "1 + 1", "answer": [2]}, {"question": "1 + 1", "answer": {"value": 2}}]
    path = write_jsonl(tmp_path / "objects.jsonl", good[:3] + bad + good[3:])
    rows = load_rows(file_settings(path, test_size=0), "train")
    assert [r["question"] for r in rows] == [r["question"] for r in good]  # never "{'text': '1 + 1'}"
    assert "data: skipped 4 of 10 rows" in capsys.readouterr().err


def test_lone_surrogates_in_data_become_replacement_characters(tmp_path):
    path = tmp_path / "surrogates.jsonl"
    path.write_text('{"question": "2 + \\ud800 2", "answer": "\\udc80", "tag": "x\\udfff"}\n' * 2
                    + '{"question": "1 + 1", "answer": "2"}\n' * 2, encoding="utf-8")
    rows = load_rows(file_settings(path, test_size=0), "train")
    assert rows[0]["question"] == "2 + \ufffd 2" and rows[0]["answer"] == "\ufffd" and rows[0]["tag"] == "x\ufffd"
    json.dumps(rows, ensure_ascii=False).encode("utf-8")  # writable as samples.jsonl is


def test_overlong_prompts_are_skipped_and_counted(tiny_model_dir, capsys, monkeypatch):
    import krpo_cli.data
    from transformers import AutoTokenizer

    from krpo_cli.data import drop_overlong

    monkeypatch.setattr(krpo_cli.data, "_noted", set(), raising=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # one token per character
    settings = DataSettings(source="digits", system_prompt="", prompt_template="{question}")
    rows = [{"question": "1 + 1"}, {"question": "1 + " * 25_000 + "1"}, {"question": "é" * 40}]
    assert drop_overlong(rows, tokenizer, settings, 100, "the rows") == [rows[0], rows[2]]  # 40 'é' are 80 bytes, 40 tokens
    assert "data: skipped 1 of 3 rows of the rows whose prompt has more than 100 tokens" in capsys.readouterr().err
    assert drop_overlong(rows, tokenizer, settings, None, "the rows") == rows  # a model of unknown context
    with pytest.raises(DataError, match="no question of the rows fits the model's context"):
        drop_overlong(rows[1:2], tokenizer, settings, 100, "the rows")


def test_a_hub_dataset_in_either_cache_is_left_to_the_library(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from krpo_cli.hub import dataset_maybe_cached

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert not dataset_maybe_cached("org/rows")
    (tmp_path / "datasets" / "org___rows").mkdir(parents=True)  # prepared by `datasets` on an earlier run
    assert dataset_maybe_cached("org/rows")
    (tmp_path / "hub" / "datasets--org--more").mkdir(parents=True)  # downloaded into the hub cache
    assert dataset_maybe_cached("org/more") and not dataset_maybe_cached("org/other")
