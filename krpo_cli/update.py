"""UPDATE, the policy update of a training step (krpo_cli.train runs the step's phases).

The rollout batch (or, with `algorithm.skip_equal_reward_groups`, its groups whose rewards
differ) is shuffled and split into minibatches of `train.minibatch_size` completions; each
minibatch is one optimizer step, its gradient accumulated over micro-batches of
`train.micro_batch_size` rows. The loss is krpo_cli.losses': each micro-batch adds its share,
normalised by the whole minibatch's size (sequences or loss tokens), so that the split into
micro-batches and processes does not change the gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from krpo_cli.advantages import rows_to_train
from krpo_cli.log_probs import batched_log_probs, completion_log_probs
from krpo_cli.losses import aggregate_loss, policy_loss, without_final_eos
from krpo_cli.rollout import Rollout

if TYPE_CHECKING:
    from krpo_cli.train import Batch, Run


class NumericalFailure(Exception):
    """Too many consecutive non-finite updates."""


# Tokens per forward/backward on a CPU: fewer is slower per token (small matrix products),
# more is slower too (activations fall out of cache, pages are faulted in); measured on the
# quickstart model, 4 × 156 tokens beat both 2 × 156 and 8 or 16 × 156 (docs/benchmarks.md).
CPU_TOKENS_PER_MICRO_BATCH = 640
# The log-probs that stay fixed (reference, rollout policy) keep nothing for backward: there
# twice the tokens per forward measured ~6 % faster (8 × 156 against 4 × 156; 12 × 156 slower).
CPU_TOKENS_PER_FIXED_BATCH = 2 * CPU_TOKENS_PER_MICRO_BATCH


def auto_micro_batch(minibatch: int, sequence_length: int, device: torch.device,
                     cpu_tokens: int = CPU_TOKENS_PER_MICRO_BATCH) -> int:
    """Rows per forward when the recipe leaves train.micro_batch_size unset.

    On a CPU: about `cpu_tokens` tokens (at least one row). Elsewhere the whole minibatch, as
    a GPU is fastest with big batches and its memory is the user's knob.
    """
    if device.type != "cpu":
        return minibatch
    return max(1, min(minibatch, cpu_tokens // max(1, sequence_length)))


@dataclass
class UpdateStats:
    """What the policy update of one step did (this process's share of the per-token sums)."""

    started: float  # time.perf_counter() when the update began
    losses: list[float] = field(default_factory=list)  # one per optimizer step taken
    grad_norms: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # one per sequence trained on
    clip_fracs: list[float] = field(default_factory=list)
    skipped: int = 0
    loss_tokens: float = 0.0  # tokens trained on (each time an epoch passes over them)
    clipped_low: float = 0.0  # of them, clipped at 1 − ε_low (advantage < 0)
    clipped_high: float = 0.0  # clipped at 1 + ε_high (advantage > 0)
    entropy_sum: float = 0.0  # the policy's token entropy, summed over the completion tokens trained on
    entropy_tokens: float = 0.0  # those completion tokens (each time an epoch passes over them)


def update_policy(run: Run, batch: Batch, step: int) -> UpdateStats:
    """UPDATE: shuffled minibatches, gradient accumulation over micro-batches. With several processes
    each trains on the rows it holds of the same global minibatch."""
    opt, alg = run.recipe.train, run.recipe.algorithm
    stats = UpdateStats(started=time.perf_counter())
    length, device = batch.rollout.sequences.shape[1], run.loaded.device
    micro_batch = opt.micro_batch_size or auto_micro_batch(opt.minibatch_size, length, device, CPU_TOKENS_PER_MICRO_BATCH)
    fixed_batch = opt.micro_batch_size or auto_micro_batch(opt.minibatch_size, length, device, CPU_TOKENS_PER_FIXED_BATCH)
    fixed = fixed_log_probs(run, batch.rollout, fixed_batch)
    rows = rows_to_train(batch.groups, alg.skip_equal_reward_groups)  # global row numbers
    run.model.train()
    for _ in range(opt.epochs_per_batch):
        order = rows[torch.randperm(len(rows), generator=run.shuffle)]
        for start in range(0, len(order), opt.minibatch_size):
            minibatch_update(run, batch, order[start : start + opt.minibatch_size], micro_batch, fixed, stats, step)
    run.model.eval()
    return stats


def fixed_log_probs(run: Run, rollout: Rollout, micro_batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-probs that stay fixed during the update: (reference with the adapter off, when β > 0;
    the rollout policy's, when the batch feeds more than one optimizer step)."""
    alg, opt, model = run.recipe.algorithm, run.recipe.train, run.model
    temperature = run.recipe.generation.temperature
    optimizer_steps_per_batch = opt.epochs_per_batch * -(-run.recipe.rollout_size // opt.minibatch_size)
    everything = torch.arange(len(rollout.completions))
    ref_log_probs = old_log_probs = None
    with torch.no_grad():
        model.eval()
        if alg.kl_beta > 0:
            with model.disable_adapter():
                ref_log_probs = batched_log_probs(model, rollout, everything, micro_batch, temperature)
        if optimizer_steps_per_batch > 1:
            old_log_probs = batched_log_probs(model, rollout, everything, micro_batch, temperature)
    return ref_log_probs, old_log_probs


def loss_tokens(batch: Batch, mask_eos: bool) -> torch.Tensor:
    """(prompts·G,) the global batch's loss tokens per completion: its length, less its final EOS
    with `algorithm.mask_eos`."""
    if not mask_eos:
        return batch.lengths
    return batch.lengths - batch.ends_with_eos.to(batch.lengths.dtype)


def minibatch_update(run: Run, batch: Batch, mb_rows: torch.Tensor, micro_batch: int, fixed: tuple,
                     stats: UpdateStats, step: int) -> None:
    """One optimizer step on the minibatch `mb_rows` (global row numbers), or none if it is not finite."""
    alg, opt, dist, rollout = run.recipe.algorithm, run.recipe.train, run.dist, batch.rollout
    ref_log_probs, old_log_probs = fixed
    clip_low, clip_high = alg.clip_range
    minibatch_tokens = float(loss_tokens(batch, alg.mask_eos)[mb_rows].sum())  # all processes' rows
    # Sorted, a micro-batch holds few distinct prompts, each read once (rows are i·G + j);
    # the minibatch's gradient is the same sum in any order.
    my_rows = dist.local_rows(mb_rows, run.recipe.rollout_size).sort().values
    run.optimizer.zero_grad(set_to_none=True)
    mb_loss = 0.0
    for start in range(0, len(my_rows), micro_batch):
        index = my_rows[start : start + micro_batch]
        log_probs, entropy = completion_log_probs(
            run.model, rollout.sequences[index], rollout.attention_mask[index], rollout.prompt_length,
            run.recipe.generation.temperature, with_entropy=True,
        )
        mask = rollout.completion_mask[index]
        stats.entropy_sum += float((entropy * mask).sum())
        stats.entropy_tokens += float(mask.sum())
        if alg.mask_eos:
            mask = without_final_eos(mask, rollout.ends_with_eos[index])
        parts = policy_loss(
            log_probs,
            old_log_probs[index] if old_log_probs is not None else log_probs.detach(),
            ref_log_probs[index] if ref_log_probs is not None else None,
            batch.advantages[index],
            mask,
            clip_eps=clip_low,
            kl_beta=alg.kl_beta,
            clip_eps_high=clip_high,
            ratio_level=alg.importance_ratio,
        )
        loss = aggregate_loss(parts, alg.aggregation, len(mb_rows), minibatch_tokens, run.recipe.generation.max_new_tokens)
        loss.backward()
        mb_loss += loss.item()
        record(stats, parts)
    mb_loss = dist.sum_gradients(run.trainable, mb_loss)  # ranks' shares → the whole minibatch's
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, opt.max_grad_norm)
    if not torch.isfinite(grad_norm) or not np.isfinite(mb_loss):
        skip_update(run, stats, step)
        return
    run.consecutive_skips = 0
    run.optimizer.step()
    run.scheduler.step()
    stats.losses.append(mb_loss)
    stats.grad_norms.append(float(grad_norm))


def record(stats: UpdateStats, parts) -> None:
    """Add a micro-batch's KL, clipping and token figures to the step's."""
    stats.kls.extend(parts.kl.tolist())
    stats.clip_fracs.extend(parts.clip_fraction.tolist())
    stats.loss_tokens += float(parts.tokens.sum())
    stats.clipped_low += float(parts.clipped_low.sum())
    stats.clipped_high += float(parts.clipped_high.sum())


def skip_update(run: Run, stats: UpdateStats, step: int) -> None:
    """Drop a non-finite update; too many in a row stop the run."""
    run.optimizer.zero_grad(set_to_none=True)
    stats.skipped += 1
    run.consecutive_skips += 1
    run.console.print(f"step {step}: non-finite loss or gradient, update skipped", highlight=False)
    if run.consecutive_skips >= run.recipe.train.max_consecutive_skips:
        raise NumericalFailure(
            f"{run.consecutive_skips} consecutive updates had a non-finite loss or gradient (step {step}); "
            "try a lower train.learning_rate, model.dtype=float32, or a smaller algorithm.kl_beta"
        )
