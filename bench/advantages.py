"""Benchmark: KRPO advantages, vectorised across groups, against a per-reward Python loop
(the straightforward way to write the filter) and against GRPO's group statistics.

    python bench/advantages.py [--groups 1000 10000 100000] [--repeats 7] [--json bench/advantages.json]

Prints medians (seconds) and ratios; writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from krpo_cli.advantages import grpo_advantages, krpo_advantages


def krpo_per_reward_loop(rewards: torch.Tensor, q=1e-5, r=1e-2, eps=1e-8) -> torch.Tensor:
    """The filter reward by reward, in Python, as a direct reading of the equations."""
    out = torch.empty_like(rewards)
    values = rewards.tolist()
    for g, group in enumerate(values):
        x, p = 0.0, 1.0
        row = []
        for reward in group:
            p_prior = p + q
            k = p_prior / (p_prior + r)
            x = x + k * (reward - x)
            p = (1 - k) * p_prior
            row.append((reward - x) / (p + eps) ** 0.5)
        out[g] = torch.tensor(row)
    return out


def median_seconds(fn, rewards, repeats: int) -> float:
    fn(rewards)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(rewards)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--group-size", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench/advantages.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    print(f"{'groups':>8} {'krpo (s)':>11} {'loop (s)':>11} {'grpo (s)':>11} {'loop/krpo':>10} {'krpo/grpo':>10}")
    for n in args.groups:
        rewards = (torch.rand(n, args.group_size) < 0.4).float()
        assert torch.allclose(krpo_advantages(rewards), krpo_per_reward_loop(rewards), atol=1e-4)
        krpo = median_seconds(krpo_advantages, rewards, args.repeats)
        loop = median_seconds(krpo_per_reward_loop, rewards, max(3, args.repeats // 2))
        grpo = median_seconds(grpo_advantages, rewards, args.repeats)
        rows.append({"groups": n, "group_size": args.group_size, "krpo_s": krpo, "loop_s": loop, "grpo_s": grpo,
                     "loop_over_krpo": loop / krpo, "krpo_over_grpo": krpo / grpo})
        print(f"{n:>8} {krpo:>11.6f} {loop:>11.6f} {grpo:>11.6f} {loop / krpo:>9.0f}× {krpo / grpo:>9.1f}×")
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
