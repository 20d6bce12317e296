"""The KRPO training loop, top to bottom.

Each step: sample `prompts_per_step` prompts → generate G completions each (ROLLOUT) →
grade them (REWARD) → per-prompt advantages with the Kalman filter or GRPO's group
statistics (ADVANTAGE) → reference log-probs with the adapter disabled and, when the
rollout batch feeds more than one optimizer step, the rollout policy's log-probs →
shuffled minibatches of completions, clipped surrogate + β·KL, backward, clip, AdamW
step (UPDATE) → metrics.jsonl, samples.jsonl and the progress bar (LOG). The adapter is
saved in PEFT's standard files at the end.

`train` reads as those phases: `prepare_run` (checks, data, model, run directory, optimizer,
resumed state: one `Run` record), then per step `collect_rollout` (ROLLOUT, REWARD, ADVANTAGE →
a `Batch`), `update_policy`, `step_metrics` and `log_step`, a checkpoint (`save_step`) when due,
and `finish`.

Simplifications worth knowing: one rollout batch per step (no replay buffer across
steps); when one optimizer step consumes the whole rollout batch, the "old" log-probs
are the current policy's, detached, which is exactly what a stored copy would hold.
"""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from krpo_cli.advantages import PromptBaselines, compute_advantages
from krpo_cli.checkpoint import checkpoint_summary, load_checkpoint, save_checkpoint, set_rng_state
from krpo_cli.config import Recipe, RecipeError, TrainSettings
from krpo_cli.data import PromptSampler, drop_overlong, load_rows, prompt_token_budget, row_prompt, rows_digest
from krpo_cli.distributed import DistributedContext, adapter_state
from krpo_cli.errors import KrpoError
from krpo_cli.evaluate import evaluate_model
from krpo_cli.models import LoadedModel, load_policy, save_adapter
from krpo_cli.rewards import get_grader, load_reward, soft_overlong_penalty
from krpo_cli.rollout import Rollout, generate_rollout, pick_engine
from krpo_cli.run_dir import (
    ADAPTER,
    METRICS,
    SAMPLES,
    CheckpointError,
    check_resumable,
    check_run_dir,
    check_writable,
    find_resume_checkpoint,
    list_checkpoints,
    logged_rewards,
    prepare_run_dir,
    remove_partial_checkpoints,
    save_resolved_recipe,
    set_aside_later_checkpoints,
    truncate_jsonl,
    write_run_info,
)
from krpo_cli.progress import StepProgress
from krpo_cli.run_log import JsonlWriter, MetricsLogger, check_logging_backends, counted
from krpo_cli.step_stats import (
    batch_reward_std, clip_ratios, group_reward_std, length_stats, mean_entropy, truncated_fraction,
)
from krpo_cli.update import UpdateStats, update_policy


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a safe point, after a checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")


class WriteFailure(KrpoError):
    """A file of the run cannot be written mid-run (a full disk, a folder made read-only)."""


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


