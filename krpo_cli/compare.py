"""`krpo compare`: read several runs' metrics.jsonl, summarise them and draw one figure.

Pure functions do the work (load, smooth, summarise, aggregate across seeds) and are
tested on hand-computed numbers; `draw_comparison` is the only one that touches
matplotlib, which is imported there (Agg canvas, no display, no pyplot global state).

Smoothing is over logged points, in order: an EMA with weight w (s₀ = x₀,
sₜ = w·sₜ₋₁ + (1−w)·xₜ, no bias correction) or a trailing moving average over the last
k points (fewer at the start). The raw values are drawn faintly behind the smoothed line.
Held-out `eval/accuracy` is not smoothed: it is logged every `eval.every` steps only, and
is greedy decoding on a fixed set of questions, so it carries no sampling noise to smooth.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from krpo_cli.recipe_yaml import load_yaml
from krpo_cli.errors import KrpoError
from krpo_cli.run_log import format_number

EVAL_ACCURACY = "eval/accuracy"
ROLLOUT_ACCURACY = "correct_frac"
FIGURES = ("reward_final", "reward_best", "accuracy_final", "accuracy_best", "kl_final")
FIGURE_SIZE = (15.0, 4.5)  # inches; at DPI the PNG is 1500 × 450 pixels
DPI = 100
RAW_ALPHA = 0.25


class CompareError(KrpoError):
    """A directory cannot be compared (not a run, no steps yet, unreadable metrics)."""


@dataclass
class Run:
    """One run directory as `krpo compare` sees it."""

    path: Path
    name: str
    advantage: str | None
    seed: int | None
    records: list[dict]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.advantage})" if self.advantage else self.name


@dataclass(frozen=True)
class Smoothing:
    """kind 'ema' (value: weight in (0, 1)), 'window' (value: points, ≥ 2) or 'none'."""

    kind: str
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "ema":
            return f"EMA, weight {self.value:g}"
        if self.kind == "window":
            return f"moving average over {int(self.value)} points"
        return "none"


SMOOTH_VALUES = "an EMA weight below 1 (e.g. 0.8), a whole moving-average window ≥ 2 (e.g. 10), or 0 or 1 for none"


def parse_smoothing(text: str) -> Smoothing:
    """'0.8' → EMA weight 0.8; '10' → 10-point moving average; '0' or '1' → no smoothing.

    An EMA of weight 0 and a window of one point both leave the values as they are.
    """
    try:
        number = float(text)
    except ValueError:
        raise CompareError(f"--smooth must be {SMOOTH_VALUES}, not '{text}'") from None
    if not math.isfinite(number) or number < 0:
        raise CompareError(f"--smooth must be {SMOOTH_VALUES}, not '{text}'")
    if number in (0, 1):
        return Smoothing("none")
    if number < 1:
        return Smoothing("ema", number)
    if number != int(number):
        raise CompareError(f"--smooth: a moving-average window is a whole number of points, not '{text}'")
    return Smoothing("window", float(int(number)))


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, starting at the first value."""
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else weight * smoothed[-1] + (1 - weight) * value)
    return smoothed


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last `window` values (of all values so far at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def smooth(values: list[float], smoothing: Smoothing) -> list[float]:
    if smoothing.kind == "ema":
        return ema(values, smoothing.value)
    if smoothing.kind == "window":
        return moving_average(values, int(smoothing.value))
    return list(values)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a missing, empty or malformed file is a CompareError."""
    run_dir = path.parent
    if not run_dir.is_dir():
        raise CompareError(f"'{run_dir}' is not a directory")
    if not path.is_file():
        raise CompareError(f"'{run_dir}' is not a run directory (no metrics.jsonl)")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CompareError(f"cannot read '{path}': {err}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CompareError(f"'{path}' line {number} is not JSON") from None
        if not isinstance(record, dict) or "step" not in record:
            raise CompareError(f"'{path}' line {number} is not a metrics record (no 'step')")
        records.append(record)
    if not records:
        raise CompareError(f"'{path}' is empty: the run has not finished a step yet")
    return records


def load_run(run_dir: Path) -> Run:
    """metrics.jsonl, plus run name, advantage and seed from recipe.yaml (the directory name without it)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    name, advantage, seed = run_dir.name, None, None
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.is_file():
        try:
            recipe = load_yaml(recipe_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CompareError(f"cannot read '{recipe_path}': {' '.join(str(err).split())}") from None
        if isinstance(recipe, dict):
            run = recipe.get("run") or {}
            algorithm = recipe.get("algorithm") or {}
            name = str(run.get("name", name))
            advantage = algorithm.get("advantage")
            seed = run.get("seed")
    return Run(run_dir, name, advantage, seed, records)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a finite number under `key`."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def accuracy_key(runs: list[Run]) -> str:
    """eval/accuracy when every run logged it, else the rollouts' correct_frac (one key for all runs)."""
    if all(series(run.records, EVAL_ACCURACY)[1] for run in runs):
        return EVAL_ACCURACY
    return ROLLOUT_ACCURACY


def summarize_run(run: Run, accuracy: str | None = None) -> dict:
    """Final and best reward and accuracy, final KL, and steps logged (None where a run has no value)."""
    accuracy = accuracy or accuracy_key([run])
    rewards = series(run.records, "reward_mean")[1]
    accuracies = series(run.records, accuracy)[1]
    kls = series(run.records, "kl")[1]
    return {
        "label": run.label,
        "run_dir": str(run.path),
        "name": run.name,
        "advantage": run.advantage,
        "seed": run.seed,
        "steps": run.records[-1]["step"],
        "reward_final": rewards[-1] if rewards else None,
        "reward_best": max(rewards) if rewards else None,
        "accuracy_metric": accuracy,
        "accuracy_final": accuracies[-1] if accuracies else None,
        "accuracy_best": max(accuracies) if accuracies else None,
        "kl_final": kls[-1] if kls else None,
    }


def aggregate(summaries: list[dict]) -> dict:
    """Mean and sample standard deviation (n−1) of each figure across runs; std is None for one run."""
    result = {}
    for figure in FIGURES:
        values = [s[figure] for s in summaries if s[figure] is not None]
        result[figure] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
    return result


def seed_band(runs: list[Run], key: str, smoothing: Smoothing) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of `key` across runs (seeds), at the steps every run logged it.

    Each run's values are smoothed first (`eval/accuracy` never is, as in the figure); std is the
    sample std (n − 1), 0.0 for a single run.
    """
    by_run = []
    for run in runs:
        steps, values = series(run.records, key)
        by_run.append(dict(zip(steps, values if key == EVAL_ACCURACY else smooth(values, smoothing))))
    common = sorted(set.intersection(*(set(values) for values in by_run))) if by_run else []
    means, stds = [], []
    for step in common:
        values = [values_at[step] for values_at in by_run]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return common, means, stds


def unique_labels(runs: list[Run]) -> list[str]:
    """Run labels, or the directory paths where two runs would share a label."""
    labels = [run.label for run in runs]
    return [str(run.path) if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


FIGURE_NAMES = {
    "reward_final": "reward final",
    "reward_best": "reward best",
    "accuracy_final": "accuracy final",
    "accuracy_best": "accuracy best",
    "kl_final": "KL final",
}


def summary_table(summaries: list[dict]) -> Table:
    """A Rich table with one row per run; the caption names the accuracy metric."""
    accuracy = summaries[0]["accuracy_metric"] if summaries else ROLLOUT_ACCURACY
    table = Table(show_edge=False, caption=f"accuracy: {accuracy}")
    # At 80 columns Rich would otherwise squeeze every column and cut headers and figures to
    # "accura…": the figures keep their width, and a long run label folds onto a second line.
    table.add_column("run", style="bold", overflow="fold")
    table.add_column("steps", justify="right", no_wrap=True)
    for figure in FIGURES:
        table.add_column(FIGURE_NAMES[figure].replace(" ", "\n"), justify="right", no_wrap=True)
    for s in summaries:
        table.add_row(s["label"], str(s["steps"]), *(format_number(s[figure]) for figure in FIGURES))
    return table


def aggregate_table(aggregated: dict, runs: int) -> Table:
    """Mean ± sample std of each figure across runs (seeds)."""
    table = Table(show_edge=False, title=f"across {runs} seeds")
    table.add_column("figure", style="bold")
    table.add_column("mean", justify="right")
    table.add_column("± std", justify="right")
    for figure in FIGURES:
        table.add_row(FIGURE_NAMES[figure], format_number(aggregated[figure]["mean"]), format_number(aggregated[figure]["std"]))
    return table


def comparison_figure(runs: list[Run], labels: list[str], accuracy: str, smoothing: Smoothing):
    """A matplotlib Figure: reward, accuracy and KL panels; per run a smoothed line over its faint raw values."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    accuracy_title = "accuracy (eval/accuracy, held-out, unsmoothed)" if accuracy == EVAL_ACCURACY else "accuracy (correct_frac, rollouts)"
    panels = [("reward_mean", "reward (reward_mean)"), (accuracy, accuracy_title), ("kl", "KL to reference (kl)")]
    colours = matplotlib.colormaps["tab10"]
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.subplots(1, len(panels))
    for ax, (key, title) in zip(axes, panels):
        for index, (run, label) in enumerate(zip(runs, labels)):
            steps, values = series(run.records, key)
            if not values:
                continue
            colour = colours(index % colours.N)
            if key == EVAL_ACCURACY:
                # Few points (every eval.every steps), greedy on a fixed set: drawn as they are.
                ax.plot(steps, values, color=colour, linewidth=2, marker="o", markersize=4, label=label)
                continue
            ax.plot(steps, values, color=colour, alpha=RAW_ALPHA, linewidth=1)
            ax.plot(steps, smooth(values, smoothing), color=colour, linewidth=2, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 1.5
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, names, fontsize="small")
    figure.suptitle(f"smoothing: {smoothing.describe()} (raw values faint)", fontsize="small")
    figure.tight_layout()
    return figure


MADE_BY = "krpo compare"  # in the PNG's Software text and the JSON's made_by: what krpo may replace


def made_by_compare(path: Path) -> bool:
    """Whether the existing file `path` is a figure or table `krpo compare` wrote (tables of earlier krpo
    versions, without made_by, are known by their keys); anything else is not krpo's to replace."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return image.info.get("Software") == MADE_BY
        table = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # unreadable, not an image, not JSON: not a krpo output
        return False
    return isinstance(table, dict) and (
        table.get("made_by") == MADE_BY or {"accuracy_metric", "smoothing", "runs"} <= table.keys() <= {
            "accuracy_metric", "smoothing", "runs", "aggregate"}
    )


def check_replaceable(*paths: Path) -> None:
    """Refuse, before anything is written, to replace a file that krpo compare did not write."""
    for path in paths:
        if path.exists() and not (path.is_file() and made_by_compare(path)):
            raise CompareError(f"'{path}' exists and is not a krpo compare output, so it is not replaced: name another --out")


def draw_comparison(runs: list[Run], labels: list[str], accuracy: str, smoothing: Smoothing, out: Path) -> Path:
    """Write `comparison_figure` as a PNG at `out`."""
    figure = comparison_figure(runs, labels, accuracy, smoothing)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png", dpi=DPI, metadata={"Software": MADE_BY})
    except OSError as err:
        raise CompareError(f"cannot write '{out}': {err.strerror or err}") from None
    return out


def write_json(data: dict, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise CompareError(f"cannot write '{path}': {err.strerror or err}") from None
    return path


def compare(
    run_dirs: list[Path], out: Path, smoothing: Smoothing, console: Console, aggregate_runs: bool = False
) -> dict:
    """Load runs, print the summary table, write `out` (PNG) and the table as JSON next to it.

    With `aggregate_runs` (training over seeds) a second table shows each figure's mean ± std
    and the JSON gets an `aggregate` section. Returns what the JSON holds.
    """
    if out.suffix.lower() != ".png":
        raise CompareError(f"--out must name a .png file, not '{out}'")
    check_replaceable(out, out.with_suffix(".json"))
    runs = [load_run(Path(d)) for d in run_dirs]
    accuracy = accuracy_key(runs)
    labels = unique_labels(runs)
    summaries = [summarize_run(run, accuracy) | {"label": label} for run, label in zip(runs, labels)]
    console.print(summary_table(summaries))
    aggregated = aggregate(summaries) if aggregate_runs else None
    if aggregated is not None:
        console.print(aggregate_table(aggregated, len(runs)))
    result = {"made_by": MADE_BY, "accuracy_metric": accuracy, "smoothing": smoothing.describe(), "runs": summaries}
    if aggregated is not None:
        result["aggregate"] = aggregated
    json_path = write_json(result, out.with_suffix(".json"))
    draw_comparison(runs, labels, accuracy, smoothing, out)
    console.print(f"wrote {out} and {json_path}", highlight=False, markup=False, soft_wrap=True)
    return result
