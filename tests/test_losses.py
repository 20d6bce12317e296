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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the column-major product on a CPU
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_linear_token_log_probs_matches_log_softmax_values_and_gradients(temperature, dtype):
    """The fused, chunked output layer must equal log_softmax(h·Wᵀ/T)[token] and its gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(11, 8, dtype=torch.float64).to(dtype).requires_grad_()
    tokens = torch.randint(0, 11, (2, 5))
    upstream = torch.randn(2, 5, dtype=torch.float64)
    exact = hidden.double() @ weight.double().T / temperature
    expected = torch.log_softmax(exact, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    # chunks of 3 rows: the 10 positions split unevenly, so chunk edges are exercised too
    for keep_bytes in (0, 2**20):  # logits recomputed in backward / kept from forward
        got = linear_token_log_probs(hidden, weight, tokens, temperature=temperature, chunk_rows=3, keep_bytes=keep_bytes)
        assert got.dtype == torch.float32 and got.shape == (2, 5)
        tolerance = 1e-6 if dtype == torch.float64 else 1e-5
        assert torch.allclose(got.double(), expected, atol=tolerance)
        (got.double() * upstream).sum().backward()
        assert torch.allclose(hidden.grad, grads[0], atol=tolerance)
        assert torch.allclose(weight.grad, grads[1], atol=tolerance)
        hidden.grad, weight.grad = None, None


# --- loss variants ----------------------------------------------------------------------------------

from krpo_cli.losses import aggregate_loss, importance_ratio, without_final_eos  # noqa: E402


def test_default_loss_is_bit_identical_to_the_paper_formula():
    """The default path (symmetric clip, token ratio, sequence aggregation) computes exactly what krpo
    computed before the variants: −min(ρA, clip(ρ, 0.8, 1.2)A) + β·k3, mean per sequence, / N."""
    torch.manual_seed(0)
    logp, old, ref = (torch.randn(5, 7) * 0.3 - 1.0 for _ in range(3))
    adv, mask = torch.randn(5), (torch.rand(5, 7) > 0.3).long()
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2) * a)
    per_token = per_token + 0.01 * (torch.exp(ref - logp) - (ref - logp) - 1.0)
    expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / 8
    parts = policy_loss(logp, old, ref, adv, mask)
    assert torch.equal(aggregate_loss(parts, "sequence", 8), expected)


def test_without_final_eos_drops_only_the_eos_of_rows_that_end_with_one():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    ends = torch.tensor([True, False, True, False])  # row 1 was cut off at the length limit: no EOS
    assert without_final_eos(mask, ends).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_asymmetric_clip_clips_high_at_one_plus_eps_high_and_low_at_one_minus_eps_low():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.25, 0.5, 0.75]]))
    loss, clipped = clipped_surrogate(new, old, torch.tensor([2.0]), clip_eps=0.1, clip_eps_high=0.28)
    # A > 0: ρ = 1.5 is clipped at 1.28, ρ = 1.25 is not (it would be at the symmetric 1.1)
    assert loss[0].tolist() == pytest.approx([-2.56, -2.5, -1.0, -1.5], rel=1e-6)
    assert clipped[0].tolist() == [True, False, False, False]
    loss, clipped = clipped_surrogate(new, old, torch.tensor([-2.0]), clip_eps=0.1, clip_eps_high=0.28)
    # A < 0: ρ = 0.5 and 0.75 are clipped at 1 − 0.1 = 0.9: −min(ρA, 0.9A) = 1.8
    assert loss[0].tolist() == pytest.approx([3.0, 2.5, 1.8, 1.8], rel=1e-6)
    assert clipped[0].tolist() == [False, False, True, True]


def test_sequence_ratio_is_the_length_normalised_likelihood_ratio():
    old = torch.zeros(2, 3)
    new = torch.tensor([[math.log(2.0), 0.0, 5.0], [math.log(4.0), math.log(0.25), math.log(8.0)]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ratio = importance_ratio(new, old, mask, "sequence")
    # row 0: exp((log 2 + 0) / 2) = √2 on every token (the masked 5.0 does not count); row 1: exp(log 8 / 3) = 2
    assert ratio.flatten().tolist() == pytest.approx([2**0.5] * 3 + [2.0] * 3, rel=1e-6)
    assert importance_ratio(new, old, mask, "token")[1].tolist() == pytest.approx([4.0, 0.25, 8.0], rel=1e-6)


def test_sequence_ratio_clips_whole_sequences():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[2.0, 0.5]]))  # token ratios 2 and 0.5 (both clipped), sequence ratio 1
    parts = policy_loss(new, old, None, torch.tensor([1.0]), torch.ones(1, 2), kl_beta=0.0, ratio_level="sequence")
    assert parts.loss.tolist() == pytest.approx([-1.0]) and parts.clip_fraction.tolist() == [0.0]
    parts = policy_loss(new, old, None, torch.tensor([1.0]), torch.ones(1, 2), kl_beta=0.0)
    assert parts.clip_fraction.tolist() == [0.5]  # token level: ρ = 2 clipped at 1.2 (A > 0), ρ = 0.5 is the min


def test_clipped_tokens_are_counted_by_side():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 0.5, 0.5]]))
    parts = policy_loss(new, old, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 1, 0]]), kl_beta=0.0)
    # A > 0 clips ρ > 1.2 (1 token of row 0); A < 0 clips ρ < 0.8 (1 of row 1's 2 loss tokens)
    assert parts.clipped_high.tolist() == [1.0, 0.0] and parts.clipped_low.tolist() == [0.0, 1.0]
    assert parts.tokens.tolist() == [3.0, 2.0]


def test_loss_aggregations_hand_computed():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # ρ = 1: the per-token loss is −A: row 0 (A = 1) −1, −1; row 1 (A = −3) 3
    parts = policy_loss(logp, logp, None, torch.tensor([1.0, -3.0]), mask, kl_beta=0.0)
    assert parts.token_loss_sum.tolist() == [-2.0, 3.0]
    assert float(aggregate_loss(parts, "sequence", 2)) == pytest.approx((-1.0 + 3.0) / 2)
    assert float(aggregate_loss(parts, "token", 2, minibatch_tokens=3)) == pytest.approx((-2.0 + 3.0) / 3)
    # Dr. GRPO: Σ over all tokens / (N · max_new_tokens) = 1 / (2 · 4)
    assert float(aggregate_loss(parts, "constant", 2, max_new_tokens=4)) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        aggregate_loss(parts, "mean", 2)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batches_accumulate_to_the_whole_minibatch_gradient(aggregation, ratio_level):
    """Gradient accumulation: the shares of micro-batches of 1, 2 and 3 rows, each normalised by the
    whole minibatch's sequences or tokens, sum to the one-batch loss and gradient."""
    torch.manual_seed(1)
    rows, width, max_new_tokens = 6, 5, 5
    old, ref = torch.randn(rows, width, dtype=torch.float64) - 1, torch.randn(rows, width, dtype=torch.float64) - 1
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in (5, 1, 3, 4, 2, 5)])
    adv = torch.randn(rows, dtype=torch.float64)
    start = old + 0.3 * torch.randn(rows, width, dtype=torch.float64)
    tokens = float(mask.sum())

    def loss_and_grad(split):
        logp = start.clone().requires_grad_()
        total = 0.0
        for part in torch.arange(rows).split(split):
            parts = policy_loss(logp[part], old[part], ref[part], adv[part], mask[part], ratio_level=ratio_level,
                                clip_eps_high=0.28)
            loss = aggregate_loss(parts, aggregation, rows, tokens, max_new_tokens)
            loss.backward()
            total += loss.item()
        return total, logp.grad

    whole_loss, whole_grad = loss_and_grad(rows)
    for split in (1, 2, 3):
        loss, grad = loss_and_grad(split)
        assert loss == pytest.approx(whole_loss, rel=1e-12)
        assert torch.allclose(grad, whole_grad, rtol=1e-12, atol=1e-15)
    assert whole_grad.abs().sum() > 0