def optimizer_steps(recipe: Recipe) -> int:
    """Optimizer steps in the whole run: per step, epochs_per_batch passes of ceil(rollout / minibatch)."""
    opt = recipe.train
    return opt.steps * opt.epochs_per_batch * -(-recipe.rollout_size // opt.minibatch_size)


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int):
    """The recipe's learning-rate schedule, transformers' get_scheduler over `total_steps` optimizer steps.

    Warm-up: train.warmup_steps, or ceil(warmup_ratio × total_steps) as transformers' Trainer rounds it.
    `constant` with a warm-up is `constant_with_warmup` (what a recipe with only warmup_steps meant).
    """
    from transformers import get_scheduler

    warmup = settings.warmup_steps or math.ceil(settings.warmup_ratio * total_steps)
    name = "constant_with_warmup" if settings.lr_scheduler == "constant" and warmup else settings.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def quarter_means(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter of a series (at least one value each)."""
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


@dataclass
class Run:
    """What a training run holds from its first step to its last."""

    recipe: Recipe
    console: Console
    dist: DistributedContext
    run_dir: Path
    loaded: LoadedModel
    engine: str  # the decoder that samples rollouts
    grader: Callable
    data_digest: str  # of the training rows: a resume needs the same
    eval_rows: list[dict]
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: PromptSampler
    shuffle: torch.Generator  # advantages' tie-breaks and the minibatch order
    baselines: PromptBaselines | None  # kalman.scope: prompt
    first_step: int = 1
    metrics_log: MetricsLogger | None = None  # rank 0 only, as is samples_log
    samples_log: JsonlWriter | None = None
    reward_history: list[float] = field(default_factory=list)
    consecutive_skips: int = 0

    @property
    def model(self):
        return self.loaded.model


@dataclass
class Batch:
    """One step's rollout, graded, with its advantages. Figures are the global batch's; rows and
    rollout are this process's share of whole prompts."""

    rows: list[dict]
    rollout: Rollout
    grades: list
    rewards: torch.Tensor  # (prompts·G,) each, as are correct, formatted and lengths
    correct: torch.Tensor
    formatted: torch.Tensor
    lengths: torch.Tensor
    groups: torch.Tensor  # rewards as (prompts, G)
    all_advantages: torch.Tensor  # (prompts·G,)
    advantages: torch.Tensor  # this process's rows, on the model's device
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # reward.graders: each one's rewards
    ends_with_eos: torch.Tensor | None = None  # (prompts·G,) bool: not cut off at max_new_tokens


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
    dist = DistributedContext.from_env()  # one process: no process group, every helper a no-op
    dist.check_prompts_per_step(recipe.train.prompts_per_step)
    console = (console or Console()) if dist.is_main else Console(quiet=True)
    run = prepare_run(recipe, recipe_text, overwrite, resume, console, dist, device or dist.device)
    steps = recipe.train.steps
    last_save = time.monotonic()
    with StepProgress(console, steps, run.first_step - 1) as progress, StopRequest(console) as stop:
        for step in range(run.first_step, steps + 1):
            step_started = time.perf_counter()
            step_lr = run.scheduler.get_last_lr()[0]  # the rate of the step's first update: logged as "lr"
            batch = collect_rollout(run)
            update = update_policy(run, batch, step)
            metrics = step_metrics(run, batch, update, step, step_lr, step_started)
            with writing(run, f"the logs of step {step} in '{run.run_dir}'"):
                log_step(run, batch, metrics)
            progress.update(metrics)
            stopping = dist.any(stop.signal is not None)  # all ranks stop at the same step
            if checkpoint_due(run, step, last_save) or stopping:
                with writing(run, f"the checkpoint of step {step}"):
                    saved = save_step(run, step)
                last_save = time.monotonic()
                if stopping and step < steps:
                    close_logs(run)
                    raise TrainingInterrupted(step, saved)
    return finish(run)


# ---------------------------------------------------------------------------------------
# Preparing the run

def prepare_run(recipe: Recipe, recipe_text: str, overwrite: bool, resume: str | bool, console: Console,
                dist: DistributedContext, device: torch.device) -> Run:
    """Checks, data, model, run directory, optimizer, the resumed state and the logs: all before step 1."""
    run_dir, checkpoint, rows, data_digest, eval_rows = check_before_loading(recipe, overwrite, resume)
    grader = load_reward(recipe.reward.grader, recipe.reward.graders, get_grader)
    loaded = load_policy(recipe.model, recipe.lora, recipe.run.seed, device, console)
    budget = prompt_token_budget(loaded.model, loaded.tokenizer, recipe.generation.max_new_tokens)  # a 100 KB question is skipped, not run out of memory on
    rows = drop_overlong(rows, loaded.tokenizer, recipe.data, budget, "the training data")
    eval_rows = drop_overlong(eval_rows, loaded.tokenizer, recipe.data, budget, "the held-out data")
    engine = pick_engine(loaded.model, recipe.generation.engine)
    dist.seed_sampling(recipe.run.seed)  # after the LoRA init, which is the same on every rank
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    print_header(console, recipe, loaded, trainable, len(rows), run_dir)
    optimizer = make_optimizer(trainable, recipe.train)
    scheduler = make_scheduler(optimizer, recipe.train, optimizer_steps(recipe))
    run = Run(
        recipe, console, dist, run_dir, loaded, engine, grader, data_digest, eval_rows, trainable, optimizer, scheduler,
        sampler=PromptSampler(rows, recipe.run.seed),
        shuffle=torch.Generator().manual_seed(recipe.run.seed),
        baselines=PromptBaselines() if recipe.algorithm.kalman.scope == "prompt" else None,
    )
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint)  # in memory: a checkpoint refused here leaves the run directory as it was
    dist.broadcast_parameters(trainable)
    dist.barrier()  # every rank has checked the run directory and read its checkpoint before rank 0 writes
    if dist.is_main:
        with writing(run, f"the run directory '{run_dir}'"):
            write_run_files(run_dir, recipe, recipe_text, loaded, engine, dist.world_size, fresh=checkpoint is None)
            if checkpoint is not None:
                continue_timeline(run, checkpoint)
            run.metrics_log = MetricsLogger(run_dir, recipe, run.first_step)  # creates metrics.jsonl (append mode)
            run.samples_log = JsonlWriter(run_dir / SAMPLES)
        run.reward_history = logged_rewards(run_dir)
    dist.barrier()  # rank 0 has set aside an abandoned timeline's checkpoints
    return run


