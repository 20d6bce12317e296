"""The CUDA paths: krpo's decoder on a GPU, the NF4 base (bitsandbytes), paged 8-bit AdamW.

Skipped without a CUDA GPU (CI has none); `bench/device/run.sh` runs them on a CUDA machine.
Tiny random models, no download.
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from krpo_cli import decode
from krpo_cli import log_probs as lp
from krpo_cli.config import LoraSettings, ModelSettings, Recipe
from krpo_cli.decode import generate_tokens
from krpo_cli.log_probs import linear_token_log_probs
from krpo_cli.models import load_policy
from conftest import build_tiny_model, read_jsonl, tiny_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def needs_bitsandbytes():
    pytest.importorskip("bitsandbytes")


def tiny_config(kind: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, tie_word_embeddings=True)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common, use_sliding_window=False)


def left_padded_prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]], device=CUDA)
    return ids, (ids != 0).long()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).norm() / theirs.float().norm())


@pytest.fixture
def nf4_policy(tmp_path):
    """krpo's own loader: an NF4 base (double quantization, bf16 compute) with a LoRA adapter that matters."""
    needs_bitsandbytes()
    # 64 wide: every matrix row splits into bitsandbytes' 64-value quantization blocks.
    model_dir = build_tiny_model(tmp_path / "model", hidden_size=64)
    loaded = load_policy(ModelSettings(name_or_path=str(model_dir), quantization="nf4"), LoraSettings(r=4, alpha=8),
                         seed=0, device=CUDA)
    assert loaded.quantization == "nf4" and loaded.dtype == torch.bfloat16
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return loaded


NO_GRAPH = "error:krpo's decoder runs without a CUDA graph"  # a failed capture fails the test


@pytest.mark.filterwarnings(NO_GRAPH)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_decoding_equals_hf_generate_on_cuda(kind, monkeypatch):
    """float32 on the GPU: the decoder, its steps replayed as CUDA graphs, picks `generate`'s tokens."""
    monkeypatch.setattr(decode.DecodeStep, "WIDTH_STEP", 4)  # widths 8, 12, 16: three captures
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind)).to(CUDA).eval()
    for param in model.parameters():  # sharper distributions: no near-ties in argmax
        param.data.mul_(4.0)
    ids, mask = left_padded_prompts()
    assert not decode.can_pack(CUDA, torch.float32)
    ours = generate_tokens(model, ids, mask, 12, eos_ids=[2], pad_id=0, greedy=True)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_decoder_logits_on_an_nf4_base_match_the_peft_forward(nf4_policy):
    """The decoder dequantizes each NF4 matrix once and merges the adapter: same logits up to bf16 rounding."""
    model = nf4_policy.model.eval()
    ids, mask = left_padded_prompts()
    weights = decode.DecoderWeights(model, rows_hint=3)
    config = model.get_base_model().config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = decode.StaticCache(config.num_hidden_layers, 3, config.num_key_value_heads, 8, head_dim,
                               torch.bfloat16, CUDA)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(5, 5, dtype=torch.bool, device=CUDA).tril()
    attend = (causal & mask.bool()[:, None, :]) | torch.eye(5, dtype=torch.bool, device=CUDA)
    ours = decode.forward_step(weights, cache, ids, positions, 0, attend[:, None])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        with model.disable_adapter():
            base_only = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert relative_error(ours, theirs) < 0.03  # bf16 rounding of merged weights against PEFT's separate product
    assert relative_error(base_only, theirs) > 0.05  # the adapter changes the logits: the merge is tested


