"""The 4-bit path on a CPU: an NF4 base (bitsandbytes) trained, decoded, resumed, evaluated and merged.

bitsandbytes repacks a 4-bit weight into a CPU inference layout at the first eval forward
without grad when the CPU has AVX512-BF16; training forwards after that lose the input
gradient. `simulated_avx512_bf16` makes bitsandbytes take that path on any CPU, so the
tests below fail wherever krpo's guard stops working, not only on CPUs with AVX512-BF16.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

bnb = pytest.importorskip("bitsandbytes")  # not installed on macOS
import bitsandbytes.functional as bnbf  # noqa: E402

from krpo_cli import decode  # noqa: E402
from krpo_cli import train as train_module  # noqa: E402
from krpo_cli.cli import app  # noqa: E402
from krpo_cli.config import LoraSettings, ModelSettings, Recipe  # noqa: E402
from krpo_cli.models import (  # noqa: E402
    ModelError,
    check_nf4_gradients,
    four_bit_layers,
    load_base_model,
    load_policy,
)
from krpo_cli.rewards import Grade  # noqa: E402
from conftest import build_tiny_model, read_jsonl, tiny_recipe, write_recipe  # noqa: E402

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 64 wide: every matrix row splits into bitsandbytes' 64-value quantization blocks.
    return build_tiny_model(tmp_path_factory.mktemp("nf4") / "model", hidden_size=64)


@pytest.fixture
def simulated_avx512_bf16(monkeypatch):
    """Layers built from here on take bitsandbytes' AVX512-BF16 repack path, whatever this CPU is."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def varied_grader(completion: str, reference: str) -> Grade:
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, None)


def nf4_recipe(model_dir, tmp_path, **sections) -> Recipe:
    sections["model"] = {"quantization": "nf4", "dtype": "float32", **sections.get("model", {})}
    return Recipe.model_validate(tiny_recipe(model_dir, tmp_path, **sections))


def dequantized(layer) -> torch.Tensor:
    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def nf4_policy_with_a_trained_adapter(model_dir, dtype: str, lora_std: float):
    """krpo's loader: an NF4 base with a LoRA adapter whose B matrices are non-zero (as if trained), in eval mode."""
    loaded = load_policy(ModelSettings(name_or_path=str(model_dir), quantization="nf4", dtype=dtype),
                         LoraSettings(r=4, alpha=8), seed=0, device=CPU)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, lora_std)
    return loaded.model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradients_equal_the_dequantized_reference_after_a_generation(model_dir, simulated_avx512_bf16, dtype):
    model = load_base_model(str(model_dir), "nf4", dtype, CPU)
    layers = four_bit_layers(model)
    assert len(layers) == 14  # 7 projections × 2 layers; the tied output head stays unquantized
    references = [dequantized(layer) for layer in layers]  # before anything could repack them
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for layer, weight in zip(layers, references):
        x = torch.randn(3, layer.in_features, generator=generator).to(dtype).requires_grad_(True)
        out_grad = torch.randn(3, layer.out_features, generator=generator)
        layer(x).float().backward(out_grad)
        assert x.grad is not None
        expected = out_grad @ weight
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 rounds the product
        assert float((x.grad.float() - expected).norm() / expected.norm()) < tolerance
        assert torch.equal(dequantized(layer), weight)  # the stored weight is still the generic layout


