"""The KRPO training loop, top to bottom.

Each step: sample `prompts_per_step` prompts → generate G completions each (ROLLOUT) →
grade them (REWARD) → per-prompt advantages with the Kalman filter or GRPO's group
statistics (ADVANTAGE) → reference log-probs with the adapter disabled and, when the
rollout batch feeds more than one optimizer step, the rollout policy's log-probs →
shuffled minibatches of completions, clipped surrogate + β·KL, backward, clip, AdamW
step (UPDATE) → metrics.jsonl, samples.jsonl and the progress bar (LOG). The adapter is
saved in PEFT's standard files at the end.

Simplifications worth knowing: one rollout batch per step (no replay buffer across
steps); when one optimizer step consumes the whole rollout batch, the "old" log-probs
are the current policy's, detached, which is exactly what a stored copy would hold.
"""

from __future__ import annotations

import random
import signal
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from krpo_cli.advantages import PromptBaselines, compute_advantages
from krpo_cli.checkpoint import checkpoint_summary, load_checkpoint, save_checkpoint, set_rng_state
from krpo_cli.config import Recipe, RecipeError, TrainSettings
from krpo_cli.data import PromptSampler, build_prompt, load_rows, rows_digest
from krpo_cli.distributed import DistributedContext, adapter_state
from krpo_cli.evaluate import evaluate_model
from krpo_cli.run_dir import (
    ADAPTER,
    METRICS,
    SAMPLES,
    CheckpointError,
    check_resumable,
    check_run_dir,
    find_resume_checkpoint,
    list_checkpoints,
    logged_rewards,
    prepare_run_dir,
    save_resolved_recipe,
    truncate_jsonl,
    write_run_info,
)
from krpo_cli.run_log import JsonlWriter, MetricsLogger, StepProgress, check_logging_backends, counted
from krpo_cli.losses import policy_loss
from krpo_cli.models import load_policy, save_adapter
from krpo_cli.rewards import get_grader
from krpo_cli.rollout import completion_log_probs, generate_rollout, pick_engine


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a safe point, after a checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")