def check_before_loading(recipe: Recipe, overwrite: bool, resume: str | bool) -> tuple:
    """Everything a user can get wrong, before the model loads and the run directory is written.

    Returns (run directory, checkpoint to resume or None, training rows, their digest, eval rows).
    """
    opt = recipe.train
    run_dir = check_run_dir(recipe, overwrite, bool(resume))
    check_writable(run_dir, "run directory")
    checkpoint = summary = None
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
    seed_everything(recipe.run.seed)
    check_logging_backends(recipe.output.log_to)
    check_optimizer(opt.optimizer)
    rows = load_rows(recipe.data, "train")
    data_digest = rows_digest(rows)  # the sampler's saved order indexes these rows: a resume needs the same
    if summary is not None and summary["data_digest"] not in (None, data_digest):
        raise CheckpointError(  # (a checkpoint written before krpo kept the digest has None: not checked)
            f"the training data differs from the data of the checkpoint '{checkpoint}' (a changed file, or "
            "another krpo version's reading of it); the run continues only on the rows it was trained on: restore "
            "them and resume, or train on the new data as a new run (another run.name)"
        )
    eval_rows = load_rows(recipe.data, "test")[: recipe.eval.size] if recipe.eval.every else []
    return run_dir, checkpoint, rows, data_digest, eval_rows


def write_run_files(run_dir: Path, recipe: Recipe, recipe_text: str, loaded: LoadedModel, engine: str,
                    processes: int, fresh: bool) -> None:
    """A new run's directory (a resumed one keeps its own), the resolved recipe and run_info.json."""
    if fresh:
        prepare_run_dir(run_dir, recipe, recipe_text)
    else:
        save_resolved_recipe(run_dir, recipe)
    run_info = {"quantization": loaded.quantization, "dtype": str(loaded.dtype).removeprefix("torch."),
                "device": loaded.device.type, "model_path": loaded.path, "generation_engine": engine,
                "processes": processes}
    write_run_info(run_dir, run_info)


def print_header(console: Console, recipe: Recipe, loaded: LoadedModel, trainable: list, num_rows: int, run_dir: Path) -> None:
    num_trainable = sum(p.numel() for p in trainable)
    console.print(
        f"[bold]krpo train[/] · {recipe.algorithm.advantage.upper()} · model {escape(recipe.model.name_or_path)} "
        f"({loaded.quantization}, {str(loaded.dtype).removeprefix('torch.')}, {loaded.device.type}) · "
        f"LoRA r={recipe.lora.r}, {num_trainable:,} trainable parameters · {counted(num_rows, 'training row')} · "
        f"run dir {escape(str(run_dir))}",
        highlight=False,
        soft_wrap=True,  # a log line keeps its paths whole, whatever the width
    )


