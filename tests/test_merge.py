import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from krpo_cli.cli import app
from conftest import build_tiny_model, make_adapter, tiny_recipe, write_recipe

runner = CliRunner()
IDS = torch.tensor([[5, 9, 14, 20, 33, 41, 7]])


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("a") / "adapter")


def test_merge_round_trip_is_exact_and_standalone(tmp_path, tiny_model_dir, adapter_dir):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "merge_info.json").read_text())
    assert info["merge_dtype"] == "float32" and info["nf4_round_trip"] is False
    assert info["verification"]["max_abs_logit_diff_merged_fp32"] <= 1e-4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    # Every exported file as readable as config.json (transformers writes the weights 0600).
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {(out / "config.json").stat().st_mode & 0o777}

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, with_adapter(IDS).logits, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(IDS).logits
        assert not torch.allclose(merged(IDS).logits, plain, atol=1e-3), "the adapter must matter"
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(merged.generate(IDS, **greedy), with_adapter.generate(input_ids=IDS, **greedy))


def test_merge_refuses_nonempty_output(tmp_path, adapter_dir):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "something").write_text("x")
    for flags in ([], ["--overwrite"]):  # a folder that is not a model krpo merged is never replaced
        result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(out), *flags])
        assert result.exit_code == 2 and "is not a merged model krpo made (it holds 'something')" in result.output
        assert (out / "something").read_text() == "x"


def test_nf4_round_trip_changes_the_base_but_stays_consistent(tmp_path, adapter_dir):
    plain, rounded = tmp_path / "plain", tmp_path / "nf4"
    assert runner.invoke(app, ["merge", str(adapter_dir), "--out", str(plain), "--nf4-round-trip", "off"]).exit_code == 0
    result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(rounded), "--nf4-round-trip", "on"])
    assert result.exit_code == 0, result.output
    info = json.loads((rounded / "merge_info.json").read_text())
    assert info["nf4_round_trip"] is True
    assert info["verification"]["max_abs_logit_diff_merged_fp32"] <= 1e-4
    a = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(rounded, dtype=torch.float32).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])  # only linear weights are quantized


def test_adapter_for_another_base_is_refused(tmp_path, adapter_dir):
    other = build_tiny_model(tmp_path / "wider", hidden_size=48)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for f in adapter_dir.iterdir():
        (mismatched / f.name).write_bytes(f.read_bytes())
    config["base_model_name_or_path"] = str(other)
    (mismatched / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["merge", str(mismatched), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert str(other) in result.output and "does not fit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
    evaluated = runner.invoke(app, ["eval", str(other), "--adapter", str(adapter_dir), "--limit", "2"])
    assert evaluated.exit_code == 2 and "does not fit" in evaluated.output


def test_merge_refuses_to_write_over_its_input(tmp_path, adapter_dir):
    result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(adapter_dir.parent), "--overwrite"])
    assert result.exit_code == 2 and "would overwrite" in result.output
    assert (adapter_dir / "adapter_config.json").is_file()


def test_a_checkpoints_adapter_is_merged_with_its_runs_recipe(tmp_path, tiny_model_dir):
    from krpo_cli.run_dir import find_adapter

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_recipe(run / "recipe.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    checkpoint_adapter = run / "checkpoints" / "step_000002" / "adapter"
    checkpoint_adapter.mkdir(parents=True)
    (checkpoint_adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert find_adapter(run) == (run / "adapter", run)
    adapter, found_run = find_adapter(checkpoint_adapter)
    assert adapter == checkpoint_adapter and found_run == run  # the recipe and run_info it was trained with
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert find_adapter(loose) == (loose, None)


def test_merge_of_a_stopped_run_uses_its_latest_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import stopped_run

    from rich.console import Console

    from krpo_cli import cli

    monkeypatch.setattr(cli, "console", Console(width=40))  # not a terminal: a log; no line is cut
    run = stopped_run(tiny_model_dir, tmp_path / "runs")
    result = runner.invoke(app, ["merge", str(run)])
    assert result.exit_code == 0, result.output
    checkpoint = run / "checkpoints" / "step_000001"
    assert f"run stopped at step 1 of 4; using checkpoint {checkpoint}" in result.output.splitlines()
    info = json.loads((run / "merged" / "merge_info.json").read_text())
    assert info["adapter"] == str(checkpoint / "adapter")
    assert any(line.startswith(f"krpo merge {checkpoint / 'adapter'} into ") for line in result.output.splitlines())
    assert f"wrote {run / 'merged'} (loads with transformers.AutoModelForCausalLM.from_pretrained)" in result.output.splitlines()
