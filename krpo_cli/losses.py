"""Loss math: pure tensor functions, no model and no I/O (log-probs: krpo_cli.log_probs).

The policy loss is the paper's by default: a PPO-style clipped surrogate on completion tokens
plus β times the k3 estimate of KL(policy ‖ reference), averaged over each sequence's completion
tokens and then over sequences. Options (docs/algorithm.md): asymmetric clipping (DAPO's
clip-higher), a sequence-level importance ratio (GSPO), and two other ways to aggregate the
token losses (`aggregate_loss`: per token over the minibatch, DAPO; over a constant, Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("sequence", "token", "constant")
RATIO_LEVELS = ("token", "sequence")


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each row's masked tokens: (B, T) → (B,). Empty rows give 0."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def without_final_eos(mask: torch.Tensor, ends_with_eos: torch.Tensor) -> torch.Tensor:
    """The completion mask without the end-of-sequence token: each row that `ends_with_eos` (B,)
    loses its last masked token; a row cut off at the length limit keeps all of its tokens."""
    last = (mask.sum(dim=-1) - 1).clamp(min=0)  # a completion ends at (and includes) its first EOS
    drop = torch.zeros_like(mask).scatter_(-1, last.unsqueeze(-1), ends_with_eos.to(mask.dtype).unsqueeze(-1))
    return mask * (1 - drop)


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy ‖ reference): exp(d) − d − 1 with d = ref − policy.

    Unbiased for samples drawn from the policy and never negative.
    """
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1.0


def importance_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor | None = None, level: str = "token"
) -> torch.Tensor:
    """ρ per token, (B, T): π/π_old of the token (`level: token`), or GSPO's sequence ratio
    exp(mean over the sequence's masked tokens of log π − log π_old), the same for every token
    of the row (`level: sequence`; gradients flow through the mean, as in TRL's
    importance_sampling_level="sequence")."""
    log_ratio = log_probs - old_log_probs
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        if mask is None:
            raise ValueError("a sequence-level ratio needs the completion mask")
        return torch.exp(sequence_mean(log_ratio, mask)).unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"unknown importance ratio level {level!r}; expected one of {', '.join(RATIO_LEVELS)}")


def clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    mask: torch.Tensor | None = None,
    ratio_level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) and a clipped-token mask.

    advantages: (B,) one value per sequence, broadcast over its tokens. ε_low = `clip_eps`,
    ε_high = `clip_eps_high` (default: `clip_eps`, the symmetric clip). ρ: `importance_ratio`.
    A token is clipped when the clipped term is the smaller one: ρ > 1+ε_high with A > 0, or
    ρ < 1−ε_low with A < 0 (TRL's clip_ratio/region).
    """
    ratio = importance_ratio(log_probs, old_log_probs, mask, ratio_level)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


@dataclass
class LossParts:
    """Per-sequence terms of the policy loss, each shape (B,).

    loss: the mean over the sequence's tokens of ℓ = surrogate + β·kl (what `sequence`
    aggregation averages); token_loss_sum: the sum of ℓ over its tokens (`token`, `constant`);
    tokens: its number of loss tokens; kl and clip_fraction: means over its tokens;
    clipped_low / clipped_high: how many of its tokens were clipped below (A < 0) or above (A > 0).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    token_loss_sum: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    clipped_low: torch.Tensor | None = None
    clipped_high: torch.Tensor | None = None


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_beta: float = 0.01,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
) -> LossParts:
    """Clipped surrogate + β·k3 KL per token, averaged over each sequence's completion tokens.

    Returns per-sequence values (`LossParts`); `aggregate_loss` turns them into the minibatch's
    loss. With `ref_log_probs=None` (β = 0) the KL term is skipped and reported as zero.
    """
    surrogate, clipped = clipped_surrogate(
        log_probs, old_log_probs, advantages, clip_eps, clip_eps_high, mask, ratio_level
    )
    per_token = surrogate
    if ref_log_probs is not None:
        kl = kl_k3(log_probs, ref_log_probs)
        per_token = per_token + kl_beta * kl
        kl_seq = sequence_mean(kl, mask)
    else:
        kl_seq = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
    weights = mask.to(log_probs.dtype)
    clipped_tokens = clipped.to(log_probs.dtype) * weights
    negative = (advantages < 0).to(log_probs.dtype).unsqueeze(-1)
    return LossParts(
        loss=sequence_mean(per_token, mask),
        kl=kl_seq,
        clip_fraction=sequence_mean(clipped.to(log_probs.dtype), mask),
        token_loss_sum=(per_token * weights).sum(dim=-1),
        tokens=weights.sum(dim=-1),
        clipped_low=(clipped_tokens * negative).sum(dim=-1).detach(),
        clipped_high=(clipped_tokens * (1 - negative)).sum(dim=-1).detach(),
    )


def aggregate_loss(
    parts: LossParts, aggregation: str, minibatch_sequences: int, minibatch_tokens: float = 0.0,
    max_new_tokens: int = 0,
) -> torch.Tensor:
    """This micro-batch's share of its minibatch's loss: summed over the micro-batches (and
    processes) of a minibatch, the shares give the minibatch's loss and gradient, whatever the
    split, because the normaliser is the whole minibatch's.

    sequence (the GRPO paper, the default): Σᵢ mean_t ℓᵢₜ / N, every completion weighs the same;
    token (DAPO; TRL's loss_type="dapo"/"bnpo"): Σᵢ Σₜ ℓᵢₜ / Σᵢ Tᵢ, every token weighs the same;
    constant (Dr. GRPO; TRL's loss_type="dr_grpo"): Σᵢ Σₜ ℓᵢₜ / (N · max_new_tokens).
    N = `minibatch_sequences`, Σᵢ Tᵢ = `minibatch_tokens` (its loss tokens, at least 1 is used).
    """
    if aggregation == "sequence":
        return parts.loss.sum() / minibatch_sequences
    if aggregation == "token":
        return parts.token_loss_sum.sum() / max(float(minibatch_tokens), 1.0)
    if aggregation == "constant":
        if max_new_tokens < 1:
            raise ValueError("constant loss aggregation needs max_new_tokens")
        return parts.token_loss_sum.sum() / (minibatch_sequences * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
