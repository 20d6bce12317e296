"""Shared fixtures. Tests never touch the network: hub access is switched off and every
cache points into a temporary directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="krpo-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf_home")
os.environ.setdefault("KRPO_CACHE", str(_SESSION_TMP / "krpo_cache"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(directory: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A random-weight Llama-shaped model with a character-level tokenizer, saved as an HF model dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|pad|>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["<|pad|>"],
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|pad|>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(_SESSION_TMP / "tiny-llama")


def make_adapter(base_dir: Path, adapter_dir: Path, scale: float = 0.1, seed: int = 1) -> Path:
    """A LoRA adapter for `base_dir` with non-zero random weights (as if trained)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    model.save_pretrained(adapter_dir)
    return adapter_dir


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def tiny_recipe(model_dir: Path, output_dir: Path, **sections) -> dict:
    """A recipe that trains the tiny model for two quick steps on the quickstart task."""
    recipe = {
        "run": {"name": "tiny", "output_dir": str(output_dir), "seed": 7},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "data": {"source": "digits", "system_prompt": "", "prompt_template": "What is {question}?"},
        "reward": {"grader": "last_number"},
        "algorithm": {"advantage": "krpo", "group_size": 4},
        "generation": {"max_new_tokens": 6},
        "train": {"steps": 2, "prompts_per_step": 2, "minibatch_size": 4, "learning_rate": 0.05},
        "output": {"samples_per_step": 2},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stopped_run(tiny_model_dir: Path, output_dir: Path, planned_steps: int = 4) -> Path:
    """A run of `planned_steps` steps stopped after its first step's checkpoint: no final adapter."""
    import shutil

    import yaml

    from krpo_cli import train as train_module
    from krpo_cli.config import Recipe

    run_dir = train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, output_dir, train={"steps": 1})))
    shutil.rmtree(run_dir / "adapter")  # as after an interrupt: only the checkpoint's adapter exists
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["train"]["steps"] = planned_steps
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return run_dir
