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
start. Prints the median step time of each, the median (± standard error) and range of the
per-pair ratios, the same ratio for the update phase alone as a control (it runs the same
code in both, so it shows how far two processes differ on identical work), and times the two
estimators alone on one step's rewards.

POSIX only (it pauses processes with signals). On CUDA a step's last kernels may still be
running when its metrics line is written; the figures are meant for a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_step import add_workload_arguments, estimator_seconds, resolve_workload, run_krpo, workload_argv

ADVANTAGES = ("krpo", "grpo")


def worker(args) -> None:
    """One `krpo train` run; the parent reads its progress from metrics.jsonl."""
    run_krpo(args, advantage=args.worker, output_dir=Path(args.output_dir), name=args.worker)


def die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the parent dies (even while stopped)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the parent's `finally` is what cleans up


class Paced:
    """A process that runs only while this script lets it, one step at a time.

    `cmd` runs the steps and appends one line to `progress` after each; its output goes to `log`.
    It runs in a POSIX session of its own, so that a SIGCONT sent to the terminal's process group
    (Ctrl-Z, then `fg`) does not wake it while it is meant to be paused.
    """

    def __init__(self, name: str, cmd: list[str], progress: Path, log: Path):
        self.name, self.metrics = name, progress
        self.log = log.open("w")
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent)
        self.lines_seen = 0
        self.ran_after_last_line = 0.0  # seconds it ran between its last line and being paused

    def lines(self) -> int:
        try:
            return self.metrics.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def failed(self, what: str) -> RuntimeError:
        self.log.close()
        tail = Path(self.log.name).read_text()[-3000:]
        return RuntimeError(f"the {self.name} run {what} ({self.process.returncode}):\n{tail}")

    def run_one_step(self, poll_s: float = 0.002) -> float:
        """Let it run until its next metrics line, pause it; returns the step's running seconds."""
        resumed = time.perf_counter()
        self.process.send_signal(signal.SIGCONT)
        while self.lines() <= self.lines_seen:
            if self.process.poll() is not None and self.lines() <= self.lines_seen:  # a last line may have just come
                raise self.failed("exited")
            time.sleep(poll_s)
        line_seen = time.perf_counter()
        self.process.send_signal(signal.SIGSTOP)  # does nothing once it has exited
        paused = time.perf_counter()
        step = self.ran_after_last_line + (line_seen - resumed)
        self.ran_after_last_line = paused - line_seen
        self.lines_seen += 1
        return step

    def finish(self) -> None:
        """Let it run to its end; a failure there is reported too."""
        self.process.send_signal(signal.SIGCONT)
        if self.process.wait() != 0:
            raise self.failed("failed after its last step")
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

    if not hasattr(signal, "SIGSTOP"):
        parser.error("this benchmark pauses processes with POSIX signals (Linux, macOS)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the workers
    output_dir = Path(tempfile.mkdtemp())
    runs: dict[str, Paced] = {}
    times: dict[str, list[float]] = {a: [] for a in ADVANTAGES}
    try:
        for advantage in ADVANTAGES:  # one after the other: loading and the warm-up step are not measured
            cmd = [sys.executable, __file__, "--worker", advantage, "--output-dir", str(output_dir),
                   "--steps", str(args.pairs + 1), *workload_argv(args)]
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
        # Each step's update phase, from the runs' own logs (the pauses fall outside it).
        update_seconds = {a: [json.loads(line)["update_seconds"] for line in run.metrics.read_text().splitlines()]
                          for a, run in runs.items()}
    finally:
        for run in runs.values():
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        shutil.rmtree(output_dir, ignore_errors=True)  # the two runs' checkpoints and logs

    ratios = [k / g for k, g in zip(times["krpo"], times["grpo"])]
    # A control inside the run: the update phase runs the same code in both (the estimator runs
    # before it), so its ratio shows how far two processes differ on identical work.
    update_ratios = [k / g for k, g in zip(update_seconds["krpo"][1:], update_seconds["grpo"][1:])]
    # Standard error of a median of n draws: ~1.25 σ / √n.
    median_error = 1.2533 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    kalman_s = estimator_seconds("krpo", args.prompts, args.group)
    grpo_s = estimator_seconds("grpo", args.prompts, args.group)
    summary = {
        "median_step_s": {a: statistics.median(t) for a, t in times.items()},
        "median_pair_ratio": statistics.median(ratios),
        "median_pair_ratio_standard_error": median_error,
        "pair_ratio_range": [min(ratios), max(ratios)],
        "median_pair_ratio_update_phase": statistics.median(update_ratios),
        "estimator_seconds": {"krpo": kalman_s, "grpo": grpo_s},
    }
    completions = args.prompts * args.group
    print(f"\n{args.device} ({settings['dtype']}), {completions} completions × {args.completion_tokens} tokens per step, "
          f"{args.pairs} pairs")
    print(f"median s/step: KRPO {summary['median_step_s']['krpo']:.3f}, GRPO {summary['median_step_s']['grpo']:.3f}")
    print(f"KRPO / GRPO per pair: median {summary['median_pair_ratio']:.4f} "
          f"({summary['median_pair_ratio'] - 1:+.2%} ± {median_error:.2%} s.e.), range {min(ratios):.4f}-{max(ratios):.4f}")
    print(f"control, the update phase (the same code in both): KRPO / GRPO per pair, median "
          f"{statistics.median(update_ratios):.4f} ({statistics.median(update_ratios) - 1:+.2%})")
    print(f"the estimators alone: {kalman_s * 1e6:.0f} µs vs {grpo_s * 1e6:.0f} µs per step "
          f"({(kalman_s - grpo_s) / summary['median_step_s']['grpo']:+.5%} of a step)")
    recorded = {"model": args.model, "device": args.device, "dtype": settings["dtype"], "prompts": args.prompts,
                "group": args.group, "completion_tokens": args.completion_tokens, "pairs": args.pairs}
    raw = {"step_seconds": times, "update_seconds_by_step": update_seconds}  # update: warm-up step first
    Path(args.json).write_text(json.dumps({"settings": recorded, "summary": summary, "raw": raw}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
