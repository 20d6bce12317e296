"""Benchmark: one training step of `krpo train` against TRL's GRPOTrainer, same work.

    python bench/train_step.py [--rounds 2] [--steps 3] [--completion-tokens 128] [--json bench/train_step.json]
    python bench/train_step.py --dtype bfloat16                   # both in bf16 (CPUs with native bf16)
    python bench/train_step.py --model /tmp/qwen0.5b-random       # on a GPU (see bench/device/)

Both train LoRA (r 16, α 32, all linear layers) on the same base model (default: the embedded
SmolLM2-135M-Instruct) on the quickstart's questions, every completion forced to the same length
(min = max new tokens), β = 0.01, one optimizer step per generation batch, and per-sequence loss
aggregation (TRL: loss_type="grpo", scale_rewards="group"). TRL keeps its default gradient
checkpointing (slower, lighter) unless `--trl-no-checkpointing`. On a CPU: float32 weights (or
`--dtype bfloat16`, the model loaded in bf16 by both), 2 prompts × 8 completions per step. On
CUDA: the NF4 base both frameworks load the same way (krpo's loader, bf16 compute), 8 prompts
× 12 completions. Each framework runs in its own process (so its peak memory is its own: RSS on
a CPU, allocated VRAM on CUDA), alternating for several rounds; the first step of every round
is a warm-up and is dropped. Prints median seconds per step, completions/s and peak memory side
by side, with ratios.

krpo runs twice per round: with GRPO's advantage (what TRL computes; the comparison with TRL)
and with the Kalman filter (KRPO), otherwise identical, to show the filter's cost per step;
the two estimators are also timed alone on one step's rewards. On CUDA krpo runs a third time
with `generation.engine: krpo` (its own decoder; "auto" keeps HF `generate` there).
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
LR, BETA, RANK = 3e-4, 0.01, 16
EMBEDDED = "smollm2-135m-instruct"
# krpo with GRPO's advantage (the configuration TRL runs), krpo with the Kalman filter, TRL;
# on CUDA also krpo with its own decoder.
KINDS = ["krpo", "krpo-kalman", "trl"]
CUDA_KINDS = KINDS + ["krpo-decoder"]


def device_settings(device: str, cpu_dtype: str = "float32") -> dict:
    """dtype, quantization and default shape per device (the benchmark's CPU and GPU workloads)."""
    if device == "cuda":
        return {"dtype": "bfloat16", "quantization": "nf4", "prompts": 8, "group": 12}
    return {"dtype": cpu_dtype, "quantization": "none", "prompts": 2, "group": 8}


def peak_memory_mib(device: str) -> dict:
    """Peak RSS of this process, and on CUDA the peak VRAM torch allocated."""
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        peak["vram_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def krpo_recipe(args, advantage: str, engine: str, output_dir: Path, name: str = "bench"):
    """The recipe krpo runs in these benchmarks: args' model, device, shape and step count."""
    from krpo_cli.config import Recipe

    settings = device_settings(args.device, args.dtype)
    return Recipe.model_validate({
        "run": {"name": name, "output_dir": str(output_dir), "seed": 42},
        "model": {"name_or_path": args.model, "dtype": settings["dtype"], "quantization": settings["quantization"]},
        "lora": {"r": RANK, "alpha": 2 * RANK},
        "data": {"source": "digits", "system_prompt": SYSTEM, "prompt_template": "What is {question}?"},
        "reward": {"grader": "last_number"},
        "algorithm": {"advantage": advantage, "group_size": args.group, "kl_beta": BETA},
        "generation": {"max_new_tokens": args.completion_tokens, "min_new_tokens": args.completion_tokens,
                       "engine": engine},
        "train": {"steps": args.steps, "prompts_per_step": args.prompts, "minibatch_size": args.group * args.prompts,
                  "learning_rate": LR},
        "output": {"save_every": 10_000, "samples_per_step": 0},
    })


def run_krpo(args, advantage: str = "grpo", engine: str = "auto", output_dir: Path | None = None,
             name: str = "bench") -> list[float]:
    """`krpo train` on the benchmark's recipe; its steps' seconds."""
    import torch
    from rich.console import Console

    from krpo_cli.train import train

    recipe = krpo_recipe(args, advantage, engine, output_dir or Path(tempfile.mkdtemp()), name)
    run_dir = train(recipe, console=Console(quiet=True), device=torch.device(args.device))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["step_seconds"] for line in lines]


def run_trl(args) -> list[float]:
    from krpo_cli.models import load_base, quiet_libraries

    quiet_libraries()  # before peft is imported
    import torch
    from trl import GRPOConfig

    from krpo_cli.data import digit_problems

    settings = device_settings(args.device, args.dtype)
    rows = [
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {r['question']}?"}],
         "answer": r["answer"]}
        for r in digit_problems()[50:]
    ]

    completions = args.group * args.prompts
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=completions, num_generations=args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=args.completion_tokens,
        generation_kwargs={"min_new_tokens": args.completion_tokens}, temperature=1.0, top_k=0, top_p=1.0,
        beta=BETA, loss_type="grpo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant",
        max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=args.device == "cpu",
        bf16=settings["dtype"] == "bfloat16", save_strategy="no", seed=42, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=not args.trl_no_checkpointing,  # TRL's default is on; krpo's is off
    )
    # The same base model krpo trains: krpo's own loader (NF4 with double quantization on CUDA).
    base = load_base(args.model, settings["quantization"], settings["dtype"], torch.device(args.device))
    return train_with_trl(base, rows, config)