def test_the_gradient_check_refuses_a_base_that_lost_its_input_gradients(model_dir, simulated_avx512_bf16):
    """Without krpo's layout fix (a library update could undo it) the load-time check must fail."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config)
    assert four_bit_layers(model)[0].support_avx512bf16_for_cpu  # the repack path is live
    with pytest.raises(ModelError, match="wrong input gradients"):
        check_nf4_gradients(model)


def test_krpo_steps_on_an_nf4_base_give_every_lora_matrix_a_gradient(tmp_path, model_dir, simulated_avx512_bf16,
                                                                     monkeypatch):
    holder = {}
    real_load = train_module.load_policy

    def load_and_watch(*args, **kwargs):
        loaded = holder["loaded"] = real_load(*args, **kwargs)
        holder["initial"] = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
        holder["grad_seen"] = dict.fromkeys(holder["initial"], False)
        for name, param in loaded.model.named_parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(
                    lambda p, name=name: holder["grad_seen"].__setitem__(name, holder["grad_seen"][name] or bool(p.grad.abs().max() > 0)))
        return loaded

    monkeypatch.setattr(train_module, "load_policy", load_and_watch)
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)
    recipe = nf4_recipe(model_dir, tmp_path, train={"steps": 3})
    run_dir = train_module.train(recipe)

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["quantization"] == "nf4" and info["device"] == "cpu"
    names = list(holder["grad_seen"])
    assert len(names) == 2 * 14  # an A and a B for each 4-bit projection
    assert [n for n in names if not holder["grad_seen"][n]] == []  # every LoRA matrix, the first layer's included
    final = dict(holder["loaded"].model.named_parameters())
    first_layer = [n for n in names if ".layers.0." in n]
    assert first_layer and all(not torch.equal(final[n].detach(), holder["initial"][n]) for n in first_layer)
    assert all(type(layer).__name__ == "Linear4bit" for layer in four_bit_layers(holder["loaded"].model))


def test_the_decoder_on_an_nf4_base_equals_hf_generate_greedily(model_dir):
    model = nf4_policy_with_a_trained_adapter(model_dir, "float32", lora_std=0.2)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight.mul_(4.0)  # sharper distributions: no near-ties in argmax
    assert decode.engine_supports(model)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    ours = decode.generate_tokens(model, ids, mask, 12, eos_ids=[2], pad_id=0, greedy=True)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)
    with model.disable_adapter():
        base_only = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                   pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    assert not torch.equal(base_only, theirs), "the adapter must change the greedy tokens for the test to mean anything"


def test_an_nf4_run_resumes_bit_for_bit(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)

    def recipe(run: str, steps: int) -> Recipe:
        return nf4_recipe(model_dir, tmp_path / run, train={"steps": steps}, output={"save_every": 2})

    full = train_module.train(recipe("a", 4))
    half = train_module.train(recipe("b", 2))
    assert train_module.train(recipe("b", 4), resume=True) == half
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(half / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    timing = {"tokens_per_s", "rollout_seconds", "update_seconds", "step_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_jsonl(full / "metrics.jsonl")) == strip(read_jsonl(half / "metrics.jsonl"))


def test_eval_and_merge_of_an_nf4_run(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)
    recipe = tiny_recipe(model_dir, tmp_path / "runs", model={"quantization": "nf4", "dtype": "float32"},
                         train={"steps": 2, "learning_rate": 0.2})
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"

    evaluated = runner.invoke(app, ["eval", str(run_dir), "--limit", "4"])
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["settings"]["quantization"] == "nf4" and results["num_questions"] == 4

    # The adapter loads with PEFT on an NF4 base loaded by transformers alone.
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    nf4_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config)
    trained = PeftModel.from_pretrained(nf4_base, run_dir / "adapter").eval()
    ids = torch.tensor([[5, 9, 14, 20, 33, 41, 7]])

    merged_out = runner.invoke(app, ["merge", str(run_dir), "--dtype", "float32"])
    assert merged_out.exit_code == 0, merged_out.output
    assert "NF4 round trip applied to 14 linear weights" in merged_out.output
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert info["trained_quantization"] == "nf4" and info["nf4_round_trip"] is True
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        # The round trip rebuilt exactly the weights NF4 training saw, so the merged model computes
        # the trained NF4 model's function; without it the delta lands on the unquantized weights.
        trained_logits = trained(ids).logits
        assert float((merged(ids).logits - trained_logits).abs().max()) < 1e-4
        plain = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "plain"), "--nf4-round-trip", "off"])
        assert plain.exit_code == 0, plain.output
        unrounded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
        assert float((unrounded(ids).logits - trained_logits).abs().max()) > 1e-3


def test_decoder_logits_on_a_bf16_nf4_base_match_the_peft_forward(model_dir):
    """bf16: the decoder dequantizes each 4-bit matrix once and applies the adapter beside it."""
    model = nf4_policy_with_a_trained_adapter(model_dir, "bfloat16", lora_std=0.05)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    config = model.get_base_model().config
    weights = decode.DecoderWeights(model, rows_hint=3)
    cache = decode.StaticCache(config.num_hidden_layers, 3, config.num_key_value_heads, 8,
                               config.hidden_size // config.num_attention_heads, torch.bfloat16, CPU)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    attend = (torch.ones(5, 5, dtype=torch.bool).tril() & mask.bool()[:, None, :]) | torch.eye(5, dtype=torch.bool)
    ours = decode.forward_step(weights, cache, ids, positions, 0, attend[:, None]).float()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        with model.disable_adapter():
            base_only = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    relative = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert relative(ours, theirs) < 0.03  # bf16 rounding only
    assert relative(base_only, theirs) > 0.05  # the adapter matters, so its application is tested