def restore_checkpoint(run: Run, checkpoint: Path) -> None:
    """Adapter, optimizer, scheduler, sampler, generators and baselines as they were after the checkpoint's
    step. Reads only: the run directory is changed by `continue_timeline`, once every check has passed."""
    state = load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler)
    try:
        run.sampler.load_state(state["sampler"])
        run.shuffle.set_state(state["shuffle"])
        set_rng_state(state["rng"])
        if run.baselines is not None:
            run.baselines.load_state(state["prompt_baselines"])
        run.dist.restore_rng(state, run.recipe.run.seed, state["step"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        what = f"has no {err.args[0]!r} entry" if isinstance(err, KeyError) else f"holds a damaged state ({type(err).__name__})"
        raise CheckpointError(
            f"'{checkpoint / 'trainer_state.pt'}' {what}; resume from an older checkpoint with --resume-from PATH"
        ) from None
    run.first_step = state["step"] + 1


def continue_timeline(run: Run, checkpoint: Path) -> None:
    """The run directory made consistent with the resumed checkpoint (rank 0): partial checkpoints removed,
    a later timeline's checkpoints and adapter set aside, the logs cut back to the checkpoint's step."""
    step, run_dir = run.first_step - 1, run.run_dir
    remove_partial_checkpoints(run_dir)
    aside = set_aside_later_checkpoints(run_dir, step, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    notes = [truncate_jsonl(run_dir / name, step, cut_to=aside / name if aside else None) for name in (METRICS, SAMPLES)]
    run.console.print(f"resumed from {checkpoint} (step {step} done)", highlight=False, markup=False, soft_wrap=True)
    if aside is not None:
        later = ", ".join(sorted(p.name for p in aside.iterdir() if p.is_dir()))
        run.console.print(
            f"the steps after {step} are abandoned: {later} and their log lines moved to {aside} (nothing deleted)",
            highlight=False, markup=False, soft_wrap=True,
        )
    for note in filter(None, notes):
        run.console.print(note, highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------
# One step: rollout, update, metrics

def collect_rollout(run: Run) -> Batch:
    """ROLLOUT: one batched generation for all prompts × G samples; REWARD: the grader that evaluation
    uses; ADVANTAGE: per prompt, in sampled order."""
    cfg, alg, gen, dist = run.recipe, run.recipe.algorithm, run.recipe.generation, run.dist
    global_rows = run.sampler.next_batch(cfg.train.prompts_per_step)
    rows = dist.shard(global_rows)  # this rank's whole prompts
    prompts = [row_prompt(run.loaded.tokenizer, cfg.data, row) for row in rows]
    rollout = generate_rollout(
        run.model, run.loaded.tokenizer, prompts, alg.group_size, gen.max_new_tokens,
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, batch_size=gen.batch_size,
        min_new_tokens=gen.min_new_tokens, engine=run.engine,
    )
    answers = [row["answer"] for row in rows for _ in range(alg.group_size)]
    grades = [run.grader(text, answer) for text, answer in zip(rollout.completions, answers)]
    rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
    correct = torch.tensor([g.correct for g in grades], dtype=torch.float64)
    formatted = torch.tensor([g.formatted for g in grades], dtype=torch.float64)
    lengths = rollout.completion_mask.sum(dim=1).float()
    part_names = getattr(run.grader, "names", [])  # reward.graders: each grader's own rewards, logged apart
    parts = [torch.tensor([g.parts[k] for g in grades], dtype=torch.float32) for k in range(len(part_names))]
    if cfg.reward.overlong_buffer:  # the length penalty, from token counts: added with weight 1, logged apart
        penalty = [soft_overlong_penalty(int(n), gen.max_new_tokens, cfg.reward.overlong_buffer) for n in lengths]
        penalty = torch.tensor(penalty, dtype=torch.float32)
        rewards, part_names, parts = rewards + penalty, [*part_names, "soft_overlong"], [*parts, penalty]
    # Every rank gets every rank's figures: advantages and metrics are those of the global batch.
    rewards, correct, formatted, lengths, *parts = dist.gather_rows(rewards, correct, formatted, lengths, *parts)
    groups = rewards.view(cfg.train.prompts_per_step, alg.group_size)
    # The whole batch on every rank: the same generator draws everywhere.
    kalman = alg.kalman.model_dump(exclude={"scope"})
    if run.baselines is not None:  # kalman.scope: prompt — a prompt's filter goes on from its last visit
        questions = [row["question"] for row in global_rows]
        all_advantages = run.baselines.advantages(groups, questions, generator=run.shuffle, **kalman)
    else:
        all_advantages = compute_advantages(groups, alg.advantage, run.shuffle, grpo_eps=alg.grpo_eps, **kalman)
    all_advantages = all_advantages.flatten()
    advantages = all_advantages[dist.local_slice(cfg.rollout_size)].to(run.loaded.device)
    (ends_with_eos,) = dist.gather_rows(rollout.ends_with_eos)
    return Batch(rows, rollout, grades, rewards, correct, formatted, lengths, groups, all_advantages, advantages,
                 dict(zip(part_names, parts)), ends_with_eos)


def grader_metrics(reward_parts: dict[str, torch.Tensor]) -> dict:
    """`rewards/<grader>/mean` and `/std` (sample std over the step's completions, as TRL) of each grader's own, unweighted
    rewards under reward.graders, named as TRL names them, and of the length penalty (reward.overlong_buffer)."""
    metrics = {}
    for name, values in reward_parts.items():
        metrics[f"rewards/{name}/mean"] = float(values.mean())
        metrics[f"rewards/{name}/std"] = float(values.std()) if len(values) > 1 else 0.0
    return metrics


def step_metrics(run: Run, batch: Batch, update: UpdateStats, step: int, step_lr: float, step_started: float) -> dict:
    """The step's line of metrics.jsonl (without the held-out evaluation)."""
    dist, rewards, groups, advantages = run.dist, batch.rewards, batch.groups, batch.all_advantages
    (generated_tokens,) = dist.reduce_floats([batch.rollout.num_generated_tokens], "sum")
    (rollout_seconds,) = dist.reduce_floats([batch.rollout.seconds], "max")  # the slowest rank's
    trained, clipped_low, clipped_high = dist.reduce_floats([update.loss_tokens, update.clipped_low, update.clipped_high])
    entropy_sum, entropy_tokens = dist.reduce_floats([update.entropy_sum, update.entropy_tokens])
    now = time.perf_counter()
    return {
        "step": step,
        "reward_mean": float(rewards.mean()),
        "reward_std": group_reward_std(groups),
        "reward_std_batch": batch_reward_std(rewards),
        **grader_metrics(batch.reward_parts),
        "correct_frac": statistics.fmean(batch.correct.tolist()),
        "format_frac": statistics.fmean(batch.formatted.tolist()),
        "frac_zero_std": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
        "advantage_mean": float(advantages.mean()),
        "advantage_abs_max": float(advantages.abs().max()),
        "loss": statistics.fmean(update.losses) if update.losses else float("nan"),
        "kl": dist.global_mean(update.kls) if trained else float("nan"),
        "clip_frac": dist.global_mean(update.clip_fracs) if trained else float("nan"),
        **clip_ratios(clipped_low, clipped_high, trained),
        "entropy": mean_entropy(entropy_sum, entropy_tokens),
        "grad_norm": statistics.fmean(update.grad_norms) if update.grad_norms else float("nan"),
        "skipped_updates": update.skipped,
        **length_stats(batch.lengths),
        "clipped_ratio": truncated_fraction(batch.ends_with_eos),
        "tokens_per_s": generated_tokens / max(rollout_seconds, 1e-9),
        "rollout_seconds": rollout_seconds,
        "update_seconds": now - update.started,
        "step_seconds": now - step_started,
        "lr": step_lr,
    }


def log_step(run: Run, batch: Batch, metrics: dict) -> None:
    """LOG: the held-out evaluation when due, then metrics.jsonl and samples.jsonl (rank 0)."""
    cfg, step = run.recipe, metrics["step"]
    if run.dist.is_main and run.eval_rows and (step % cfg.eval.every == 0 or step == cfg.train.steps):
        # The same evaluation as `krpo eval`, on a fixed held-out subset (greedy: no RNG draws).
        report = evaluate_model(run.model, run.loaded.tokenizer, run.eval_rows, cfg, batch_size=cfg.eval.batch_size)
        metrics["eval/accuracy"] = report.metrics["accuracy"]
        metrics["eval/mean_reward"] = report.metrics["mean_reward"]
    if run.dist.is_main:
        run.metrics_log.write(metrics)
        for i in range(min(cfg.output.samples_per_step, len(batch.rows))):
            j = i * cfg.algorithm.group_size  # the first completion of each of the first prompts (rank 0's)
            run.samples_log.write(
                {
                    "step": step,
                    "question": batch.rows[i]["question"],
                    "answer": batch.rows[i]["answer"],
                    "completion": batch.rollout.completions[j],
                    "reward": batch.grades[j].reward,
                }
            )
    run.reward_history.append(metrics["reward_mean"])


# ---------------------------------------------------------------------------------------
# Checkpoints and the end of the run

def checkpoint_due(run: Run, step: int, last_save: float) -> bool:
    """A checkpoint after `step`: every output.save_every steps, after the last step, and when
    output.save_every_minutes have passed since the last one (`last_save`, time.monotonic()).

    Rank 0's clock decides and every rank gets its answer, so all ranks save at the same step.
    """
    output = run.recipe.output
    if step % output.save_every == 0 or step == run.recipe.train.steps:
        return True
    if not output.save_every_minutes:
        return False
    late = time.monotonic() - last_save >= 60 * output.save_every_minutes
    return run.dist.any(run.dist.is_main and late)


def save_step(run: Run, step: int) -> Path:
    """A checkpoint after `step` (written by rank 0; every rank returns its path)."""
    dist = run.dist
    trainer_state = {"step": step, "sampler": run.sampler.state(), "shuffle": run.shuffle.get_state(),
                     "data_digest": run.data_digest}
    if run.baselines is not None:
        trainer_state["prompt_baselines"] = run.baselines.state()
    trainer_state.update(dist.gather_rng_states())  # every rank's own sampling RNG (distributed only)
    saved = failure = None
    if dist.is_main:
        try:
            saved = save_checkpoint(run.run_dir, step, run.model, run.optimizer, run.scheduler, trainer_state,
                                    run.recipe.output.keep_checkpoints)
        except OSError as err:
            failure = err
    if dist.any(failure is not None):  # every rank stops when rank 0 could not write (instead of waiting for it)
        raise failure or OSError(errno.EIO, "rank 0 could not write it")
    return saved if dist.is_main else list_checkpoints(run.run_dir)[-1]


@contextmanager
def writing(run: Run, what: str):
    """An OSError while writing `what` (a full disk, a read-only folder) ends the run with one line that
    says what failed and which checkpoint is safe to resume from."""
    try:
        yield
    except OSError as err:
        found = list_checkpoints(run.run_dir)
        safe = (f"the last good checkpoint is {found[-1]}; free space or fix the folder, then resume with --resume"
                if found else "no checkpoint was written yet")
        raise WriteFailure(f"cannot write {what}: {err.strerror or err}; {safe}") from None


def save_final_adapter(model, run_dir: Path) -> None:
    """RUN/adapter, written beside it and renamed into place: a failed write leaves no half adapter."""
    staging = run_dir / f".tmp-{ADAPTER}-{os.getpid()}"
    try:
        save_adapter(model, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if (run_dir / ADAPTER).exists():
        shutil.rmtree(run_dir / ADAPTER)
    staging.rename(run_dir / ADAPTER)


def close_logs(run: Run) -> None:
    if run.dist.is_main:
        run.metrics_log.close()
        run.samples_log.close()


def finish(run: Run) -> Path:
    """Save the adapter and print the summary; returns the run directory."""
    dist, run_dir, steps = run.dist, run.run_dir, run.recipe.train.steps
    digests = dist.check_in_sync(adapter_state(run.model)) if dist.is_distributed else []
    if dist.is_main:
        with writing(run, f"the adapter '{run_dir / ADAPTER}'"):
            close_logs(run)
            save_final_adapter(run.model, run_dir)
    dist.close()  # a barrier: when any rank returns, the adapter is written
    if not dist.is_main:
        return run_dir
    if digests:
        run.console.print(f"adapter sha256 by rank: {' '.join(digests)} (identical)", highlight=False, soft_wrap=True)
    first, last = quarter_means(run.reward_history)
    run.console.print(
        f"done: {counted(steps, 'step')} · mean reward first quarter {first:.3f} → last quarter {last:.3f} · "
        f"adapter saved to {run_dir / ADAPTER}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return run_dir
