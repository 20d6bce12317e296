"""Benchmark: one training step of `krpo train` against TRL's GRPOTrainer, same work.

    python bench/train_step.py [--rounds 2] [--steps 3] [--completion-tokens 128] [--json bench/train_step.json]

Both train LoRA (r 16, α 32, all linear layers) on the embedded SmolLM2-135M-Instruct in
float32 on the CPU, on the quickstart's questions, with 2 prompts × 8 completions per step,
every completion forced to the same length (min = max new tokens), β = 0.01, one optimizer step
per generation batch, and per-sequence loss aggregation (TRL: loss_type="grpo",
scale_rewards="group"). Each framework runs in its own process (so peak RSS is its own),
alternating for several rounds; the first step of every round is a warm-up and is dropped.
Prints median seconds per step, completions/s and peak RSS side by side, with ratios.

krpo runs twice per round: with GRPO's advantage (what TRL computes; the comparison with TRL)
and with the Kalman filter (KRPO), otherwise identical, to show the filter's cost per step;
the two estimators are also timed alone on one step's rewards.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = "Answer with just the number."
GROUP, PROMPTS, LR, BETA, RANK = 8, 2, 3e-4, 0.01, 16
# krpo with GRPO's advantage (the configuration TRL runs), krpo with the Kalman filter, TRL.
KINDS = ["krpo", "krpo-kalman", "trl"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_krpo(steps: int, tokens: int, advantage: str = "grpo") -> list[float]:
    from krpo_cli.config import Recipe
    from krpo_cli.train import train

    out = Path(tempfile.mkdtemp())
    recipe = Recipe.model_validate({
        "run": {"name": "bench", "output_dir": str(out), "seed": 42},
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        "lora": {"r": RANK, "alpha": 2 * RANK},
        "data": {"source": "digits", "system_prompt": SYSTEM, "prompt_template": "What is {question}?"},
        "reward": {"grader": "last_number"},
        "algorithm": {"advantage": advantage, "group_size": GROUP, "kl_beta": BETA},
        "generation": {"max_new_tokens": tokens, "min_new_tokens": tokens},
        "train": {"steps": steps, "prompts_per_step": PROMPTS, "minibatch_size": GROUP * PROMPTS, "learning_rate": LR},
        "output": {"save_every": 10_000, "samples_per_step": 0},
    })
    from rich.console import Console

    run_dir = train(recipe, console=Console(quiet=True))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["step_seconds"] for line in lines]


def run_trl(steps: int, tokens: int) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from krpo_cli.data import digit_problems
    from krpo_cli.models import load_tokenizer, quiet_libraries, resolve_model_path
    from krpo_cli.rewards import grade_last_number

    quiet_libraries()
    path = resolve_model_path("smollm2-135m-instruct")
    rows = [
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {r['question']}?"}],
         "answer": r["answer"]}
        for r in digit_problems()[50:]
    ]

    def reward(completions, answer, **_):
        return [grade_last_number(c[0]["content"], a).reward for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GROUP * PROMPTS, num_generations=GROUP,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=tokens,
        generation_kwargs={"min_new_tokens": tokens}, temperature=1.0, top_k=0, top_p=1.0,
        beta=BETA, loss_type="grpo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant", max_steps=steps,
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=42,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def worker(kind: str, steps: int, tokens: int) -> None:
    if kind == "trl":
        times = run_trl(steps, tokens)
    else:
        times = run_krpo(steps, tokens, advantage="krpo" if kind == "krpo-kalman" else "grpo")
    print(json.dumps({"kind": kind, "step_seconds": times, "peak_rss_mib": peak_rss_mib()}))


def estimator_seconds(advantage: str, calls: int = 2000) -> float:
    """Median seconds of one advantage computation for a step's rewards (PROMPTS groups of GROUP)."""
    import torch

    from krpo_cli.advantages import compute_advantages

    rewards = (torch.rand(PROMPTS, GROUP, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    shuffle = torch.Generator().manual_seed(0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        compute_advantages(rewards, advantage, shuffle)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and framework; the first is warm-up")
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--json", default="bench/train_step.json")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.completion_tokens)

    results = {kind: {"times": [], "rss": []} for kind in KINDS}
    for round_ in range(args.rounds):
        for kind in KINDS[round_ % 3 :] + KINDS[: round_ % 3]:  # rotate the order every round
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
                   "--completion-tokens", str(args.completion_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            results[kind]["times"] += record["step_seconds"][1:]  # drop the warm-up step
            results[kind]["rss"].append(record["peak_rss_mib"])
            print(f"round {round_ + 1}: {kind:4s} steps {[round(t, 2) for t in record['step_seconds']]} "
                  f"peak RSS {record['peak_rss_mib']:.0f} MiB", flush=True)

    completions = GROUP * PROMPTS
    summary: dict = {}
    for kind, r in results.items():
        median = statistics.median(r["times"])
        summary[kind] = {"median_step_s": median, "completions_per_s": completions / median,
                         "peak_rss_mib": max(r["rss"]), "steps_measured": len(r["times"])}
    k, t, kk = summary["krpo"], summary["trl"], summary["krpo-kalman"]
    print(f"\n{'':22}{'krpo':>10}{'TRL':>10}{'ratio':>10}")
    print(f"{'median s/step':22}{k['median_step_s']:>10.2f}{t['median_step_s']:>10.2f}{t['median_step_s'] / k['median_step_s']:>9.2f}×")
    print(f"{'completions/s':22}{k['completions_per_s']:>10.2f}{t['completions_per_s']:>10.2f}{k['completions_per_s'] / t['completions_per_s']:>9.2f}×")
    print(f"{'peak RSS (MiB)':22}{k['peak_rss_mib']:>10.0f}{t['peak_rss_mib']:>10.0f}{k['peak_rss_mib'] / t['peak_rss_mib']:>9.2f}×")
    kalman_s, grpo_s = estimator_seconds("krpo"), estimator_seconds("grpo")
    summary["estimators"] = {"krpo_seconds": kalman_s, "grpo_seconds": grpo_s,
                             "overhead_fraction_of_step": (kalman_s - grpo_s) / k["median_step_s"]}
    print(f"\nKRPO vs GRPO (same krpo loop): median s/step {kk['median_step_s']:.2f} vs {k['median_step_s']:.2f} "
          f"({kk['median_step_s'] / k['median_step_s'] - 1:+.1%}); the estimators alone: "
          f"{kalman_s * 1e6:.0f} µs vs {grpo_s * 1e6:.0f} µs per step "
          f"({(kalman_s - grpo_s) / k['median_step_s']:+.4%} of a step)")
    settings = {"group": GROUP, "prompts": PROMPTS, "completion_tokens": args.completion_tokens, "lora_r": RANK,
                "beta": BETA, "dtype": "float32", "device": "cpu", "rounds": args.rounds, "steps_per_round": args.steps}
    Path(args.json).write_text(json.dumps({"settings": settings, "summary": summary, "raw": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
