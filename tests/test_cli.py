import hashlib

import pytest

from typer.testing import CliRunner

from krpo_cli.cli import app
from conftest import tiny_recipe, write_recipe, read_jsonl

runner = CliRunner()
TEST_SPLIT_SHA256 = "3c18c6916b96d4b4819dc5847c065fd19b59434892caa0662888a2b0084c563e"


def test_data_arithmetic_test_split_matches_published_hash(tmp_path):
    out = tmp_path / "test.jsonl"
    result = runner.invoke(app, ["data", "arithmetic", "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == TEST_SPLIT_SHA256


def test_data_arithmetic_to_stdout_with_difficulty():
    result = runner.invoke(app, ["data", "arithmetic", "--split", "test", "--difficulty", "easy"])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 4739


def test_data_arithmetic_bad_split_exits_2():
    result = runner.invoke(app, ["data", "arithmetic", "--split", "dev"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_validate_ok_and_errors(tmp_path):
    assert runner.invoke(app, ["validate", "quickstart"]).exit_code == 0
    bad = write_recipe(tmp_path / "bad.yaml", {"algorithm": {"group_size": 1, "advantag": "krpo"}})
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "algorithm.group_size" in result.output and "did you mean 'algorithm.advantage'" in result.output
    assert "Traceback" not in result.output


def test_train_missing_model_path_exits_2(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "nowhere", tmp_path / "runs"))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_train_end_to_end_and_refuses_to_reuse_run_dir(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    result = runner.invoke(app, ["train", str(recipe), "train.steps=1"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert "step 1/1" in result.output  # plain progress lines when not a terminal
    assert "steps: 1" in (run_dir / "recipe.yaml").read_text()  # the resolved recipe, override applied
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    again = runner.invoke(app, ["train", str(recipe)])
    assert again.exit_code == 2
    assert "--overwrite" in again.output
    assert runner.invoke(app, ["train", str(recipe), "train.steps=1", "--overwrite"]).exit_code == 0


def test_missing_user_grader_module_exits_2(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", reward={"grader": "no_such_pkg.mod:grade"}))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "no_such_pkg.mod" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists(), "a failed start leaves nothing that blocks the next run"


def test_recipes_lists_every_shipped_recipe_with_a_description():
    from krpo_cli.config import RECIPES_DIR

    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    for path in RECIPES_DIR.glob("*.yaml"):
        assert path.stem in result.output
    assert "grade-school math" in result.output


def test_docs_recipe_reference_is_generated_from_the_models():
    from pathlib import Path

    from krpo_cli.config import Recipe
    from krpo_cli.recipe_docs import reference_markdown

    text = reference_markdown()
    docs = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
    assert docs.read_text(encoding="utf-8") == text, "regenerate with: krpo recipes --keys > docs/recipes.md"
    for section, field in Recipe.model_fields.items():
        for key in field.annotation.model_fields:
            assert f"`{section}.{key}" in text


def test_user_text_with_brackets_is_printed_as_written(tmp_path, tiny_model_dir, monkeypatch):
    # Rich would read "[red]" as a style (and vanish it) and "[/INST]" as a closing tag (and crash).
    runs = tmp_path / "runs[red]"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, runs))
    result = runner.invoke(app, ["train", str(recipe), "train.steps=1"])
    assert result.exit_code == 0, result.output
    printed = "".join(result.output.split())  # Rich wraps long paths anywhere
    assert f"rundir{runs / 'tiny'}" in printed and f"adaptersavedto{runs / 'tiny' / 'adapter'}" in printed

    from krpo_cli import train as train_module

    def interrupted(*args, **kwargs):
        raise train_module.TrainingInterrupted(1, tmp_path / "checkpoint")

    monkeypatch.setattr(train_module, "train", interrupted)
    template = "data.prompt_template=[INST] {question} [/INST]"
    result = runner.invoke(app, ["train", str(recipe), template, "--overwrite"])
    assert result.exit_code == 130, result.output
    assert f"'{template}' --resume" in result.output  # quoted, so that the command can be pasted into a shell


def test_a_key_without_effect_is_a_warning_on_stderr():
    result = CliRunner().invoke(app, ["validate", "quickstart", "data.path=questions.jsonl"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "warning: data.path (data.source is digits) has no effect"
    assert result.stdout.strip() == "quickstart: ok"


def test_the_resume_command_is_one_line_on_a_narrow_terminal(tmp_path, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from krpo_cli import cli
    from krpo_cli import train as train_module

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=40))

    def interrupted(*args, **kwargs):
        raise train_module.TrainingInterrupted(3, tmp_path / "runs" / "tiny" / "checkpoints" / "step_000003")

    monkeypatch.setattr(train_module, "train", interrupted)
    result = runner.invoke(app, ["train", str(recipe), "train.steps=50", "train.learning_rate=1e-5"])
    assert result.exit_code == 130, result.output
    command = f"krpo train {recipe} train.steps=50 train.learning_rate=1e-5 --resume"
    assert any(line.endswith(f"Resume with: {command}") for line in result.output.splitlines()), result.output


def test_dry_run_prints_the_recipe_and_two_formatted_prompts_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from krpo_cli import models
    from krpo_cli.config import Recipe
    from krpo_cli.data import build_prompt, load_rows

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run loaded the model's weights")

    monkeypatch.setattr(models, "load_base_model", no_weights)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    result = runner.invoke(app, ["train", str(recipe), "--dry-run", "train.learning_rate=0.01"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs").exists()
    resolved = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"learning_rate": 0.01}))
    assert "  learning_rate: 0.01\n" in result.output and "  group_size: 4\n" in result.output
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    first_two = load_rows(resolved.data, "train")[:2]
    for row in first_two:
        prompt = build_prompt(tokenizer, resolved.data, row["question"])
        assert prompt.startswith("<|im_start|>user\nWhat is ") and prompt in result.output
    assert result.output.count("# training prompt") == 2


def test_dry_run_shows_a_conversations_earlier_turns(tmp_path, tiny_model_dir):
    import json

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "What is 2 + 3?"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": turns, "answer": "5"}) + "\n", encoding="utf-8")
    sections = {"source": "file", "path": str(data), "test_size": 0, "messages_field": "messages",
                "prompt_template": "{question}"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", data=sections))
    result = runner.invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n" \
           "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in result.output


@pytest.mark.parametrize("overrides, refused", [
    ([], "cannot reach the hub to fetch 'openai/gsm8k'"),
    (["data.source=file", "data.path=DATA"], "cannot download 'Qwen/Qwen2.5-0.5B-Instruct'"),
])
def test_an_offline_hub_recipe_is_refused_before_torch_loads(tmp_path, overrides, refused):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "1 + 1", "answer": "2"}\n' * 10)
    args = ["train", "gsm8k", f"run.output_dir={tmp_path / 'runs'}", *[o.replace("DATA", str(data)) for o in overrides]]
    done = run_offline_in_a_new_process(tmp_path, args)
    assert done.stdout.splitlines() == ["exit 2", "loaded: []"], done.stdout + done.stderr
    assert refused in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_eval_of_an_uncached_hub_model_offline_is_refused_before_torch_loads(tmp_path):
    done = run_offline_in_a_new_process(tmp_path, ["eval", "Qwen/Qwen2.5-0.5B-Instruct", "--output", str(tmp_path / "out")])
    assert done.stdout.splitlines() == ["exit 2", "loaded: []"], done.stdout + done.stderr
    assert "cannot download 'Qwen/Qwen2.5-0.5B-Instruct'" in done.stderr and "Traceback" not in done.stderr


def run_offline_in_a_new_process(tmp_path, args):
    """krpo `args` in a fresh Python, offline with an empty HF_HOME; prints the exit code and which of
    torch, transformers and datasets were imported."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\nfrom krpo_cli.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as end:\n    print('exit', end.code)\n"
        "print('loaded:', sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "new-empty-hf-home"))
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
