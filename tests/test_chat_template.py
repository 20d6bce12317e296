"""Chat templates: conversational datasets (data.messages_field) and data.chat_template_kwargs."""

import json

import pytest
from transformers import AutoTokenizer

from krpo_cli import train as train_module
from krpo_cli.config import DataSettings, Recipe
from krpo_cli.data import DataError, build_prompt, load_rows
from krpo_cli.recipe_loading import load_recipe
from conftest import CHATML, read_jsonl, tiny_recipe

# Qwen3's switch, reduced: enable_thinking=false writes an empty think block after the assistant header.
THINKING_SWITCH = CHATML.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}",
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},  # after the question: dropped, the model writes this turn
]


@pytest.fixture
def tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = THINKING_SWITCH
    return tok


def test_chat_template_kwargs_reach_the_template(tokenizer):
    plain = DataSettings(system_prompt="")
    off = DataSettings(system_prompt="", chat_template_kwargs={"enable_thinking": False})
    assert build_prompt(tokenizer, plain, "2 + 3") == "<|im_start|>user\n2 + 3<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(tokenizer, off, "2 + 3") == (
        "<|im_start|>user\n2 + 3<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_kwargs_from_the_command_line_and_its_own_arguments_refused():
    recipe = load_recipe("quickstart", ["data.chat_template_kwargs={enable_thinking: false}"])[0]
    assert recipe.data.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ValueError, match="data.chat_template_kwargs: tokenize is set by krpo itself"):
        DataSettings(chat_template_kwargs={"tokenize": True})


def conversational_file(tmp_path, rows):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return DataSettings(source="file", path=str(path), test_size=0, messages_field="messages", prompt_template="Q: {question}")


def test_a_conversational_row_is_its_last_user_turn_after_the_turns_before_it(tmp_path, tokenizer):
    settings = conversational_file(tmp_path, [
        {"messages": CONVERSATION, "answer": "5", "level": "easy"},
        {"messages": [{"role": "assistant", "content": "no user turn"}], "answer": "1"},  # skipped
        {"messages": "not a list", "answer": "1"},  # skipped
    ])
    (row,) = load_rows(settings, "train")
    assert row == {"question": "What is 2 + 3?", "answer": "5", "history": CONVERSATION[:3], "level": "easy"}
    # The conversation's own system turn leads; data.system_prompt (the paper's, by default) is not added.
    assert build_prompt(tokenizer, settings, row["question"], row["history"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    # A conversation without a system turn gets data.system_prompt.
    assert build_prompt(tokenizer, settings.model_copy(update={"system_prompt": "S"}), "2 + 2?", []) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ: 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_missing_messages_field_is_named(tmp_path):
    settings = conversational_file(tmp_path, [{"question": "2 + 3", "answer": "5"}])
    with pytest.raises(DataError, match="no field 'messages'"):
        load_rows(settings, "train")


def test_training_on_a_conversational_dataset(tmp_path, tiny_model_dir, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(4)]
    data = conversational_file(tmp_path, rows).model_dump(include={"source", "path", "test_size", "messages_field"})
    data |= {"chat_template_kwargs": {"enable_thinking": False}, "prompt_template": "{question}"}
    seen = []
    real_generate = train_module.generate_rollout

    def keep_prompts(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(train_module, "generate_rollout", keep_prompts)
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}, data=data))
    run_dir = train_module.train(recipe)
    expected = {f"<|im_start|>user\nWhat is {i} + 1?<|im_end|>\n<|im_start|>assistant\n" for i in range(4)}
    assert len(seen) == 2 and set(seen) <= expected  # the conftest template ignores enable_thinking
    assert {s["question"] for s in read_jsonl(run_dir / "samples.jsonl")} <= {f"What is {i} + 1?" for i in range(4)}
