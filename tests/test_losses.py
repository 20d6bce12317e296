import math

import pytest
import torch

from krpo_cli.log_probs import linear_token_log_probs, token_log_probs
from krpo_cli.losses import clipped_surrogate, kl_k3, policy_loss, sequence_mean


def test_sequence_mean_ignores_masked_tokens_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert sequence_mean(values, mask).tolist() == [1.5, 5.0, 0.0]


def test_kl_k3_hand_computed():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.5), math.log(0.4)])
    # d = ref - logp: 0 and log 2 → exp(d) - d - 1 = 0 and 2 - log 2 - 1
    assert kl_k3(logp, ref).tolist() == pytest.approx([0.0, 1.0 - math.log(2.0)], abs=1e-6)


def test_clipped_surrogate_clips_in_the_right_direction():
    old = torch.zeros(1, 4)
    # ratios 1.5 (above 1+ε) and 0.5 (below 1−ε), with a positive and a negative advantage
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    loss_pos, clipped_pos = clipped_surrogate(new, old, torch.tensor([2.0]), clip_eps=0.2)
    # A > 0: min(ρA, clip(ρ)A) → 1.2·2 for ρ = 1.5 (clipped), 0.5·2 for ρ = 0.5 (unclipped)
    assert loss_pos[0].tolist() == pytest.approx([-2.4, -1.0, -2.4, -1.0], rel=1e-6)
    assert clipped_pos[0].tolist() == [True, False, True, False]
    loss_neg, _ = clipped_surrogate(new, old, torch.tensor([-2.0]), clip_eps=0.2)
    # A < 0: min(−3, −2.4) = −3 for ρ = 1.5, min(−1, −1.6) = −1.6 for ρ = 0.5
    assert loss_neg[0].tolist() == pytest.approx([3.0, 1.6, 3.0, 1.6], rel=1e-6)


def test_policy_loss_per_sequence_mean_with_kl():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.2, 0.2, 0.2]]))
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.2, 0.2]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -3.0])
    parts = policy_loss(logp, logp.detach(), ref, adv, mask, clip_eps=0.2, kl_beta=0.5)
    kl_token = 2.0 - math.log(2.0) - 1.0  # d = log 2 on the second token of row 0
    # row 0: surrogate −1 on each of its 2 tokens, KL 0 and kl_token → mean(−1, −1 + 0.5·kl_token)
    assert parts.loss.tolist() == pytest.approx([-1.0 + 0.25 * kl_token, 3.0], rel=1e-6)
    assert parts.kl.tolist() == pytest.approx([kl_token / 2, 0.0], abs=1e-6)
    assert parts.clip_fraction.tolist() == [0.0, 0.0]


def test_policy_loss_gradient_is_advantage_weighted_score():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    parts = policy_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2), kl_beta=0.0)
    parts.loss.sum().backward()
    # d/dlogp of −mean(ρ·A) at ρ = 1 is −A / T
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0])
    assert parts.kl.tolist() == [0.0]


def test_token_log_probs_matches_log_softmax_for_any_chunking():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11, dtype=torch.bfloat16)
    tokens = torch.randint(0, 11, (5, 3))
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 2, 8):
        got = token_log_probs(logits, tokens, chunk_size=chunk)
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_linear_token_log_probs_matches_log_softmax_values_and_gradients(temperature):
    """The fused, chunked output layer must equal log_softmax(h·Wᵀ/T)[token] and its gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    upstream = torch.randn(2, 5, dtype=torch.float64)
    expected = torch.log_softmax(hidden @ weight.T / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    # chunks of 3 rows: the 10 positions split unevenly, so chunk edges are exercised too
    for keep_bytes in (0, 2**20):  # logits recomputed in backward / kept from forward
        got = linear_token_log_probs(hidden, weight, tokens, temperature=temperature, chunk_rows=3, keep_bytes=keep_bytes)
        assert got.dtype == torch.float32 and got.shape == (2, 5)
        assert torch.allclose(got.double(), expected, atol=1e-6)
        (got.double() * upstream).sum().backward()
        assert torch.allclose(hidden.grad, grads[0], atol=1e-6)
        assert torch.allclose(weight.grad, grads[1], atol=1e-6)
        hidden.grad, weight.grad = None, None
