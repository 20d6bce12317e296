"""Benchmark: the race to a held-out accuracy, `krpo train` against TRL's GRPOTrainer, quickstart task.

    pip install -e ".[bench]"                               # trl 1.16
    python bench/race.py                                    # 3 seeds, target 0.5; writes bench/race.json
    python bench/race.py --seeds 4,5 --target 0.4 --json bench/race_more.json
    python bench/race.py --kalman                           # krpo with its Kalman filter raced too

Seconds per step are not what a user feels: they feel how long until the model is good. Both
frameworks start from the same point (the embedded SmolLM2-135M-Instruct, fresh LoRA r 16 / α 32 on
all linear layers) and train on the quickstart's 150 training questions with its system prompt,
question template and reward (`last_number`, the grader `krpo eval` scores with): 4 prompts × 8
completions per step, at most 16 new tokens at temperature 1, β 0.01, learning rate 2e-4 constant,
AdamW without weight decay, gradient norm clipped at 1, one optimizer step per generation batch,
per-sequence loss (TRL: loss_type="grpo", scale_rewards="group") and GRPO's advantage in both
(`--kalman` adds krpo with KRPO's). Each framework runs in its own process, with its own defaults
otherwise (krpo: its CPU decoder, no gradient checkpointing; TRL: HF `generate`, gradient
checkpointing on), and saves its adapter every `--every` steps.

The evaluation is done afterwards, outside the timed part, and the same way for both: every saved
adapter (and the base model, step 0) is scored greedily on the quickstart's 50 held-out questions by
krpo's own evaluation (what `krpo eval` runs). A framework's time to the target is the sum of its
training steps' seconds up to the first saved step whose held-out accuracy reaches `--target`; model
loading and checkpoint writing are not counted, for either. Prints every seed's figures, the medians,
and the ratio TRL / krpo of the median times; writes them all to `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_step import EMBEDDED, peak_memory_mib, train_with_trl

STEPS, EVERY, TARGET = 20, 2, 0.5
PROMPTS, GROUP, NEW_TOKENS, LR, BETA, RANK = 4, 8, 16, 2e-4, 0.01, 16
KINDS = {"krpo": "grpo", "krpo-kalman": "krpo"}  # krpo's kinds → algorithm.advantage; "trl" is the other


def quickstart_recipe(overrides: list[str]):
    """The quickstart recipe (prompt, data, reward) with the race's overrides."""
    from krpo_cli.recipe_loading import load_recipe

    return load_recipe("quickstart", overrides)


def race_overrides(advantage: str, seed: int, steps: int, every: int, out: Path) -> list[str]:
    """The quickstart recipe as raced: the shape above, a checkpoint every `every` steps, none dropped."""
    return [
        f"algorithm.advantage={advantage}", f"algorithm.group_size={GROUP}", f"algorithm.kl_beta={BETA}",
        f"lora.r={RANK}", f"lora.alpha={2 * RANK}", "lora.target_modules=all-linear",
        f"generation.max_new_tokens={NEW_TOKENS}", "generation.temperature=1.0",
        f"train.steps={steps}", f"train.prompts_per_step={PROMPTS}", f"train.minibatch_size={PROMPTS * GROUP}",
        f"train.learning_rate={LR}", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
        "eval.every=0", f"output.save_every={every}", f"output.keep_checkpoints={steps}",
        "output.save_every_minutes=10000", "output.samples_per_step=0",
        f"run.seed={seed}", f"run.output_dir={json.dumps(str(out))}", 'run.name="krpo"',
    ]


def train_krpo(advantage: str, seed: int, steps: int, every: int, out: Path) -> dict:
    """`krpo train` as raced; its steps' seconds and where each saved adapter is."""
    from rich.console import Console

    from krpo_cli.train import train

    recipe, text = quickstart_recipe(race_overrides(advantage, seed, steps, every, out))
    run_dir = train(recipe, text, console=Console(quiet=True))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adapters = {int(path.parent.name.removeprefix("step_")): str(path)
                for path in (run_dir / "checkpoints").glob("step_*/adapter")}
    return {"step_seconds": [record["step_seconds"] for record in records], "adapters": adapters}


