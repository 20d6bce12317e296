"""The training progress display: step n/N, elapsed time, ETA and the step's key metrics.

The ETA is krpo's own: the median duration of the steps finished in this process times the
steps left, shown from the first finished step on (a GPU step can take minutes, and a
rate-based estimate over a few slow steps shows nothing). On a terminal the status is redrawn
in place and fitted to its width: one line when everything fits, else two (step, bar and
times; then the metrics that fit). Elsewhere (CI logs, pipes) it is one plain line per step,
never wrapped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from krpo_cli.run_log import format_number

SEPARATOR = " · "
BAR_WIDTHS = (10, 30)  # narrowest bar worth drawing, widest drawn
METRICS_SHOWN = (("reward", "reward_mean"), ("correct", "correct_frac"), ("kl", "kl"), ("eval acc", "eval/accuracy"))


def eta_seconds(step_durations: list[float], steps_left: int) -> float | None:
    """Seconds until the last step: the median finished step's duration × the steps left (the median,
    so that a slow first step or a periodic evaluation does not swing it); None before a step finished."""
    if not step_durations:
        return None
    return statistics.median(step_durations) * steps_left


def format_duration(seconds: float | None) -> str:
    """42 → "0:42", 725 → "12:05", 3723 → "1:02:03"; None → "…" (not known yet)."""
    if seconds is None:
        return "…"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def metric_parts(metrics: dict) -> list[str]:
    """The key metrics as "reward 0.512"-style parts, in the order they are dropped last to first."""
    return [f"{label} {format_number(metrics[key])}" for label, key in METRICS_SHOWN if key in metrics]


def time_parts(elapsed: float, eta: float | None, step_seconds: float | None) -> list[str]:
    """"2:03 elapsed", "eta 6:30", "12.3s/step" (the last step's own duration, when there was one)."""
    parts = [f"{format_duration(elapsed)} elapsed", f"eta {format_duration(eta)}"]
    if step_seconds is not None:
        parts.append(f"{step_seconds:.3g}s/step")
    return parts


def fit(parts: list[str], width: int) -> list[str]:
    """The leading parts whose joined text fits in `width` cells."""
    kept: list[str] = []
    for part in parts:
        if cell_len(SEPARATOR.join(kept + [part])) > width:
            break
        kept.append(part)
    return kept


def status_lines(head: str, times: list[str], shown: list[str], done: int, total: int, width: int) -> list[Text]:
    """The status fitted to `width` cells: one line if all of it fits beside a bar, else two lines
    (`head` = step n/N, bar, times; then the metrics `shown` that fit, dropped from the end)."""
    alone = cell_len(head) + 1 + cell_len(SEPARATOR.join(times + shown))
    if alone + 1 + BAR_WIDTHS[0] <= width:
        return [with_bar(head, SEPARATOR.join(times + shown), done, total, width)]
    times = fit(times, width - cell_len(head) - 1)
    first = with_bar(head, SEPARATOR.join(times), done, total, width)
    kept = fit(shown, width - 2)
    return [first, Text("  " + SEPARATOR.join(kept))] if kept else [first]


def with_bar(head: str, tail: str, done: int, total: int, width: int) -> Text:
    """`head`, a bar as wide as the room left allows (none when under BAR_WIDTHS[0]), then `tail`."""
    room = width - cell_len(head) - cell_len(tail) - 2
    line = Text()
    line.append(head, style="bold")
    bar_width = min(BAR_WIDTHS[1], room)
    if bar_width >= BAR_WIDTHS[0]:
        filled = round(bar_width * done / total) if total else bar_width
        line.append(" ")
        line.append("━" * filled, style="bar.complete")
        line.append("━" * (bar_width - filled), style="bar.back")
    line.append(" " + tail)
    return line


class StepProgress:
    """Step n/N, elapsed, ETA and the key metrics: redrawn in place on a terminal, a line per step elsewhere.

    `clock` (time.monotonic) is replaceable, so that the display can be checked without waiting.
    """

    def __init__(self, console: Console, total_steps: int, first_step: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.total = total_steps
        self.done = first_step  # steps finished before this process started (a resumed run)
        self.clock = clock
        self.started = self.last = clock()
        self.durations: list[float] = []  # of the steps this process finished
        self.metrics: dict = {}
        self.live = Live(self, console=console, refresh_per_second=1, transient=False) if console.is_terminal else None

    def __enter__(self) -> "StepProgress":
        self.started = self.last = self.clock()
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, metrics: dict) -> None:
        """A step finished, with these metrics."""
        now = self.clock()
        self.durations.append(now - self.last)
        self.last = now
        self.done, self.metrics = metrics["step"], metrics
        if self.live is not None:
            self.live.refresh()
        else:
            self.console.print(self.plain_line(), highlight=False, markup=False, soft_wrap=True)

    def parts(self) -> tuple[list[str], list[str]]:
        """(times, metrics) as of now."""
        eta = eta_seconds(self.durations, self.total - self.done)
        times = time_parts(self.clock() - self.started, eta, self.metrics.get("step_seconds"))
        return times, metric_parts(self.metrics)

    def plain_line(self) -> str:
        """One step's line for a log: every figure, whatever the width (printed without wrapping)."""
        times, shown = self.parts()
        return SEPARATOR.join([f"step {self.done}/{self.total}"] + times + shown)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        times, shown = self.parts()
        yield Text("\n").join(status_lines(f"train {self.done}/{self.total}", times, shown, self.done, self.total,
                                           options.max_width))
