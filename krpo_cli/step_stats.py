"""Figures of a training step for metrics.jsonl: pure functions, named and defined as TRL's
GRPOTrainer logs them where it logs the same thing (the table: docs/algorithm.md, "Metrics")."""

from __future__ import annotations

import math

import torch


def group_reward_std(groups: torch.Tensor) -> float:
    """`reward_std`: the mean over groups of each group's reward standard deviation (Bessel's
    correction), for rewards (num_groups, G) — TRL's reward_std with scale_rewards "group"."""
    return float(groups.to(torch.float64).std(dim=1).mean())


def batch_reward_std(rewards: torch.Tensor) -> float:
    """`reward_std_batch`: the standard deviation of all the step's rewards together (Bessel's correction);
    0 for a single reward."""
    return float(rewards.to(torch.float64).std()) if len(rewards) > 1 else 0.0


def truncated_fraction(ends_with_eos: torch.Tensor) -> float:
    """`clipped_ratio`: the share of completions that did not end with an end-of-sequence token, i.e.
    were cut off at generation.max_new_tokens (TRL's completions/clipped_ratio)."""
    return 1.0 - float(ends_with_eos.to(torch.float64).mean())


def clip_ratios(clipped_low: float, clipped_high: float, tokens: float) -> dict[str, float]:
    """`clip_ratio_low/high/region`: the shares of the loss tokens trained on whose ratio was clipped at
    1 − ε_low (advantage < 0), at 1 + ε_high (advantage > 0), and either (NaN when no token was trained)."""
    if tokens <= 0:
        return {"clip_ratio_low": math.nan, "clip_ratio_high": math.nan, "clip_ratio_region": math.nan}
    return {
        "clip_ratio_low": clipped_low / tokens,
        "clip_ratio_high": clipped_high / tokens,
        "clip_ratio_region": (clipped_low + clipped_high) / tokens,
    }


def mean_entropy(entropy_sum: float, tokens: float) -> float:
    """`entropy`: the policy's mean token entropy (nats) over the completion tokens trained on, from
    their sum and count (NaN when no token was trained) — TRL's entropy, over the whole step."""
    return entropy_sum / tokens if tokens > 0 else math.nan


def length_stats(lengths: torch.Tensor) -> dict[str, float]:
    """`completion_len_min/mean/max`: completion lengths in tokens (TRL's completions/min_length, ...)."""
    return {
        "completion_len_min": float(lengths.min()),
        "completion_len_mean": float(lengths.mean()),
        "completion_len_max": float(lengths.max()),
    }