def test_adapted_linear_on_an_nf4_layer_equals_the_lora_layer(nf4_policy):
    """The folded LoRA product around a bitsandbytes Linear4bit: PEFT's values and gradients."""
    model = nf4_policy.model
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    x = torch.randn(2, 5, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.linspace(-1, 1, 128, device=CUDA)
    results = {}
    for name, fn in (("peft", layer), ("ours", lambda t: decode.adapted_linear(layer, t))):
        model.zero_grad()
        x.grad = None
        out = fn(x)
        (out.float() * weights).sum().backward()
        results[name] = (out.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                         layer.lora_B["default"].weight.grad.clone())
    assert results["ours"][0].dtype == results["peft"][0].dtype == torch.bfloat16
    for ours, theirs in zip(results["ours"], results["peft"]):
        assert relative_error(ours, theirs) < 0.02


def test_shared_prompt_log_probs_on_an_nf4_base_match_the_full_forward(nf4_policy, monkeypatch):
    model = nf4_policy.model
    model.train()
    prompts = [[0, 0, 9, 10, 11, 12, 13], [0, 0, 0, 5, 6, 7, 8]]
    completions = [[30, 31, 32, 2], [33, 2, 0, 0], [34, 35, 36, 37], [40, 41, 2, 0], [42, 43, 44, 2], [45, 2, 0, 0]]
    sequences = torch.tensor([prompts[i // 3] + c for i, c in enumerate(completions)], device=CUDA)
    completion_mask = (sequences[:, 7:] != 0).long()
    attention = torch.cat([(sequences[:, :7] != 0).long(), completion_mask], dim=1)
    adapter = [p for p in model.parameters() if p.requires_grad]
    results = []
    for shared in (True, False):
        monkeypatch.setattr(lp, "shares_prompts", lambda m: shared)
        model.zero_grad()
        log_probs = lp.completion_log_probs(model, sequences, attention, prompt_length=7, temperature=0.7)
        (log_probs * torch.linspace(0.5, 2.0, 24, device=CUDA).view(6, 4)).sum().backward()
        results.append((log_probs.detach(), [p.grad.clone() for p in adapter]))
    (shared_lp, shared_grads), (full_lp, full_grads) = results
    assert torch.all(shared_lp[completion_mask == 0] == 0)
    assert torch.allclose(shared_lp, full_lp, atol=2e-2)
    assert all((a - b).norm() <= 0.05 * b.norm() for a, b in zip(shared_grads, full_grads))
    assert any(g.abs().max() > 1e-4 for g in shared_grads)


def test_fused_output_layer_on_cuda_matches_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1000, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 1000, (3, 7), device=CUDA)
    ours = linear_token_log_probs(hidden, weight, tokens, temperature=0.7)
    ours.sum().backward()
    ours_grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.T).float() / 0.7  # the same bf16 product, then float32 as in krpo
    theirs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    theirs.sum().backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-3)
    for a, b in zip(ours_grads, (hidden.grad, weight.grad)):
        assert relative_error(a, b) < 0.01


@pytest.mark.filterwarnings(NO_GRAPH)
@pytest.mark.parametrize("engine, optimizer", [("transformers", "adamw"), ("krpo", "paged_adamw_8bit")])
def test_two_training_steps_on_an_nf4_base(tmp_path, engine, optimizer):
    """The whole loop on the GPU: NF4 base, either decoder (krpo's with bf16 CUDA graphs), the adapter moves."""
    needs_bitsandbytes()
    from krpo_cli import train as train_module
    from krpo_cli.rewards import Grade

    model_dir = build_tiny_model(tmp_path / "model", hidden_size=64)
    recipe = Recipe.model_validate(tiny_recipe(
        model_dir, tmp_path, model={"quantization": "nf4"}, generation={"engine": engine, "min_new_tokens": 6},
        train={"optimizer": optimizer},
    ))
    varied = lambda text, answer: Grade((sum(map(ord, text)) % 5) / 4, False, True, "")  # noqa: E731
    holder = {}
    real_load = train_module.load_policy

    def load_and_keep(*args, **kwargs):
        holder["loaded"] = real_load(*args, **kwargs)
        return holder["loaded"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "get_grader", lambda name: varied)
        patch.setattr(train_module, "load_policy", load_and_keep)
        run_dir = train_module.train(recipe, "# test\n", device=CUDA)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert all(m["completion_len_mean"] == 6 for m in metrics)
    info = (run_dir / "run_info.json").read_text()
    assert '"quantization": "nf4"' in info and f'"generation_engine": "{engine}"' in info
    model = holder["loaded"].model
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