def train_trl(seed: int, steps: int, every: int, out: Path, checkpointing: bool = True) -> dict:
    """TRL's GRPOTrainer as raced; its steps' seconds and where each saved adapter is."""
    from krpo_cli.models import load_base, quiet_libraries

    quiet_libraries()  # before peft is imported
    import torch
    from trl import GRPOConfig

    from krpo_cli.data import load_rows
    from krpo_cli.models import resolve_dtype

    recipe, _ = quickstart_recipe([])
    # The dtype krpo trains in here (float32 unless the CPU has native bf16). TRL's own default is
    # bf16=True, autocast to bf16, which on a CPU without native bf16 takes a path ~8× slower.
    dtype = resolve_dtype(recipe.model.dtype, torch.device("cpu"))
    template, system = recipe.data.prompt_template, recipe.data.system_prompt
    rows = [{"prompt": [{"role": "system", "content": system},
                        {"role": "user", "content": template.format(question=row["question"])}],
             "answer": row["answer"]} for row in load_rows(recipe.data, "train")]

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_k=0, top_p=1.0, beta=BETA, loss_type="grpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=every,
        save_only_model=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=checkpointing,  # TRL's default is on; krpo's is off
    )
    times = train_with_trl(load_base(EMBEDDED, recipe.model.quantization, dtype), rows, config)
    adapters = {int(path.name.removeprefix("checkpoint-")): str(path) for path in out.glob("checkpoint-*")}
    return {"step_seconds": times, "adapters": adapters}


def held_out_accuracy(adapters: dict[int, str]) -> dict[int, float]:
    """Greedy accuracy on the quickstart's held-out questions, by krpo's evaluation: the base model
    (step 0) and each saved adapter, each on a freshly loaded base."""
    from krpo_cli.data import load_rows
    from krpo_cli.evaluate import evaluate_model, load_adapter
    from krpo_cli.models import load_base

    recipe, _ = quickstart_recipe([])
    rows = load_rows(recipe.data, "test")
    accuracy = {}
    for step, adapter in sorted({0: None, **adapters}.items()):
        loaded = load_base(EMBEDDED, recipe.model.quantization, recipe.model.dtype)
        model = loaded.model if adapter is None else load_adapter(loaded.model, Path(adapter), EMBEDDED)
        model.eval()
        report = evaluate_model(model, loaded.tokenizer, rows, recipe, batch_size=len(rows))
        accuracy[step] = report.metrics["accuracy"]
    return accuracy


def time_to_target(step_seconds: list[float], accuracy: dict[int, float], target: float) -> tuple[int, float] | None:
    """The first evaluated step whose accuracy reaches `target`, and the training seconds up to it
    (steps 1..that step); None when no evaluated step reaches it."""
    for step in sorted(accuracy):
        if accuracy[step] >= target:
            return step, sum(step_seconds[:step])
    return None


def worker(args) -> None:
    out = Path(args.dir)
    started = time.perf_counter()
    if args.worker == "trl":
        trained = train_trl(args.seed, args.steps, args.every, out, not args.trl_no_checkpointing)
    else:
        trained = train_krpo(KINDS[args.worker], args.seed, args.steps, args.every, out)
    trained |= {"process_seconds": time.perf_counter() - started, "peak": peak_memory_mib("cpu")}
    print(json.dumps(trained))


def race_one(kind: str, seed: int, args, scratch: Path) -> dict:
    """Train `kind` with `seed` in its own process, then evaluate its adapters here."""
    folder = scratch / f"{kind}-seed{seed}"
    command = [sys.executable, __file__, "--worker", kind, "--seed", str(seed), "--dir", str(folder),
               "--steps", str(args.steps), "--every", str(args.every)]
    command += ["--trl-no-checkpointing"] if args.trl_no_checkpointing else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    accuracy = held_out_accuracy({int(step): path for step, path in trained["adapters"].items()})
    reached = time_to_target(trained["step_seconds"], accuracy, args.target)
    return {
        "step_seconds": trained["step_seconds"], "train_seconds": sum(trained["step_seconds"]),
        "process_seconds": trained["process_seconds"], "peak_rss_mib": trained["peak"]["rss_mib"],
        "accuracy_by_step": accuracy, "final_accuracy": accuracy[max(accuracy)],
        "target_step": reached[0] if reached else None, "seconds_to_target": reached[1] if reached else None,
    }