class NumericalFailure(Exception):
    """Too many consecutive non-finite updates."""


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next safe point; a second one
    falls through to the default handler (immediate exit)."""

    def __init__(self, console: Console):
        self.console = console
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.console.print("stopping after this step (a checkpoint will be written); interrupt again to abort now")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batched_log_probs(model, rollout, rows: torch.Tensor, micro_batch: int, temperature: float) -> torch.Tensor:
    """Completion log-probs for the given rollout rows, `micro_batch` rows per forward."""
    parts = []
    for start in range(0, len(rows), micro_batch):
        index = rows[start : start + micro_batch]
        parts.append(
            completion_log_probs(
                model, rollout.sequences[index], rollout.attention_mask[index], rollout.prompt_length, temperature
            )
        )
    return torch.cat(parts, dim=0)


# Tokens per forward/backward on a CPU: fewer is slower per token (small matrix products),
# more is slower too (activations fall out of cache, pages are faulted in); measured on the
# quickstart model, 4 × 156 tokens beat both 2 × 156 and 8 or 16 × 156 (docs/benchmarks.md).
CPU_TOKENS_PER_MICRO_BATCH = 640


def auto_micro_batch(minibatch: int, sequence_length: int, device: torch.device) -> int:
    """Rows per forward when the recipe leaves train.micro_batch_size unset.

    On a CPU: about CPU_TOKENS_PER_MICRO_BATCH tokens (at least one row). Elsewhere the whole
    minibatch, as a GPU is fastest with big batches and its memory is the user's knob.
    """
    if device.type != "cpu":
        return minibatch
    return max(1, min(minibatch, CPU_TOKENS_PER_MICRO_BATCH // max(1, sequence_length)))


def check_optimizer(name: str) -> None:
    """Fail before any loading when the recipe's optimizer needs bitsandbytes and it does not import."""
    if name != "adamw":
        try:
            import bitsandbytes.optim  # noqa: F401
        except ImportError as err:
            raise RecipeError(f"train.optimizer: {name} needs bitsandbytes, which does not import here ({err})") from None


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The recipe's AdamW: torch's (float32 state) or bitsandbytes' with 8-bit block-wise state.

    Paged state lives in CUDA unified memory; on a CPU there is nothing to page and the paged
    optimizer is the 8-bit one.
    """
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    import bitsandbytes.optim as bnb_optim

    kind = bnb_optim.PagedAdamW8bit if settings.optimizer == "paged_adamw_8bit" else bnb_optim.AdamW8bit
    return kind(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def quarter_means(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter of a series (at least one value each)."""
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def train(
    recipe: Recipe,
    recipe_text: str = "",
    overwrite: bool = False,
    console: Console | None = None,
    device: torch.device | None = None,
    resume: str | bool = False,
) -> Path:
    """Run a recipe; returns the run directory. `resume`: True for the latest checkpoint, or a path.

    Under `accelerate launch`/`torchrun` every process runs this loop on its share of the prompts;
    rank 0 alone writes and prints (docs/distributed.md).
    """
    cfg, alg, gen, opt = recipe, recipe.algorithm, recipe.generation, recipe.train
    dist = DistributedContext.from_env()  # one process: no process group, every helper a no-op
    dist.check_prompts_per_step(opt.prompts_per_step)
    console = (console or Console()) if dist.is_main else Console(quiet=True)
    device = device or dist.device
    run_dir = check_run_dir(recipe, overwrite, bool(resume))
    checkpoint = None
    if resume:
        checkpoint = find_resume_checkpoint(run_dir, resume)
        check_resumable(run_dir, recipe)
        summary = checkpoint_summary(checkpoint)
        done = summary["step"]
        if done > opt.steps:
            raise CheckpointError(
                f"the checkpoint '{checkpoint}' is at step {done}, past train.steps={opt.steps}; "
                f"resume with train.steps={done} or more"
            )
    seed_everything(cfg.run.seed)

    # Everything a user can get wrong is loaded before the run directory is written.
    check_logging_backends(cfg.output.log_to)
    check_optimizer(opt.optimizer)
    rows = load_rows(cfg.data, "train")
    data_digest = rows_digest(rows)  # the sampler's saved order indexes these rows: a resume needs the same
    if checkpoint is not None and summary["data_digest"] not in (None, data_digest):
        raise CheckpointError(  # (a checkpoint written before krpo kept the digest has None: not checked)
            f"the training data differs from the data of the checkpoint '{checkpoint}' (a changed file, or "
            "another krpo version's reading of it); the run cannot continue on the same prompts, start over with --overwrite"
        )
    eval_rows = load_rows(cfg.data, "test")[: cfg.eval.size] if cfg.eval.every else []
    grader = get_grader(cfg.reward.grader)
    loaded = load_policy(cfg.model, cfg.lora, cfg.run.seed, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = pick_engine(model, gen.engine)
    dist.seed_sampling(cfg.run.seed)  # after the LoRA init, which is the same on every rank
    dist.barrier()  # every rank has checked the run directory before rank 0 replaces it
    if dist.is_main:
        if checkpoint is None:
            prepare_run_dir(run_dir, recipe, recipe_text)
        else:
            save_resolved_recipe(run_dir, recipe)
        run_info = {"quantization": loaded.quantization, "dtype": str(loaded.dtype).removeprefix("torch."),
                    "device": loaded.device.type, "model_path": loaded.path, "generation_engine": engine,
                    "processes": dist.world_size}
        write_run_info(run_dir, run_info)
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in trainable)
    console.print(
        f"[bold]krpo train[/] · {cfg.algorithm.advantage.upper()} · model {escape(cfg.model.name_or_path)} "
        f"({loaded.quantization}, {str(loaded.dtype).removeprefix('torch.')}, {loaded.device.type}) · "
        f"LoRA r={cfg.lora.r}, {num_trainable:,} trainable parameters · {counted(len(rows), 'training row')} · "
        f"run dir {escape(str(run_dir))}",
        highlight=False,
    )

    optimizer = make_optimizer(trainable, opt)
    warmup = opt.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    sampler = PromptSampler(rows, cfg.run.seed)
    shuffle = torch.Generator().manual_seed(cfg.run.seed)
    kalman = alg.kalman.model_dump(exclude={"scope"})
    baselines = PromptBaselines() if alg.kalman.scope == "prompt" else None
    rollout_size = recipe.rollout_size
    minibatch = opt.minibatch_size
    optimizer_steps_per_batch = opt.epochs_per_batch * -(-rollout_size // minibatch)
    first_step = 1
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        sampler.load_state(state["sampler"])
        shuffle.set_state(state["shuffle"])
        set_rng_state(state["rng"])
        if baselines is not None:
            baselines.load_state(state["prompt_baselines"])
        dist.restore_rng(state, cfg.run.seed, state["step"])
        first_step = state["step"] + 1
        if dist.is_main:
            for name in (METRICS, SAMPLES):
                truncate_jsonl(run_dir / name, state["step"])
        console.print(f"resumed from {checkpoint} (step {state['step']} done)", highlight=False, markup=False)
    dist.broadcast_parameters(trainable)
    reward_history = []
    if dist.is_main:
        metrics_log = MetricsLogger(run_dir, recipe, first_step)  # creates metrics.jsonl (append mode)
        samples_log = JsonlWriter(run_dir / SAMPLES)
        reward_history = logged_rewards(run_dir)
    consecutive_skips = 0

    def checkpoint_now(step: int) -> Path:
        trainer_state = {"step": step, "sampler": sampler.state(), "shuffle": shuffle.get_state(), "data_digest": data_digest}
        if baselines is not None:
            trainer_state["prompt_baselines"] = baselines.state()
        trainer_state.update(dist.gather_rng_states())  # every rank's own sampling RNG (distributed only)
        saved = None
        if dist.is_main:
            saved = save_checkpoint(run_dir, step, model, optimizer, scheduler, trainer_state, cfg.output.keep_checkpoints)
        dist.barrier()
        return saved if dist.is_main else list_checkpoints(run_dir)[-1]

    with StepProgress(console, opt.steps, first_step - 1) as progress, StopRequest(console) as stop:
        for step in range(first_step, opt.steps + 1):
            step_started = time.perf_counter()
            step_lr = scheduler.get_last_lr()[0]  # the rate of the step's first update: logged as "lr"

            # ROLLOUT: one batched generation for all prompts × G samples (this rank's share of whole prompts).
            global_rows = sampler.next_batch(opt.prompts_per_step)
            batch_rows = dist.shard(global_rows)  # this rank's whole prompts
            prompts = [build_prompt(tokenizer, cfg.data, row["question"]) for row in batch_rows]
            rollout = generate_rollout(
                model,
                tokenizer,
                prompts,
                alg.group_size,
                gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                top_k=gen.top_k,
                batch_size=gen.batch_size,
                min_new_tokens=gen.min_new_tokens,
                engine=engine,
            )

            # REWARD: the grader that evaluation uses.
            answers = [row["answer"] for row in batch_rows for _ in range(alg.group_size)]
            grades = [grader(text, answer) for text, answer in zip(rollout.completions, answers)]
            rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
            correct = torch.tensor([g.correct for g in grades], dtype=torch.float64)
            formatted = torch.tensor([g.formatted for g in grades], dtype=torch.float64)
            lengths = rollout.completion_mask.sum(dim=1).float()
            # Every rank gets every rank's figures: advantages and metrics are those of the global batch.
            rewards, correct, formatted, lengths = dist.gather_rows(rewards, correct, formatted, lengths)
            groups = rewards.view(opt.prompts_per_step, alg.group_size)

            # ADVANTAGE: per prompt, in sampled order (the whole batch on every rank: same generator draws).
            if baselines is not None:  # kalman.scope: prompt — a prompt's filter goes on from its last visit
                questions = [row["question"] for row in global_rows]
                all_advantages = baselines.advantages(groups, questions, generator=shuffle, **kalman)
            else:
                all_advantages = compute_advantages(groups, alg.advantage, shuffle, **kalman)
            all_advantages = all_advantages.flatten()
            advantages = all_advantages[dist.local_slice(rollout_size)].to(loaded.device)

            # Log-probs that stay fixed during the update: reference (adapter off) and old policy.
            update_started = time.perf_counter()
            micro_batch = opt.micro_batch_size or auto_micro_batch(minibatch, rollout.sequences.shape[1], loaded.device)
            everything = torch.arange(len(rollout.completions))
            with torch.no_grad():
                model.eval()
                ref_log_probs = None
                if alg.kl_beta > 0:
                    with model.disable_adapter():
                        ref_log_probs = batched_log_probs(model, rollout, everything, micro_batch, gen.temperature)
                old_log_probs = None
                if optimizer_steps_per_batch > 1:
                    old_log_probs = batched_log_probs(model, rollout, everything, micro_batch, gen.temperature)

            # UPDATE: shuffled minibatches, gradient accumulation over micro-batches. With several
            # processes each trains on the rows it holds of the same global minibatch.
            model.train()
            losses, kls, clip_fracs, grad_norms, skipped = [], [], [], [], 0
            for _ in range(opt.epochs_per_batch):
                order = torch.randperm(rollout_size, generator=shuffle)
                for mb_start in range(0, rollout_size, minibatch):
                    mb_rows = order[mb_start : mb_start + minibatch]
                    # Sorted, a micro-batch holds few distinct prompts, each read once (rows are i·G + j);
                    # the minibatch's gradient is the same sum in any order.
                    my_rows = dist.local_rows(mb_rows, rollout_size).sort().values
                    optimizer.zero_grad(set_to_none=True)
                    mb_loss = 0.0
                    for start in range(0, len(my_rows), micro_batch):
                        index = my_rows[start : start + micro_batch]
                        log_probs = completion_log_probs(
                            model,
                            rollout.sequences[index],
                            rollout.attention_mask[index],
                            rollout.prompt_length,
                            gen.temperature,
                        )
                        old = old_log_probs[index] if old_log_probs is not None else log_probs.detach()
                        parts = policy_loss(
                            log_probs,
                            old,
                            ref_log_probs[index] if ref_log_probs is not None else None,
                            advantages[index],
                            rollout.completion_mask[index],
                            clip_eps=alg.clip_eps,
                            kl_beta=alg.kl_beta,
                        )
                        loss = parts.loss.sum() / len(mb_rows)  # mean over the (global) minibatch's sequences
                        loss.backward()
                        mb_loss += loss.item()
                        kls.extend(parts.kl.tolist())
                        clip_fracs.extend(parts.clip_fraction.tolist())
                    mb_loss = dist.sum_gradients(trainable, mb_loss)  # ranks' shares → the whole minibatch's
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, opt.max_grad_norm)
                    if not torch.isfinite(grad_norm) or not np.isfinite(mb_loss):
                        optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        consecutive_skips += 1
                        console.print(f"step {step}: non-finite loss or gradient, update skipped", highlight=False)
                        if consecutive_skips >= opt.max_consecutive_skips:
                            raise NumericalFailure(
                                f"{consecutive_skips} consecutive updates had a non-finite loss or gradient (step {step}); "
                                "try a lower train.learning_rate, model.dtype=float32, or a smaller algorithm.kl_beta"
                            )
                        continue
                    consecutive_skips = 0
                    optimizer.step()
                    scheduler.step()
                    losses.append(mb_loss)
                    grad_norms.append(float(grad_norm))
            model.eval()

            # LOG
            (generated_tokens,) = dist.reduce_floats([rollout.num_generated_tokens], "sum")
            (rollout_seconds,) = dist.reduce_floats([rollout.seconds], "max")  # the slowest rank's
            now = time.perf_counter()
            metrics = {
                "step": step,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                "correct_frac": statistics.fmean(correct.tolist()),
                "format_frac": statistics.fmean(formatted.tolist()),
                "frac_zero_std": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
                "advantage_mean": float(all_advantages.mean()),
                "advantage_abs_max": float(all_advantages.abs().max()),
                "loss": statistics.fmean(losses) if losses else float("nan"),
                "kl": dist.global_mean(kls),
                "clip_frac": dist.global_mean(clip_fracs),
                "grad_norm": statistics.fmean(grad_norms) if grad_norms else float("nan"),
                "skipped_updates": skipped,
                "completion_len_mean": float(lengths.mean()),
                "tokens_per_s": generated_tokens / max(rollout_seconds, 1e-9),
                "rollout_seconds": rollout_seconds,
                "update_seconds": now - update_started,
                "step_seconds": now - step_started,
                "lr": step_lr,
            }
            if dist.is_main and eval_rows and (step % cfg.eval.every == 0 or step == opt.steps):
                # The same evaluation as `krpo eval`, on a fixed held-out subset (greedy: no RNG draws).
                report = evaluate_model(model, tokenizer, eval_rows, cfg, batch_size=cfg.eval.batch_size)
                metrics["eval/accuracy"] = report.metrics["accuracy"]
                metrics["eval/mean_reward"] = report.metrics["mean_reward"]
            if dist.is_main:
                metrics_log.write(metrics)
                for i in range(min(cfg.output.samples_per_step, len(batch_rows))):
                    j = i * alg.group_size  # the first completion of each of the first prompts (rank 0's)
                    samples_log.write(
                        {
                            "step": step,
                            "question": batch_rows[i]["question"],
                            "answer": batch_rows[i]["answer"],
                            "completion": rollout.completions[j],
                            "reward": grades[j].reward,
                        }
                    )
            reward_history.append(metrics["reward_mean"])
            progress.update(metrics)
            stopping = dist.any(stop.signal is not None)  # all ranks stop at the same step
            if step % cfg.output.save_every == 0 or step == opt.steps or stopping:
                saved = checkpoint_now(step)
                if stopping and step < opt.steps:
                    if dist.is_main:
                        metrics_log.close()
                        samples_log.close()
                    raise TrainingInterrupted(step, saved)

    digests = dist.check_in_sync(adapter_state(model)) if dist.is_distributed else []
    if dist.is_main:
        metrics_log.close()
        samples_log.close()
        save_adapter(model, run_dir / ADAPTER)
    dist.close()  # a barrier: when any rank returns, the adapter is written
    if not dist.is_main:
        return run_dir
    if digests:
        console.print(f"adapter sha256 by rank: {' '.join(digests)} (identical)", highlight=False, soft_wrap=True)
    first, last = quarter_means(reward_history)
    console.print(
        f"done: {counted(opt.steps, 'step')} · mean reward first quarter {first:.3f} → last quarter {last:.3f} · "
        f"adapter saved to {run_dir / ADAPTER}",
        highlight=False,
        markup=False,
    )
    return run_dir
