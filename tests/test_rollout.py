import pytest
import torch
from transformers import AutoModelForCausalLM

from krpo_cli.models import load_tokenizer
from krpo_cli.log_probs import completion_log_probs
from krpo_cli.rollout import completion_mask_from_tokens, generate_rollout


def test_completion_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask = completion_mask_from_tokens(tokens, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert completion_mask_from_tokens(tokens, eos_ids=[2, 9]).tolist()[2] == [1, 1, 1, 1, 1]


def test_completion_log_probs_match_unpadded_forward(tiny_model_dir):
    """Left padding, trimming and position ids must not change any completion log-prob."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pad = 0
    prompts = [[10, 11, 12, 13, 14], [20, 21]]
    completions = [[30, 31, 2], [40, 2, pad]]
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    prompt_length = 6  # one more than the longest prompt: a column of padding everywhere
    sequences, attention = [], []
    for prompt, completion, cmask in zip(prompts, completions, completion_mask.tolist()):
        padding = prompt_length - len(prompt)
        sequences.append([pad] * padding + prompt + completion)
        attention.append([0] * padding + [1] * len(prompt) + cmask)
    got = completion_log_probs(model, torch.tensor(sequences), torch.tensor(attention), prompt_length)
    assert got.shape == (2, 3)
    for row, (prompt, completion, cmask) in enumerate(zip(prompts, completions, completion_mask.tolist())):
        n = sum(cmask)
        ids = torch.tensor([prompt + completion[:n]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        expected = logp.gather(-1, torch.tensor(completion[:n]).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(got[row, :n], expected, atol=1e-5), row
        assert torch.all(got[row, n:] == 0)


def test_generate_rollout_is_prompt_major_and_consistent(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, ["1 + 2", "a much longer prompt"], group_size=3, max_new_tokens=5, batch_size=4)
    n = 6
    assert rollout.sequences.shape[0] == n and len(rollout.completions) == n
    assert rollout.completion_mask.shape[1] <= 5
    prompt_part = rollout.sequences[:, : rollout.prompt_length]
    # rows 0-2 share the first prompt, rows 3-5 the second
    assert torch.equal(prompt_part[0], prompt_part[2]) and torch.equal(prompt_part[3], prompt_part[5])
    assert not torch.equal(prompt_part[0], prompt_part[3])
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length :], rollout.completion_mask)
    decoded = tokenizer.batch_decode(
        [row[mask.bool()] for row, mask in zip(rollout.completion_tokens, rollout.completion_mask)], skip_special_tokens=True
    )
    assert decoded == rollout.completions
    assert rollout.num_generated_tokens == int(rollout.completion_mask.sum())


def test_completion_log_probs_use_the_sampling_temperature(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sequences = torch.tensor([[10, 11, 12, 30, 31]])
    mask = torch.ones_like(sequences)
    got = completion_log_probs(model, sequences, mask, prompt_length=3, temperature=2.0)
    with torch.no_grad():
        logits = model(sequences).logits[0, 2:4] / 2.0
    expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor([[30], [31]])).squeeze(-1)
    assert torch.allclose(got[0], expected, atol=1e-5)
    assert not torch.allclose(got, completion_log_probs(model, sequences, mask, prompt_length=3), atol=1e-3)


def test_min_new_tokens_forces_equal_length_completions(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    rollout = generate_rollout(model, tokenizer, ["1 + 2", "3 + 4"], group_size=3, max_new_tokens=7, min_new_tokens=7)
    assert rollout.completion_mask.sum(dim=1).tolist() == [7] * 6


def test_fused_output_layer_equals_the_models_own_logits(tiny_model_dir, monkeypatch):
    """Log-probs and their gradients are the same through the fused path and through model(...).logits."""
    from krpo_cli import log_probs as lp

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert lp.split_output_layer(model) is not None  # the tiny Llama takes the fused path
    sequences = torch.tensor([[0, 10, 11, 30, 31, 2], [20, 21, 22, 40, 2, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    results = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(lp, "PLAIN_OUTPUT_LAYER", set())
            assert lp.split_output_layer(model) is None
        model.zero_grad()
        log_probs = completion_log_probs(model, sequences, attention, prompt_length=3, temperature=0.8)
        log_probs.sum().backward()
        results.append((log_probs.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


@pytest.mark.parametrize("kind, dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                         ("llama", "bfloat16")])
def test_shared_prompts_give_the_same_log_probs_and_gradients(kind, dtype, monkeypatch):
    """Reading each prompt once per group changes neither the log-probs nor the adapter's gradients.

    In bfloat16 PEFT keeps the adapter in float32 on a bfloat16 base: the folded LoRA product
    must mix the two as PEFT does (up to bfloat16 rounding).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    from krpo_cli import log_probs as lp

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2)
    config = {"llama": LlamaConfig(**common), "qwen2": Qwen2Config(**common, use_sliding_window=False),
              "qwen3": Qwen3Config(**common, head_dim=16, use_sliding_window=False)}[kind]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    # Two prompts of different lengths (left padding, one column of padding in every row), three samples
    # each; completions of different lengths, ending at EOS (2) then padding.
    prompts = [[0, 0, 9, 10, 11, 12, 13], [0, 0, 0, 5, 6, 7, 8]]  # sorted, the second comes first
    completions = [[30, 31, 32, 2], [33, 2, 0, 0], [34, 35, 36, 37], [40, 41, 2, 0], [42, 43, 44, 2], [45, 2, 0, 0]]
    sequences = torch.tensor([prompts[i // 3] + c for i, c in enumerate(completions)])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    attention = torch.cat([(sequences[:, :7] != 0).long(), completion_mask], dim=1)
    prompt_rows = []
    real_hidden = lp.transformer_hidden

    def recording_hidden(weights, input_ids, *args):
        prompt_rows.append(input_ids.numel())
        return real_hidden(weights, input_ids, *args)

    monkeypatch.setattr(lp, "transformer_hidden", recording_hidden)
    adapter = [p for p in model.parameters() if p.requires_grad]
    results = []
    for shared in (True, False):
        monkeypatch.setattr(lp, "shares_prompts", lambda m: shared)
        model.zero_grad()
        log_probs = completion_log_probs(model, sequences, attention, prompt_length=7, temperature=0.7)
        (log_probs * torch.linspace(0.5, 2.0, 24).view(6, 4)).sum().backward()
        results.append((log_probs.detach(), [p.grad.clone() for p in adapter]))
    assert prompt_rows == [2 * 5 + 6 * 4]  # each prompt once (trimmed to 5 columns), then the completions
    (shared_lp, shared_grads), (full_lp, full_grads) = results
    assert torch.all(shared_lp[completion_mask == 0] == 0)
    if dtype == "float32":
        assert torch.allclose(shared_lp, full_lp, atol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(shared_grads, full_grads))
    else:  # bfloat16 keeps ~3 digits; measured: log-probs within 2e-3, gradients within 2 % (norm)
        assert torch.allclose(shared_lp, full_lp, atol=1e-2)
        assert all((a - b).norm() <= 0.05 * b.norm() for a, b in zip(shared_grads, full_grads))
    assert any(g.abs().max() > 1e-3 for g in shared_grads)  # the comparison is not between zeros


def test_gradient_checkpointing_keeps_the_models_own_forward(tiny_model_dir):
    from krpo_cli.log_probs import shares_prompts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shares_prompts(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not shares_prompts(model)
    with torch.no_grad():  # nothing to recompute without gradients
        assert shares_prompts(model)