def summarize(runs: dict, target: float) -> dict:
    """Per kind: medians over seeds; the median time to the target is None when half the seeds or more
    never reach it."""
    summary = {}
    for kind, by_seed in runs.items():
        # A seed that never reaches the target counts as slower than any that does.
        times = [math.inf if r["seconds_to_target"] is None else r["seconds_to_target"] for r in by_seed.values()]
        median = statistics.median(times)
        summary[kind] = {
            "seeds": len(by_seed), "reached": sum(t != math.inf for t in times),
            "median_seconds_to_target": None if median == math.inf else median,
            "median_final_accuracy": statistics.median(r["final_accuracy"] for r in by_seed.values()),
            "median_step_seconds": statistics.median(s for r in by_seed.values() for s in r["step_seconds"]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in by_seed.values()),
        }
    return summary


def report(runs: dict, summary: dict, target: float) -> None:
    print(f"\nheld-out accuracy ≥ {target} (50 questions, greedy): training seconds to reach it, per seed")
    for kind, by_seed in runs.items():
        for seed, r in by_seed.items():
            when = (f"step {r['target_step']:>2} after {r['seconds_to_target']:6.1f} s" if r["target_step"] is not None
                    else "not reached")
            curve = " ".join(f"{step}:{acc:.2f}" for step, acc in sorted(r["accuracy_by_step"].items()))
            print(f"  {kind:12} seed {seed}: {when}; final {r['final_accuracy']:.2f}; {curve}")
    print(f"\n{'':26}" + "".join(f"{kind:>14}" for kind in summary))
    rows = [("seeds reaching target", "reached", "{:.0f}"), ("median s to target", "median_seconds_to_target", "{:.1f}"),
            ("median final accuracy", "median_final_accuracy", "{:.2f}"), ("median s/step", "median_step_seconds", "{:.2f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}")]
    for label, key, fmt in rows:
        cells = ["–" if s[key] is None else fmt.format(s[key]) for s in summary.values()]
        print(f"{label:26}" + "".join(f"{cell:>14}" for cell in cells))
    k, t = summary.get("krpo"), summary.get("trl")
    if k and t and k["median_seconds_to_target"] and t["median_seconds_to_target"] is not None:  # krpo > 0 s
        print(f"\nTRL / krpo, median time to {target}: {t['median_seconds_to_target'] / k['median_seconds_to_target']:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3", help="comma list (default 1,2,3)")
    parser.add_argument("--target", type=float, default=TARGET, help=f"held-out accuracy to reach (default {TARGET})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS}, the quickstart's)")
    parser.add_argument("--every", type=int, default=EVERY, help=f"save and evaluate every N steps (default {EVERY})")
    parser.add_argument("--kalman", action="store_true", help="also race krpo with KRPO's advantage")
    parser.add_argument("--trl-no-checkpointing", action="store_true",
                        help="TRL without gradient checkpointing (its default recomputes activations in backward)")
    parser.add_argument("--json", default="bench/race.json")
    parser.add_argument("--worker", choices=[*KINDS, "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    kinds = ["krpo", *(["krpo-kalman"] if args.kalman else []), "trl"]
    settings = {"seeds": seeds, "target": args.target, "trl_gradient_checkpointing": not args.trl_no_checkpointing, "steps": args.steps, "every": args.every, "prompts": PROMPTS,
                "group": GROUP, "max_new_tokens": NEW_TOKENS, "learning_rate": LR, "beta": BETA, "lora_r": RANK}
    runs: dict = {kind: {} for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="krpo-race-") as scratch:
        for index, seed in enumerate(seeds):
            order = kinds if index % 2 == 0 else kinds[::-1]  # alternate who runs first: drift cancels
            for kind in order:
                runs[kind][seed] = race_one(kind, seed, args, Path(scratch))
                r = runs[kind][seed]
                print(f"seed {seed} {kind:12} {r['train_seconds']:6.1f} s training, final {r['final_accuracy']:.2f}, "
                      f"target at step {r['target_step']}", flush=True)
                Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs}, indent=2))
    summary = summarize(runs, args.target)
    report(runs, summary, args.target)
    Path(args.json).write_text(json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
