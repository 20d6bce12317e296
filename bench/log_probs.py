"""Benchmark: the loss's log-prob passes with each prompt read once per group, against every row in full.

    python bench/log_probs.py [--repeats 7] [--json bench/log_probs.json]

Model: the embedded SmolLM2-135M-Instruct with a fresh LoRA adapter (r 16, all linear layers),
float32 on a CPU. Two shapes, each from a real rollout of the quickstart's prompts:

- "quickstart": 4 prompts × 8 samples, up to 16 new tokens (the quickstart recipe's step);
- "train_step": 2 prompts × 8 samples, 128 forced tokens (bench/train_step.py's step).

For each, in micro-batches as `krpo train` makes them (CPU token budget, rows sorted by
prompt), it times the reference pass (no gradient, adapter off) and the update's forward and
backward, with `shared_prompt_log_probs` and with the model's own forward over every row,
alternating, and prints the medians side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench/log_probs.json")
    args = parser.parse_args()

    from krpo_cli import log_probs as lp
    from krpo_cli import rollout
    from krpo_cli.config import Recipe
    from krpo_cli.data import build_prompt, digit_problems
    from krpo_cli.models import load_policy, quiet_libraries
    from krpo_cli.update import auto_micro_batch

    quiet_libraries()
    recipe = Recipe.model_validate({
        "run": {"name": "bench", "seed": 42},
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32},
        "data": {"source": "digits", "system_prompt": "Answer with just the number.", "prompt_template": "What is {question}?"},
    })
    loaded = load_policy(recipe.model, recipe.lora, seed=42, device=torch.device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    shapes = {"quickstart": (4, 16, None), "train_step": (2, 128, 128)}
    model_forward = lp.shares_prompts
    results = []
    print(f"{'shape':<11} {'rows×len':>9} {'micro':>5} | {'ref shared':>10} {'ref full':>8} {'ratio':>5} | "
          f"{'upd shared':>10} {'upd full':>8} {'ratio':>5}")
    for name, (prompt_count, new_tokens, forced) in shapes.items():
        prompts = [build_prompt(tokenizer, recipe.data, row["question"]) for row in digit_problems()[50 : 50 + prompt_count]]
        torch.manual_seed(0)
        batch = rollout.generate_rollout(model, tokenizer, prompts, 8, new_tokens, min_new_tokens=forced)
        rows = batch.sequences.shape[0]
        micro = auto_micro_batch(rows, batch.sequences.shape[1], torch.device("cpu"))
        parts = [slice(start, start + micro) for start in range(0, rows, micro)]

        def passes(shared: bool) -> tuple[float, float]:
            lp.shares_prompts = (lambda m: model_forward(m)) if shared else (lambda m: False)
            start = time.perf_counter()
            with torch.no_grad(), model.disable_adapter():
                for part in parts:
                    lp.completion_log_probs(model, batch.sequences[part], batch.attention_mask[part], batch.prompt_length)
            middle = time.perf_counter()
            model.train()
            for part in parts:
                log_probs = lp.completion_log_probs(
                    model, batch.sequences[part], batch.attention_mask[part], batch.prompt_length
                )
                log_probs.sum().backward()
            model.eval()
            model.zero_grad(set_to_none=True)
            return middle - start, time.perf_counter() - middle

        passes(True), passes(False)  # warm-up
        timings = {True: [], False: []}
        for _ in range(args.repeats):
            for shared in (True, False):
                timings[shared].append(passes(shared))
        lp.shares_prompts = model_forward
        med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in timings.items()}
        row = {
            "shape": name, "rows": rows, "sequence_length": batch.sequences.shape[1], "micro_batch": micro,
            "completion_tokens": batch.num_generated_tokens,
            "ref_shared_s": med[True][0], "ref_full_s": med[False][0],
            "update_shared_s": med[True][1], "update_full_s": med[False][1],
        }
        results.append(row)
        print(f"{name:<11} {rows:>4}×{batch.sequences.shape[1]:<4} {micro:>5} | {med[True][0]:>10.2f} {med[False][0]:>8.2f} "
              f"{med[False][0] / med[True][0]:>4.2f}× | {med[True][1]:>10.2f} {med[False][1]:>8.2f} "
              f"{med[False][1] / med[True][1]:>4.2f}×")
    settings = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
