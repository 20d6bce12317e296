"""Loss math: pure tensor functions, no model and no I/O (log-probs: krpo_cli.log_probs).

The policy loss is the paper's: a PPO-style clipped surrogate on completion tokens plus
β times the k3 estimate of KL(policy ‖ reference), averaged over each sequence's
completion tokens and then over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each row's masked tokens: (B, T) → (B,). Empty rows give 0."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy ‖ reference): exp(d) − d − 1 with d = ref − policy.

    Unbiased for samples drawn from the policy and never negative.
    """
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss −min(ρA, clip(ρ, 1−ε, 1+ε)A) and a clipped-token mask.

    advantages: (B,) one value per sequence, broadcast over its tokens.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


@dataclass
class LossParts:
    """Per-sequence terms of the policy loss (each shape (B,)); `loss = (surrogate + β·kl)` per sequence."""

    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_beta: float = 0.01,
) -> LossParts:
    """Clipped surrogate + β·k3 KL per token, averaged over each sequence's completion tokens.

    Returns per-sequence values; the caller averages over sequences (the paper's aggregation).
    With `ref_log_probs=None` (β = 0) the KL term is skipped and reported as zero.
    """
    surrogate, clipped = clipped_surrogate(log_probs, old_log_probs, advantages, clip_eps)
    per_token = surrogate
    if ref_log_probs is not None:
        kl = kl_k3(log_probs, ref_log_probs)
        per_token = per_token + kl_beta * kl
        kl_seq = sequence_mean(kl, mask)
    else:
        kl_seq = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
    return LossParts(
        loss=sequence_mean(per_token, mask),
        kl=kl_seq,
        clip_fraction=sequence_mean(clipped.to(log_probs.dtype), mask),
    )
