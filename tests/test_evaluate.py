import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from krpo_cli import train as train_module
from krpo_cli.cli import app
from krpo_cli.config import Recipe
from krpo_cli.evaluate import breakdown, grouping_columns, resolve_target, summarise
from krpo_cli.run_dir import adapter_label
from conftest import make_adapter, read_jsonl, tiny_recipe, write_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("runs")
    return train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, out, train={"steps": 1})))


def test_summary_and_breakdown_hand_counted():
    records = [
        {"correct": True, "reward": 1.0, "formatted": True, "op": "+", "sample_correct": [True, False]},
        {"correct": False, "reward": 0.0, "formatted": True, "op": "+", "sample_correct": [False, False]},
        {"correct": False, "reward": 0.01, "formatted": False, "op": "-", "sample_correct": [True, True]},
    ]
    metrics = summarise(records, samples=2)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["mean_reward"] == pytest.approx(1.01 / 3)
    assert metrics["format_rate"] == pytest.approx(2 / 3)
    assert metrics["mean@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    by_op = breakdown(records, ["op"])["op"]
    assert by_op["+"] == {"n": 2, "accuracy": 0.5, "mean_reward": 0.5}
    assert by_op["-"]["n"] == 1 and by_op["-"]["accuracy"] == 0.0


def test_grouping_columns_skip_ids_and_free_text():
    rows = [{"id": str(i), "question": f"q{i}", "answer": str(i), "level": i % 3, "note": f"n{i}"} for i in range(40)]
    assert grouping_columns(rows) == ["level"]


def test_eval_run_dir_matches_hand_count(run_dir):
    result = runner.invoke(app, ["eval", str(run_dir), "--limit", "12", "--batch-size", "5", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    samples = read_jsonl(run_dir / "eval" / "samples.jsonl")
    assert len(samples) == 12 == results["num_questions"]
    assert results["metrics"]["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert results["metrics"]["mean_reward"] == pytest.approx(sum(s["reward"] for s in samples) / 12)
    assert results["adapter"].endswith("adapter") and results["settings"]["grader"] == "last_number"
    by_op = results["by_group"]["op"]
    assert sum(g["n"] for g in by_op.values()) == 12
    for op, group in by_op.items():
        members = [s for s in samples if s["op"] == op]
        assert group["accuracy"] == pytest.approx(sum(s["correct"] for s in members) / len(members))
    assert {"question", "reference", "completion", "extracted", "reward"} <= samples[0].keys()
    assert "accuracy (greedy pass@1)" in result.output


def test_eval_baseline_without_adapter(run_dir):
    result = runner.invoke(app, ["eval", str(run_dir), "--no-adapter", "--limit", "4", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "eval-base" / "results.json").read_text())
    assert results["adapter"] is None and results["num_questions"] == 4


def test_eval_foreign_jsonl_with_samples(tmp_path, tiny_model_dir):
    data = tmp_path / "mine.jsonl"
    rows = [{"question": f"{i} + 1", "answer": str(i + 1), "subject": "add" if i % 2 else "sum"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["eval", str(tiny_model_dir), "--adapter", str(adapter), "--recipe", str(recipe), "--data", str(data),
         "--samples", "3", "--max-new-tokens", "3", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert results["num_questions"] == 6 and set(results["by_group"]["subject"]) == {"add", "sum"}
    assert 0.0 <= metrics["mean@3"] <= metrics["pass@3"] <= 1.0
    samples = read_jsonl(out / "samples.jsonl")
    assert all(len(s["sample_correct"]) == 3 for s in samples)
    assert metrics["pass@3"] == pytest.approx(sum(any(s["sample_correct"]) for s in samples) / 6)


def test_eval_missing_data_file_exits_2(run_dir, tmp_path):
    result = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_in_training_evaluation_is_logged(tmp_path, tiny_model_dir):
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 3}, eval={"every": 2, "size": 4})
    )
    metrics = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    assert ["eval/accuracy" in m for m in metrics] == [False, True, True]  # every 2 steps and at the end
    assert all(0.0 <= m["eval/accuracy"] <= 1.0 for m in metrics if "eval/accuracy" in m)


def test_eval_user_mistakes_exit_2(run_dir, tmp_path):
    for args, message in [
        (["--adapter", str(tmp_path)], "not a PEFT adapter directory"),
        (["--split", "validation", "--data", "digits"], "unknown split"),
    ]:
        result = runner.invoke(app, ["eval", str(run_dir), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_dataset_columns_cannot_overwrite_graded_fields(tmp_path, tiny_model_dir):
    data = tmp_path / "tricky.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1", "answer": "zzz", "reward": 1.0, "correct": True}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["accuracy"] == 0.0  # "zzz" is never the last number; the column's True is ignored


def fake_run_dir(directory: Path, recipe: dict) -> Path:
    """A run directory as far as `krpo eval` looks before loading a model: recipe.yaml and adapter/."""
    (directory / "adapter").mkdir(parents=True)
    (directory / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    write_recipe(directory / "recipe.yaml", recipe)
    return directory


def test_default_output_folder_differs_for_every_adapter(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default for a named model is relative: runs/eval/NAME
    q1 = fake_run_dir(Path("runs/q1"), tiny_recipe(tiny_model_dir, Path("runs")))
    r1 = fake_run_dir(Path("runs/r1"), tiny_recipe(tiny_model_dir, Path("runs")))

    def out(target, adapter=None, no_adapter=False):
        return resolve_target(target, adapter, None, no_adapter, None).output_dir

    model = "smollm2-135m-instruct"
    assert out(model, "runs/q1/adapter") == Path("runs/eval/smollm2-135m-instruct+q1")
    assert out(model, "runs/r1/adapter/") == Path("runs/eval/smollm2-135m-instruct+r1")
    assert out(model) == Path("runs/eval/smollm2-135m-instruct")
    assert out(str(tiny_model_dir), "runs/q1/adapter") == tiny_model_dir / "eval+q1"
    # A run directory: its own adapter, named or not, writes RUN/eval; another run's adapter does not.
    assert out(str(q1)) == out(str(q1), "runs/q1/adapter") == q1 / "eval"
    assert out(str(q1), "runs/r1/adapter") == q1 / "eval+r1"
    assert out(str(q1), no_adapter=True) == q1 / "eval-base"
    assert resolve_target(model, "runs/q1/adapter", None, False, tmp_path / "mine").output_dir == tmp_path / "mine"


def test_adapter_label_names_the_run():
    assert adapter_label(Path("runs/q1/adapter")) == "q1"
    assert adapter_label(Path("runs/q1/checkpoints/step_000010/adapter")) == "q1-step_000010"
    assert adapter_label(Path("downloads/my-lora")) == "my-lora"


def test_adapter_of_a_run_is_evaluated_with_the_run_recipe(tmp_path, tiny_model_dir):
    prompt = {"data": {"prompt_template": "Q1 asks: {question}"}}
    q1 = fake_run_dir(tmp_path / "q1", tiny_recipe(tiny_model_dir, tmp_path, **prompt))
    chosen = resolve_target("smollm2-135m-instruct", str(q1 / "adapter"), None, False, None)
    assert chosen.recipe.data.prompt_template == "Q1 asks: {question}"
    assert chosen.recipe.reward.grader == "last_number"  # the default recipe's grader is answer_tags
    assert chosen.recipe_source == str(q1 / "recipe.yaml")
    checkpoint_adapter = q1 / "checkpoints" / "step_000002" / "adapter"
    checkpoint_adapter.mkdir(parents=True)
    (checkpoint_adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    from_checkpoint = resolve_target("m", str(checkpoint_adapter), None, False, None)
    assert from_checkpoint.recipe.data.prompt_template == "Q1 asks: {question}"
    assert from_checkpoint.output_dir.name == "m+q1-step_000002"
    # --recipe still wins; an adapter outside a run gets the default recipe.
    other = write_recipe(tmp_path / "other.yaml", tiny_recipe(tiny_model_dir, tmp_path, reward={"grader": "numeric"}))
    assert resolve_target("m", str(q1 / "adapter"), str(other), False, None).recipe.reward.grader == "numeric"
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert resolve_target("m", str(loose), None, False, None).recipe.reward.grader == "answer_tags"


def test_eval_model_with_a_run_adapter_end_to_end(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["eval", str(tiny_model_dir), "--adapter", str(run_dir / "adapter"), "--limit", "1", "--max-new-tokens", "2",
         "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["grader"] == "last_number" and results["dataset"].startswith("digits")
    printed = "".join(result.output.split())  # Rich wraps long paths anywhere
    assert f"promptandgraderfrom{run_dir / 'recipe.yaml'}" in printed
    assert "1question·" in printed and "1questions" not in printed


def test_no_adapter_with_adapter_exits_2(run_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["eval", str(run_dir), "--no-adapter", "--adapter", str(run_dir / "adapter"), "--output", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "--no-adapter and --adapter contradict each other" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_eval_help_lists_every_accepted_dataset_and_each_default_output():
    from krpo_cli.config import DataSettings
    from krpo_cli.data import BUILTIN_DATASETS

    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for name in (*BUILTIN_DATASETS, *DataSettings.FILE_FORMATS):  # whole words: "arithmetic-easy" does not list "arithmetic"
        assert re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text), name
    for default in ("RUN/eval,", "RUN/eval-base", "runs/eval/NAME", "runs/eval/NAME+q1"):
        assert default in text, default


def test_data_help_names_the_datasets_it_can_write():
    # `krpo data` lives beside `krpo eval --data`: its help must not promise datasets it cannot write.
    from krpo_cli.cli import data_app

    commands = [command.name or command.callback.__name__ for command in data_app.registered_commands]
    assert commands == ["arithmetic"]
    result = runner.invoke(app, ["data", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "Write a built-in dataset as JSONL: arithmetic" in result.output
    assert "datasets" not in data_app.info.help


def test_eval_of_a_stopped_run_uses_its_latest_checkpoint(tmp_path, tiny_model_dir):
    from conftest import stopped_run

    run = stopped_run(tiny_model_dir, tmp_path / "runs")
    result = runner.invoke(app, ["eval", str(run), "--limit", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    checkpoint = run / "checkpoints" / "step_000001"
    assert f"run stopped at step 1 of 4; using checkpoint {checkpoint}" in result.output.splitlines()
    assert json.loads((run / "eval" / "results.json").read_text())["adapter"] == str(checkpoint / "adapter")


def test_eval_of_a_run_stopped_before_any_checkpoint_says_so(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    write_recipe(run / "recipe.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 2
    assert "stopped before its first checkpoint was written" in result.output


def test_eval_lines_with_paths_are_not_wrapped_on_a_narrow_console(run_dir, tmp_path, monkeypatch):
    from rich.console import Console

    from krpo_cli import cli

    monkeypatch.setattr(cli, "console", Console(width=40))  # not a terminal: a log
    out = tmp_path / "a-rather-long-folder-name-for-the-results"
    result = runner.invoke(app, ["eval", str(run_dir), "--limit", "2", "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("krpo eval ") and f" + adapter {run_dir / 'adapter'} · " in line
               and line.endswith(f"prompt and grader from {run_dir / 'recipe.yaml'}") for line in lines), lines
    assert f"wrote {out / 'results.json'} and samples.jsonl" in lines