def train_with_trl(base, rows: list[dict], config) -> list[float]:
    """TRL's GRPOTrainer with LoRA (r RANK, all linear layers) on `base` (krpo's LoadedModel), the
    reward krpo's `last_number` grader on each row's "answer"; the seconds of each training step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from krpo_cli.rewards import grade_last_number

    def reward(completions, answer, **_):
        return [grade_last_number(c[0]["content"], a).reward for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):  # called before the trainer saves a checkpoint
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a step's kernels may still be queued
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = GRPOTrainer(
        model=base.model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=base.tokenizer,
        peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def worker(args) -> None:
    kind = args.worker
    if kind == "trl":
        times = run_trl(args)
    else:
        times = run_krpo(args, advantage="krpo" if kind == "krpo-kalman" else "grpo",
                         engine="krpo" if kind == "krpo-decoder" else "auto")
    print(json.dumps({"kind": kind, "step_seconds": times, "peak": peak_memory_mib(args.device)}))


def print_comparison(summary: dict, memory_label: str, memory_key: str) -> None:
    """krpo against TRL side by side (and krpo's own decoder, when it ran), for what finished."""
    k, t = summary.get("krpo"), summary.get("trl")
    if k is None or t is None:
        for kind, s in summary.items():
            print(f"{kind:22}{s['median_step_s']:>10.2f} s/step, {s[f'peak_{memory_key}']:.0f} MiB")
        return
    print(f"{'':22}{'krpo':>10}{'TRL':>10}{'ratio':>10}")
    print(f"{'median s/step':22}{k['median_step_s']:>10.2f}{t['median_step_s']:>10.2f}{t['median_step_s'] / k['median_step_s']:>9.2f}×")
    print(f"{'completions/s':22}{k['completions_per_s']:>10.2f}{t['completions_per_s']:>10.2f}{k['completions_per_s'] / t['completions_per_s']:>9.2f}×")
    km, tm = k[f"peak_{memory_key}"], t[f"peak_{memory_key}"]
    print(f"{memory_label:22}{km:>10.0f}{tm:>10.0f}{km / tm:>9.2f}×")
    if "krpo-decoder" in summary:
        d = summary["krpo-decoder"]
        print(f"{'krpo, own decoder':22}{d['median_step_s']:>10.2f} s/step ({t['median_step_s'] / d['median_step_s']:.2f}× TRL), "
              f"{d[f'peak_{memory_key}']:.0f} MiB")


def estimator_seconds(advantage: str, prompts: int, group: int, calls: int = 2000) -> float:
    """Median seconds of one advantage computation for a step's rewards (`prompts` groups of `group`)."""
    import torch

    from krpo_cli.advantages import compute_advantages

    rewards = (torch.rand(prompts, group, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    shuffle = torch.Generator().manual_seed(0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        compute_advantages(rewards, advantage, shuffle)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and step shape, shared with bench/krpo_overhead.py."""
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--model", default=EMBEDDED, help="model name or directory (default: the embedded model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--group", type=int, default=None, help="completions per prompt (default: 8 on CPU, 12 on CUDA)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and compute on a CPU (CUDA: NF4 weights, bfloat16 compute)")


def workload_argv(args) -> list[str]:
    """`args`' workload as command-line options again, for a worker process."""
    return ["--completion-tokens", str(args.completion_tokens), "--model", args.model, "--device", args.device,
            "--prompts", str(args.prompts), "--group", str(args.group), "--dtype", args.dtype]


def resolve_workload(args) -> dict:
    """Fills in the device and the per-device default shape; returns `device_settings`."""
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = device_settings(args.device, args.dtype)
    args.prompts = args.prompts or settings["prompts"]
    args.group = args.group or settings["group"]
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and framework; the first is warm-up")
    add_workload_arguments(parser)
    parser.add_argument("--trl-no-checkpointing", action="store_true",
                        help="TRL without gradient checkpointing (its default recomputes activations in backward)")
    parser.add_argument("--json", default="bench/train_step.json")
    parser.add_argument("--worker", choices=CUDA_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = resolve_workload(args)
    if args.worker:
        return worker(args)

    recorded = {"model": args.model, "group": args.group, "prompts": args.prompts,
                "completion_tokens": args.completion_tokens, "lora_r": RANK, "beta": BETA,
                "dtype": settings["dtype"], "quantization": settings["quantization"], "device": args.device,
                "rounds": args.rounds, "steps_per_round": args.steps,
                "trl_gradient_checkpointing": not args.trl_no_checkpointing}
    kinds = CUDA_KINDS if args.device == "cuda" else KINDS
    results = {kind: {"times": [], "peak": []} for kind in kinds}
    failed: set[str] = set()
    for round_ in range(args.rounds):
        shift = round_ % len(kinds)
        for kind in [k for k in kinds[shift:] + kinds[:shift] if k not in failed]:  # rotate the order every round
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), *workload_argv(args)]
            cmd += ["--trl-no-checkpointing"] if args.trl_no_checkpointing else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:  # report it and go on: the other frameworks' figures still count
                failed.add(kind)
                print(f"round {round_ + 1}: {kind} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
                continue
            record = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind]["times"] += record["step_seconds"][1:]  # drop the warm-up step
            results[kind]["peak"].append(record["peak"])
            memory = ", ".join(f"{k.removesuffix('_mib')} {v:.0f} MiB" for k, v in record["peak"].items())
            print(f"round {round_ + 1}: {kind:12s} steps {[round(t, 2) for t in record['step_seconds']]} "
                  f"peak {memory}", flush=True)
            # What has run so far, in case the run is cut short (the summary comes at the end).
            Path(args.json).write_text(json.dumps({"settings": recorded, "raw": results}, indent=2))

    completions = args.group * args.prompts
    summary: dict = {}
    for kind, r in results.items():
        if not r["times"]:
            continue
        median = statistics.median(r["times"])
        summary[kind] = {"median_step_s": median, "completions_per_s": completions / median,
                         "steps_measured": len(r["times"])}
        for key in r["peak"][0]:
            summary[kind][f"peak_{key}"] = max(p[key] for p in r["peak"])
    weights = "NF4 weights" if settings["quantization"] == "nf4" else "unquantized"
    print(f"\n{args.device} ({settings['dtype']}, {weights}), "
          f"{completions} completions × {args.completion_tokens} tokens per step")
    if failed:
        print(f"no figures for: {', '.join(sorted(failed))}")
    print_comparison(summary, "peak VRAM (MiB)" if args.device == "cuda" else "peak RSS (MiB)",
                     "vram_mib" if args.device == "cuda" else "rss_mib")
    if "krpo" in summary:
        k = summary["krpo"]
        kalman_s = estimator_seconds("krpo", args.prompts, args.group)
        grpo_s = estimator_seconds("grpo", args.prompts, args.group)
        summary["estimators"] = {"krpo_seconds": kalman_s, "grpo_seconds": grpo_s,
                                 "overhead_fraction_of_step": (kalman_s - grpo_s) / k["median_step_s"]}
        whole_step = ""
        if "krpo-kalman" in summary:
            kk = summary["krpo-kalman"]
            whole_step = (f"median s/step {kk['median_step_s']:.2f} vs {k['median_step_s']:.2f} "
                          f"({kk['median_step_s'] / k['median_step_s'] - 1:+.1%}); ")
        print(f"\nKRPO vs GRPO (same krpo loop): {whole_step}the estimators alone: "
              f"{kalman_s * 1e6:.0f} µs vs {grpo_s * 1e6:.0f} µs per step "
              f"({(kalman_s - grpo_s) / k['median_step_s']:+.4%} of a step)")
    Path(args.json).write_text(json.dumps({"settings": recorded, "summary": summary, "raw": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
