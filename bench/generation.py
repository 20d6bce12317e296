"""Benchmark: decode speed of krpo's own decoder and of HF `generate`, beside the arithmetic floor.

    python bench/generation.py [--batches 12,48] [--tokens 32] [--json bench/generation.json]
    python bench/generation.py --model /tmp/qwen0.5b-random --quantization nf4   # on a GPU

Model: the embedded SmolLM2-135M-Instruct (or `--model`) with a fresh LoRA adapter (r 16, all
linear layers), as in training: bfloat16 on CUDA and on CPUs with native bf16, float32 on
other CPUs (or `--dtype`), NF4 with `--quantization nf4` (CUDA only). Every completion is
forced to `--tokens` new tokens. For each batch size, each engine generates twice (the first
is a warm-up); the figure is decode tokens per second of the second run, prefill included.

The floor of one decode step is max(FLOPs / measured matmul rate, bytes / measured memory
bandwidth): 2 FLOPs per parameter per sequence, and every weight read once per step as stored
(half a byte per NF4 weight, quantization constants left out; the KV cache is small at these
lengths). Both rates are measured here, on this device, in the compute dtype. With NF4 weights
krpo's decoder reads bf16 copies, so the bf16 run's floor is the one it can reach.

Two ratios are printed. `floor/krpo` divides the decode-only floor (every new token at the
floor of a decode step) by the measured rate, which includes reading the prompts. `run
floor/krpo` is the same for the floor of all the timed work: the prompts' arithmetic too (2
FLOPs per parameter per real prompt token, the output head for one position per row), then
one decode step fewer, since the prompt's pass yields the first new token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def device_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) measured on `device`."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timed(lambda: a @ a, device)
    big = torch.empty(256 * 2**20 // 4, device=device, dtype=torch.float32).normal_()
    bandwidth = big.numel() * 4 / timed(lambda: big.sum(), device)
    return flops, bandwidth


def decode_step_floor_seconds(batch: int, params: int, weight_bytes: int, flops: float, bandwidth: float) -> float:
    """The floor of one decode step: max(2 FLOPs per parameter per row, reading the weights once)."""
    return max(2 * params * batch / flops, weight_bytes / bandwidth)


def run_floor_seconds(batch: int, prompt_tokens: int, new_tokens: int, params: int, head_params: int,
                      weight_bytes: int, flops: float, bandwidth: float) -> float:
    """The floor of generating `new_tokens` for `batch` prompts holding `prompt_tokens` real tokens:
    the prompts' pass (every weight for each prompt token, the output head for the last only),
    then new_tokens - 1 decode steps; each pass at max(arithmetic, reading the weights once)."""
    prompt_flops = 2 * (params - head_params) * prompt_tokens + 2 * head_params * batch
    prompt_pass = max(prompt_flops / flops, weight_bytes / bandwidth)
    return prompt_pass + (new_tokens - 1) * decode_step_floor_seconds(batch, params, weight_bytes, flops, bandwidth)


def weight_counts(model) -> tuple[int, int]:
    """(parameters, bytes as stored) of the base model, LoRA excluded; an NF4 tensor holds two per byte."""
    params = stored = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        quant_state = getattr(p, "quant_state", None)
        params += quant_state.shape.numel() if quant_state is not None else p.numel()
        stored += p.numel() * p.element_size()
    return params, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default=None, help="comma list; default 12,48 on CPU, 12,48,96,192,384 on CUDA")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bf16 on CUDA and on CPUs with native bf16, float32 elsewhere (as in training)")
    parser.add_argument("--json", default="bench/generation.json")
    args = parser.parse_args()

    from krpo_cli.config import Recipe
    from krpo_cli.data import build_prompt, digit_problems
    from krpo_cli.models import load_policy
    from krpo_cli.rollout import generate_rollout

    recipe = Recipe.model_validate({
        "run": {"name": "bench", "output_dir": "/tmp"},
        "model": {"name_or_path": args.model, "quantization": args.quantization, "dtype": args.dtype},
        "lora": {"r": 16, "alpha": 32},
        "data": {"source": "digits", "system_prompt": "Answer with just the number.", "prompt_template": "What is {question}?"},
        "reward": {"grader": "last_number"},
    })
    loaded = load_policy(recipe.model, recipe.lora, seed=0)
    model, tokenizer, device, dtype = loaded.model, loaded.tokenizer, loaded.device, loaded.dtype
    default_batches = "12,48,96,192,384" if device.type == "cuda" else "12,48"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    flops, bandwidth = device_rates(device, dtype)
    params, weight_bytes = weight_counts(model)
    print(f"device {device.type}, {str(dtype).removeprefix('torch.')}, weights {args.quantization}: matmul {flops / 1e9:.0f} GFLOP/s, "
          f"memory {bandwidth / 1e9:.1f} GB/s; {params / 1e6:.0f}M parameters ({weight_bytes / 2**20:.0f} MiB)")
    head_params = model.get_output_embeddings().weight.numel()
    print(f"{'batch':>6}{'floor tok/s':>13}{'krpo tok/s':>12}{'HF tok/s':>10}{'krpo/HF':>9}{'floor/krpo':>12}"
          f"{'run floor/krpo':>16}")

    settings = {"model": args.model, "device": device.type, "dtype": str(dtype), "quantization": args.quantization,
                "tokens": args.tokens, "matmul_flops": flops, "bandwidth_bytes_per_s": bandwidth,
                "parameters": params, "head_parameters": head_params, "weight_bytes": weight_bytes}
    questions = [row["question"] for row in digit_problems()]  # 200: larger batches repeat them
    rows = []
    for batch in batches:
        prompts = [build_prompt(tokenizer, recipe.data, questions[i % len(questions)]) for i in range(batch)]
        floor = batch / decode_step_floor_seconds(batch, params, weight_bytes, flops, bandwidth)
        prompt_tokens = sum(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
        run_floor = batch * args.tokens / run_floor_seconds(batch, prompt_tokens, args.tokens, params, head_params,
                                                            weight_bytes, flops, bandwidth)
        result = {"batch": batch, "prompt_tokens": prompt_tokens, "floor_tokens_per_s": floor,
                  "run_floor_tokens_per_s": run_floor}
        for engine in ("krpo", "transformers"):
            def run():
                return generate_rollout(model, tokenizer, prompts, 1, args.tokens, min_new_tokens=args.tokens, engine=engine)

            run()  # warm-up
            sync(device)
            start = time.perf_counter()
            rollout = run()
            sync(device)
            result[engine] = rollout.num_generated_tokens / (time.perf_counter() - start)
        rows.append(result)
        print(f"{batch:>6}{floor:>13.0f}{result['krpo']:>12.0f}{result['transformers']:>10.0f}"
              f"{result['krpo'] / result['transformers']:>8.2f}×{floor / result['krpo']:>11.2f}×"
              f"{run_floor / result['krpo']:>15.2f}×", flush=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "results": rows}, indent=2))  # so far
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
