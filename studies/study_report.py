"""The estimator study's report: per task, each seed's held-out accuracy, mean ± std per arm, the
paired differences with their t-intervals, and learning curves with bands across seeds.

Reads only what the runs wrote (metrics.jsonl, recipe.yaml: krpo_cli/compare.py loads them) and
the evaluation of each task's starting point (the base model or a warm start); a run that is not finished is listed as missing, never guessed.
Writes <out>/results.json, <out>/results.md and <out>/curves-<task>.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from krpo_cli.compare import (
    DPI, EVAL_ACCURACY, CompareError, Smoothing, aggregate, load_run, seed_band, summarize_run, write_json,
)
from studies.stats import mean_std, paired_difference

CURVE_SMOOTHING = Smoothing("ema", 0.6)  # short runs: a light EMA on the per-step rollout reward
CURVES = (("reward_mean", "rollout reward (reward_mean, EMA 0.6)"), (EVAL_ACCURACY, "held-out accuracy (greedy)"))
BAND_ALPHA = 0.2


def final_accuracy(records: list[dict], steps: int) -> float | None:
    """The held-out accuracy logged at the last step, None when the run did not get there."""
    for record in records:
        if record.get("step") == steps and EVAL_ACCURACY in record:
            return float(record[EVAL_ACCURACY])
    return None


def collect(planned: list) -> tuple[dict, list[str]]:
    """{task: {arm: {seed: Run}}} of the finished runs, and the directories of the others."""
    found: dict = {}
    missing = []
    for run in planned:
        try:
            loaded = load_run(run.run_dir)
        except CompareError:  # not started, or no step logged yet
            loaded = None
        if loaded is None or final_accuracy(loaded.records, run.steps) is None:
            missing.append(str(run.run_dir))
            continue
        found.setdefault(run.task, {}).setdefault(run.arm, {})[run.seed] = loaded
    return found, missing


def base_accuracy(out: Path, task: str) -> dict | None:
    """The starting point's evaluation on the task (accuracy, number of questions, what it is), if it was made."""
    from studies.estimators import TASKS, start_eval_dir, warm_start_label

    path = start_eval_dir(out, task) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    start = warm_start_label() if TASKS[task].warm_start else "the base model (no adapter)"
    return {"accuracy": results["metrics"]["accuracy"], "questions": results["num_questions"], "start": start}


def task_results(arms: dict, steps: int, comparisons) -> dict:
    """Per arm: each seed's final held-out accuracy, mean ± std, compare's figures; then the paired differences."""
    results: dict = {"arms": {}, "comparisons": []}
    for arm, runs in arms.items():
        by_seed = {seed: final_accuracy(run.records, steps) for seed, run in sorted(runs.items())}
        summaries = [summarize_run(run, EVAL_ACCURACY) for run in runs.values()]
        results["arms"][arm] = {
            "accuracy_by_seed": by_seed,
            "accuracy": mean_std(list(by_seed.values())),
            "figures": aggregate(summaries),
        }
    for arm, reference in comparisons:
        if arm in arms and reference in arms:
            first, second = (results["arms"][name]["accuracy_by_seed"] for name in (arm, reference))
            results["comparisons"].append({"arm": arm, "reference": reference, **paired_difference(first, second)})
    return results


def draw_curves(task: str, arms: dict, path: Path) -> Path:
    """Mean across seeds (line) and ± one std (band) per arm: rollout reward and held-out accuracy."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colours = matplotlib.colormaps["tab10"]
    figure = Figure(figsize=(12.0, 4.5), dpi=DPI)
    for ax, (key, title) in zip(figure.subplots(1, len(CURVES)), CURVES):
        for index, (arm, runs) in enumerate(arms.items()):
            steps, means, stds = seed_band(list(runs.values()), key, CURVE_SMOOTHING)
            colour = colours(index % colours.N)
            ax.plot(steps, means, color=colour, linewidth=2, marker="o" if key == EVAL_ACCURACY else None,
                    label=f"{arm} (n={len(runs)})")
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=BAND_ALPHA, linewidth=0)
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)  # the quickstart's reward and any accuracy lie in [0, 1]: panels comparable
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"{task}: mean across seeds, band ± 1 std", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """results.md: per task, the starting point, a table of arms and a table of paired differences."""
    lines = [f"# Estimator study ({report['size']})", "", "Held-out accuracy: greedy, at the last step.", ""]
    for task, results in report["tasks"].items():
        base = results.get("base")
        lines += [f"## {task}", "", results["description"], ""]
        if base:
            lines += [f"Start, {base['start']}: {number(base['accuracy'])} on {base['questions']} questions.", ""]
        lines += ["| arm | seeds | accuracy per seed | mean ± std |", "|---|---:|---|---:|"]
        for arm, row in results["arms"].items():
            per_seed = ", ".join(f"{seed}: {number(value)}" for seed, value in row["accuracy_by_seed"].items())
            stats = row["accuracy"]
            lines.append(f"| {arm} | {stats['n']} | {per_seed} | {number(stats['mean'])} ± {number(stats['std'])} |")
        if results["comparisons"]:
            lines += ["", "| difference (paired by seed) | pairs | mean | 95 % t-interval | per seed |", "|---|---:|---:|---|---|"]
            for c in results["comparisons"]:
                interval = "–" if c["interval"] is None else f"[{number(c['interval'][0])}, {number(c['interval'][1])}]"
                per_seed = ", ".join(f"{seed}: {number(value)}" for seed, value in c["differences"].items())
                lines.append(f"| {c['arm']} − {c['reference']} | {c['n']} | {number(c['mean'])} | {interval} | {per_seed} |")
        lines += ["", f"![{task} curves](curves-{task}.png)", ""]
    if report["missing"]:
        lines += ["## Not finished (left out above)", "", *(f"- `{path}`" for path in report["missing"]), ""]
    return "\n".join(lines)


def write_report(out: Path, planned: list, console: Console, size: str = "") -> dict:
    """Write results.json, results.md and the curves; returns what results.json holds."""
    from studies.estimators import COMPARISONS, TASKS

    found, missing = collect(planned)
    report: dict = {"size": size, "tasks": {}, "missing": missing}
    for task in dict.fromkeys(run.task for run in planned):
        arms = found.get(task, {})
        results = {"description": TASKS[task].description, "base": base_accuracy(out, task)}
        steps = {run.task: run.steps for run in planned}[task]
        results |= {"steps": steps, **task_results(arms, steps, COMPARISONS)}
        report["tasks"][task] = results
        if arms:
            draw_curves(task, arms, out / f"curves-{task}.png")
    write_json(report, out / "results.json")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and the curves "
                  f"({len(planned) - len(missing)} of {len(planned)} runs finished)", highlight=False, markup=False)
    return report
