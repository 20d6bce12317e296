"""Benchmark: KRPO's step time against GRPO's, paired step by step in one run.

    python bench/krpo_overhead.py [--pairs 10] [--completion-tokens 128] [--json bench/krpo_overhead.json]

Two `krpo train` processes, identical but for `algorithm.advantage` (krpo: the Kalman filter;
grpo: the group's mean and std), with bench/train_step.py's recipe and shape (on a CPU: the
embedded model in float32, 2 prompts × 8 completions, every completion forced to full length,
so both do the same work). Machine speed drifts 10-20 % over minutes here, more than the
difference to be measured, so the two never run at the same time and take turns step by step:
this script pauses one (SIGSTOP) while the other runs exactly one step, then swaps, the order
alternating from pair to pair (K G, G K, K G, ...) so that a steady drift cancels. A step's time
is its process's running time between two consecutive lines of its metrics.jsonl, measured here
with the paused time left out. Each process's first step is a warm-up, run before the pairs
start. Prints the median step time of each and the median and range of the per-pair ratios,
and times the two estimators alone on one step's rewards.

POSIX only (it pauses processes with signals). On CUDA a step's last kernels may still be
running when its metrics line is written; the figures are meant for a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_step import add_workload_arguments, estimator_seconds, krpo_recipe, resolve_workload

ADVANTAGES = ("krpo", "grpo")


def worker(args) -> None:
    """One `krpo train` run; the parent reads its progress from metrics.jsonl."""
    import torch
    from rich.console import Console

    from krpo_cli.train import train

    recipe = krpo_recipe(args, args.worker, "auto", Path(args.output_dir), name=args.worker)
    train(recipe, console=Console(quiet=True), device=torch.device(args.device))


class Paced:
    """A process that runs only while this script lets it, one step at a time.

    `cmd` runs the steps and appends one line to `progress` after each; its output goes to `log`.
    """

    def __init__(self, name: str, cmd: list[str], progress: Path, log: Path):
        self.name, self.metrics = name, progress
        self.log = log.open("w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.lines_seen = 0
        self.ran_after_last_line = 0.0  # seconds it ran between its last line and being paused

    def lines(self) -> int:
        try:
            return self.metrics.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def run_one_step(self, poll_s: float = 0.002) -> float:
        """Let it run until its next metrics line, pause it; returns the step's running seconds."""
        resumed = time.perf_counter()
        os.kill(self.process.pid, signal.SIGCONT)
        while self.lines() <= self.lines_seen:
            if self.process.poll() is not None:
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"the {self.name} run exited ({self.process.returncode}):\n{tail}")
            time.sleep(poll_s)
        line_seen = time.perf_counter()
        os.kill(self.process.pid, signal.SIGSTOP)
        paused = time.perf_counter()
        step = self.ran_after_last_line + (line_seen - resumed)
        self.ran_after_last_line = paused - line_seen
        self.lines_seen += 1
        return step

    def finish(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.wait()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="measured steps of each, one pair at a time")
    add_workload_arguments(parser)
    parser.add_argument("--json", default="bench/krpo_overhead.json")
    parser.add_argument("--worker", choices=ADVANTAGES, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = resolve_workload(args)
    if args.worker:
        return worker(args)

    output_dir = Path(tempfile.mkdtemp())
    runs: dict[str, Paced] = {}
    times: dict[str, list[float]] = {a: [] for a in ADVANTAGES}
    try:
        for advantage in ADVANTAGES:  # one after the other: loading and the warm-up step are not measured
            cmd = [sys.executable, __file__, "--worker", advantage, "--output-dir", str(output_dir),
                   "--steps", str(args.pairs + 1), "--completion-tokens", str(args.completion_tokens),
                   "--model", args.model, "--device", args.device, "--prompts", str(args.prompts),
                   "--group", str(args.group), "--dtype", args.dtype]
            runs[advantage] = Paced(advantage, cmd, output_dir / advantage / "metrics.jsonl",
                                    output_dir / f"{advantage}.log")
            runs[advantage].run_one_step()
            print(f"{advantage}: loaded, warm-up step done", flush=True)
        for pair in range(args.pairs):
            order = ADVANTAGES if pair % 2 == 0 else ADVANTAGES[::-1]
            for advantage in order:
                times[advantage].append(runs[advantage].run_one_step())
            k, g = times["krpo"][-1], times["grpo"][-1]
            print(f"pair {pair + 1:2d} ({order[0]} first): krpo {k:6.2f} s, grpo {g:6.2f} s, ratio {k / g:.4f}", flush=True)
        for run in runs.values():
            run.finish()
    finally:
        for run in runs.values():
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        shutil.rmtree(output_dir, ignore_errors=True)  # the two runs' checkpoints and logs

    ratios = [k / g for k, g in zip(times["krpo"], times["grpo"])]
    kalman_s = estimator_seconds("krpo", args.prompts, args.group)
    grpo_s = estimator_seconds("grpo", args.prompts, args.group)
    summary = {
        "median_step_s": {a: statistics.median(t) for a, t in times.items()},
        "median_pair_ratio": statistics.median(ratios),
        "pair_ratio_range": [min(ratios), max(ratios)],
        "estimator_seconds": {"krpo": kalman_s, "grpo": grpo_s},
    }
    completions = args.prompts * args.group
    print(f"\n{args.device} ({settings['dtype']}), {completions} completions × {args.completion_tokens} tokens per step, "
          f"{args.pairs} pairs")
    print(f"median s/step: KRPO {summary['median_step_s']['krpo']:.3f}, GRPO {summary['median_step_s']['grpo']:.3f}")
    print(f"KRPO / GRPO per pair: median {summary['median_pair_ratio']:.4f} "
          f"({summary['median_pair_ratio'] - 1:+.2%}), range {min(ratios):.4f}-{max(ratios):.4f}")
    print(f"the estimators alone: {kalman_s * 1e6:.0f} µs vs {grpo_s * 1e6:.0f} µs per step "
          f"({(kalman_s - grpo_s) / summary['median_step_s']['grpo']:+.5%} of a step)")
    recorded = {"model": args.model, "device": args.device, "dtype": settings["dtype"], "prompts": args.prompts,
                "group": args.group, "completion_tokens": args.completion_tokens, "pairs": args.pairs}
    Path(args.json).write_text(json.dumps({"settings": recorded, "summary": summary, "raw": times}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
