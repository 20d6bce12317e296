"""Run logging: metrics.jsonl / samples.jsonl writers and a progress display.

The progress display is a Rich progress bar on a terminal and one plain line per step
otherwise (CI logs, pipes, notebooks that are not terminals).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses nothing written."""

    def __init__(self, path: Path, mode: str = "a"):
        self.path = path
        self._file = path.open(mode, encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


class StepProgress:
    """Step M/N with mean reward, KL and ETA."""

    def __init__(self, console: Console, total_steps: int, first_step: int = 0):
        self.console = console
        self.total = total_steps
        self.live = console.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, stats="")

    def __enter__(self) -> "StepProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, metrics: dict) -> None:
        stats = (
            f"reward {_fmt(metrics['reward_mean'])}  correct {_fmt(metrics['correct_frac'])}  "
            f"kl {_fmt(metrics['kl'])}  {_fmt(metrics['step_seconds'])}s/step"
        )
        if "eval/accuracy" in metrics:
            stats += f"  eval acc {_fmt(metrics['eval/accuracy'])}"
        if self.progress is not None:
            self.progress.update(self.task, completed=metrics["step"], stats=stats)
        else:
            self.console.print(f"step {metrics['step']}/{self.total}  {stats}", highlight=False)
