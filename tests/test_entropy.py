"""The policy's token entropy (`entropy` in metrics.jsonl): a side output of every log-prob path that
leaves the log-probs and their gradients exactly as they are without it."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from krpo_cli import log_probs as lp
from krpo_cli import train as train_module
from krpo_cli.config import Recipe
from krpo_cli.step_stats import mean_entropy
from conftest import read_jsonl, tiny_recipe


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    """−Σ softmax · log_softmax over the vocabulary, in float64."""
    logits = logits.double()
    return -(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


def test_softmax_entropy_on_hand_computed_numbers():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, -math.inf, -math.inf], [1.0, 2.0, 3.0, 4.0]])
    exps = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    got = lp.softmax_entropy(exps, exps.sum(dim=-1))
    assert got[0].item() == pytest.approx(math.log(4))  # uniform over 4
    assert got[1].item() == pytest.approx(math.log(2))  # two equal, two impossible (0 log 0 = 0)
    p = [math.exp(k) / sum(math.exp(j) for j in range(1, 5)) for k in range(1, 5)]
    assert got[2].item() == pytest.approx(-sum(q * math.log(q) for q in p))


def test_shifted_softmax_entropy_on_hand_computed_numbers():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, -200.0, -200.0], [1.0, 2.0, 3.0, 4.0]])
    shifted = logits - 7.0  # any constant per row
    exps = shifted.exp()
    got = lp.shifted_softmax_entropy(shifted.clone(), exps, exps.sum(dim=-1))
    assert got[0].item() == pytest.approx(math.log(4))  # uniform over 4
    assert got[1].item() == pytest.approx(math.log(2))  # two equal, two with probability e^-205
    p = [math.exp(k) / sum(math.exp(j) for j in range(1, 5)) for k in range(1, 5)]
    assert got[2].item() == pytest.approx(-sum(q * math.log(q) for q in p))


def test_mean_entropy_is_the_token_weighted_mean():
    assert mean_entropy(6.0, 4.0) == 1.5
    assert math.isnan(mean_entropy(0.0, 0.0))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_unfused_entropy_matches_softmax_and_leaves_log_probs_alone(temperature):
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11) * 3
    tokens = torch.randint(0, 11, (5, 3))
    scaled = logits / temperature
    log_probs, entropy = lp.token_log_probs(scaled, tokens, chunk_size=2, with_entropy=True)
    assert torch.equal(log_probs, lp.token_log_probs(scaled, tokens, chunk_size=2))
    assert entropy.shape == (5, 3)
    assert torch.allclose(entropy.double(), reference_entropy(scaled), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("keep_bytes", [0, 2**20])  # logits recomputed in backward / kept from forward
def test_fused_entropy_matches_softmax_and_leaves_values_and_gradients_bit_identical(temperature, keep_bytes):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    upstream = torch.randn(2, 5)
    results = []
    for with_entropy in (False, True):
        hidden.grad, weight.grad = None, None
        out = lp.linear_token_log_probs(hidden, weight, tokens, temperature, chunk_rows=3, keep_bytes=keep_bytes,
                                        with_entropy=with_entropy)
        log_probs, entropy = out if with_entropy else (out, None)
        (log_probs * upstream).sum().backward()
        results.append((log_probs.detach(), hidden.grad.clone(), weight.grad.clone(), entropy))
    (plain_lp, plain_gh, plain_gw, _), (lp_, gh, gw, entropy) = results
    assert torch.equal(lp_, plain_lp) and torch.equal(gh, plain_gh) and torch.equal(gw, plain_gw)
    assert entropy.shape == (2, 5) and entropy.dtype == torch.float32 and not entropy.requires_grad
    expected = reference_entropy((hidden @ weight.T / temperature).detach())
    assert torch.allclose(entropy.double(), expected, atol=1e-5)


def model_entropy(model, sequences, attention, prompt_length, temperature):
    """Entropy at each completion token from the model's own full logits (0 at padding)."""
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention,
                       position_ids=lp.position_ids_from_mask(attention)).logits
    return reference_entropy(logits[:, prompt_length - 1 : -1] / temperature) * attention[:, prompt_length:]


@pytest.mark.parametrize("path", ["fused", "unfused", "shared_prompt"])
def test_completion_entropy_through_each_path(tiny_model_dir, monkeypatch, path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Two copies of one prompt (so the shared path reads it once), one other; left padding, EOS (2) then padding.
    sequences = torch.tensor([[0, 10, 11, 30, 31, 2], [0, 10, 11, 33, 2, 0], [20, 21, 22, 40, 41, 42]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    monkeypatch.setattr(lp, "shares_prompts", lambda m: path == "shared_prompt")
    if path == "unfused":
        monkeypatch.setattr(lp, "PLAIN_OUTPUT_LAYER", set())
    assert (lp.split_output_layer(model) is None) == (path == "unfused")
    log_probs, entropy = lp.completion_log_probs(model, sequences, attention, 3, temperature=0.8, with_entropy=True)
    assert torch.equal(log_probs, lp.completion_log_probs(model, sequences, attention, 3, temperature=0.8))
    expected = model_entropy(model, sequences, attention, 3, 0.8)
    assert entropy.shape == (3, 3) and entropy[1, 2] == 0
    assert torch.allclose(entropy.double(), expected, atol=1e-4)


def test_training_logs_the_entropy(tmp_path, tiny_model_dir):
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1}))
    (metrics,) = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    vocab_size = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    assert math.isfinite(metrics["entropy"]) and 0.0 < metrics["entropy"] <= math.log(vocab_size)
