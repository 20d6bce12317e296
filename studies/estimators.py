"""The estimator study: does KRPO's Kalman baseline beat GRPO's group mean, over many seeds?

Trains the quickstart recipe (embedded SmolLM2-135M-Instruct, LoRA) once per (task, arm, seed)
of `GRID`, evaluates every run greedily on held-out questions (the training loop's own
evaluation, `eval.every`/`eval.size`, which logs `eval/accuracy` to metrics.jsonl), evaluates the
starting point (the base model, or a warm start) once per task on the same questions, and writes a report (studies/study_report.py):
`results.json`, `results.md` and one `curves-<task>.png` per task.

Run it from the repository root after `make install`:

    .venv/bin/python -m studies.estimators                      # the whole study (size "full")
    .venv/bin/python -m studies.estimators --plan               # the runs, their state, the estimated time
    .venv/bin/python -m studies.estimators --resume             # continue after an interruption
    .venv/bin/python -m studies.estimators --seeds 9,10,11,12   # other seeds (into the same folder)
    .venv/bin/python -m studies.estimators --size smoke --tasks one_digit --arms krpo,grpo --seeds 1

Runs go to `<out>/<task>/<arm>-seed<N>` (default `<out>`: runs/study-<size>). Same seed = same
LoRA initialisation and the same data order, so each seed's KRPO and GRPO runs are paired.

A warm-started task (the harder one) starts every run from the adapter of WARM_START, a run of
the quickstart task that has learned to answer with just the number. That run is trained first
(also when the plan does not include it), and the task's starting accuracy is that adapter's, in
`<out>/<task>/start-eval` (made once: delete it if the warm start is ever trained again);
otherwise it is the base model's, in `base-eval`. `--set` applies to every run, the warm start
included. A run whose recipe.yaml differs from what the study would train now (an arm or task
redefined since) stops the study with one line, rather than being counted.

A run whose last step and final evaluation are logged, with its adapter saved, is skipped on a
rerun; one that was interrupted continues from its latest checkpoint with `--resume` (or starts
over when it never reached one); without `--resume` the study refuses to start while any is left.

Budget (the sizes in `SIZES` are to be set after timing on a quiet machine): a run costs about
    LOAD_SECONDS + steps × prompts_per_step × group_size × SECONDS_PER_COMPLETION
    + evaluations × eval_questions × SECONDS_PER_EVAL_QUESTION
where the quickstart gives SECONDS_PER_COMPLETION ≈ 11 s / 32 completions on 2 CPU cores; the
other two constants are estimates, not measurements. Size "full": 12 steps × 4 prompts × 6
completions = 288 completions ≈ 99 s, 2 evaluations × 200 questions ≈ 20 s, load ≈ 10 s:
≈ 129 s a run (measured 2026-12-04: 109 s on one_digit, 147 s on two_by_one with its 200-question
evaluations); `GRID` holds 56 runs: ≈ 1 h 55 min on 2 cores. To fit another budget, change
the seed counts in `GRID` or the size; `--plan` prints the arithmetic for the current choice.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from krpo_cli.errors import KrpoError

BASE_RECIPE = "quickstart"
DEFAULT_SEEDS = "1,2,3,4,5,6,7,8"


class StudyError(KrpoError):
    """The study cannot run as asked (unknown task or arm, interrupted runs without --resume)."""


@dataclass(frozen=True)
class Task:
    description: str
    overrides: tuple[str, ...] = ()
    operands: tuple[range, range] | None = None  # generated a ± b problems, written to <out>/data/<task>.jsonl
    held_out: int = 500  # of the generated problems
    warm_start: bool = False  # every run starts from WARM_START's adapter (format learned), not from fresh LoRA


@dataclass(frozen=True)
class Size:
    steps: int
    prompts_per_step: int
    group_size: int
    eval_questions: int
    eval_every: int
    save_every: int

    def overrides(self) -> list[str]:
        return [
            f"train.steps={self.steps}",
            f"train.prompts_per_step={self.prompts_per_step}",
            f"algorithm.group_size={self.group_size}",
            f"train.minibatch_size={self.prompts_per_step * self.group_size}",  # one update per rollout
            f"eval.size={self.eval_questions}",
            f"eval.every={self.eval_every}",
            f"output.save_every={self.save_every}",
            "output.keep_checkpoints=1",
        ]


TASKS = {
    "one_digit": Task(
        "the quickstart's task: one-digit a + b and a − b. There are only 200 such problems; the recipe holds "
        "50 out and all 50 are evaluated"
    ),
    "two_digit": Task(
        "two-digit a + b and a − b, a and b in 10..99 (16,200 problems, 500 held out)",
        operands=(range(10, 100), range(10, 100)),
    ),
    "two_by_one": Task(
        "a + b and a − b, a in 10..99 and b in 0..9 (1,800 problems, 500 held out, 200 evaluated), every run "
        "starting from the adapter of one_digit · grpo · seed 1, which has learned to answer with just the number",
        operands=(range(10, 100), range(10)),
        warm_start=True,
    ),
    "one_digit_16": Task(
        "the quickstart's task on 16 training questions, so that prompts recur (for kalman.scope: prompt)",
        ("data.max_samples=16",),
    ),
}

ARMS = {
    "krpo": ("algorithm.advantage=krpo",),
    "grpo": ("algorithm.advantage=grpo",),
    "dr_grpo": ("algorithm.advantage=dr_grpo",),
    "rloo": ("algorithm.advantage=rloo",),
    "krpo_adaptive": ("algorithm.advantage=krpo", "algorithm.kalman.adaptive=true"),
    "krpo_sorted": ("algorithm.advantage=krpo", "algorithm.kalman.order=sorted"),
    "krpo_shuffled": ("algorithm.advantage=krpo", "algorithm.kalman.order=shuffled"),
    "krpo_prompt_scope": ("algorithm.advantage=krpo", "algorithm.kalman.scope=prompt"),
}

# The harder task. From the base model, neither two-digit task learns at the "full" size: the base
# model rambles past 16 tokens, so almost no sampled answer earns a reward (seed 1, 200 held-out
# questions: two_digit 0.000 base, 0.005 krpo, 0.000 grpo; two_by_one 0.100 base, 0.095 grpo).
# Started from an adapter that has learned the format, two_by_one does learn (8 seeds of grpo: 0.27
# at the start, 0.60 ± 0.11 at step 12): it is the harder task, warm-started (docs/results.md).
HARDER_TASK = "two_by_one"

# The run whose adapter a warm-started task starts from: (task, arm, seed), trained first when needed.
# GRPO's, so that if the starting point favours an estimator, it favours the reference, not KRPO.
WARM_START = ("one_digit", "grpo", 1)

# The study in one place: task → arm → how many of the seeds it runs (the first N of --seeds).
GRID = {
    "one_digit": {"krpo": 8, "grpo": 8, "dr_grpo": 3, "rloo": 3, "krpo_adaptive": 3, "krpo_sorted": 3},
    HARDER_TASK: {"krpo": 8, "grpo": 8, "dr_grpo": 3, "rloo": 3},
    "one_digit_16": {"krpo": 3, "krpo_prompt_scope": 3},
}

# Paired differences reported per task where both arms ran: (arm, reference arm).
COMPARISONS = (
    ("krpo", "grpo"),
    ("krpo", "dr_grpo"),
    ("krpo", "rloo"),
    ("krpo_adaptive", "krpo"),
    ("krpo_sorted", "krpo"),
    ("krpo_shuffled", "krpo"),
    ("krpo_prompt_scope", "krpo"),
)

SIZES = {
    "smoke": Size(steps=2, prompts_per_step=2, group_size=4, eval_questions=20, eval_every=2, save_every=1),
    "full": Size(steps=12, prompts_per_step=4, group_size=6, eval_questions=200, eval_every=6, save_every=3),
}

SECONDS_PER_COMPLETION = 11 / 32  # the quickstart: a step of 4 prompts × 8 completions, 2 CPU cores
SECONDS_PER_EVAL_QUESTION = 0.05  # estimate: greedy, 16 new tokens, batches of 32
LOAD_SECONDS = 10.0  # estimate: loading the prepared model and setting up a run


@dataclass(frozen=True)
class PlannedRun:
    task: str
    arm: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    steps: int  # the recipe's train.steps, after every override
    recipe: dict = field(default_factory=dict, compare=False)  # the resolved recipe, as recipe.yaml holds it


def operand_problems(first: range, second: range, seed: int = 0) -> list[dict]:
    """Every `a + b` and `a - b` with a in `first` and b in `second`, shuffled with `seed`."""
    rows = []
    for a in first:
        for b in second:
            rows.append({"question": f"{a} + {b}", "answer": str(a + b), "op": "+"})
            rows.append({"question": f"{a} - {b}", "answer": str(a - b), "op": "-"})
    random.Random(seed).shuffle(rows)
    return rows


def task_overrides(name: str, out: Path) -> list[str]:
    """The task's recipe overrides; a generated task's problems are written to <out>/data/<name>.jsonl once."""
    task = TASKS[name]
    if task.operands is None:
        return list(task.overrides)
    path = (out / "data" / f"{name}.jsonl").resolve()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps(row) for row in operand_problems(*task.operands))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [*task.overrides, "data.source=file", f"data.path={json.dumps(str(path))}", f"data.test_size={task.held_out}"]


def chosen(text: str | None, known: dict, what: str) -> list[str]:
    """A comma list of names from `known` (all of them for None); an unknown one is a StudyError."""
    if text is None:
        return list(known)
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise StudyError(f"--{what}: unknown '{','.join(unknown)}'; choose from {', '.join(known)}")
    return names


def plan_runs(out: Path, size: Size, seeds: list[int], tasks: list[str], arms: list[str], extra: list[str]) -> list[PlannedRun]:
    """Every run of GRID restricted to `tasks` and `arms`: each arm takes the first N of `seeds`.

    Each run's recipe is loaded here, so that a mistaken --set stops the study before it trains."""
    return [
        plan_run(out, size, task, arm, seed, extra)
        for task in tasks
        for arm, count in GRID.get(task, {}).items()
        if arm in arms
        for seed in seeds[:count]
    ]


def plan_run(out: Path, size: Size, task: str, arm: str, seed: int, extra: list[str]) -> PlannedRun:
    """One run: the task's, the size's, the arm's and the user's overrides, and the seed's."""
    from krpo_cli.multi_seed import seed_overrides
    from krpo_cli.recipe_loading import load_recipe

    task_dir = out / task
    common = [*task_overrides(task, out), *size.overrides(), f"run.output_dir={json.dumps(str(task_dir))}"]
    if TASKS[task].warm_start:
        common.append(f"lora.init_from={json.dumps(str(warm_start_adapter(out)))}")
    overrides = seed_overrides([*common, *ARMS[arm], *extra], arm, seed)
    recipe = load_recipe(BASE_RECIPE, overrides)[0]
    return PlannedRun(task, arm, seed, task_dir / f"{arm}-seed{seed}", tuple(overrides), recipe.train.steps,
                      recipe.model_dump(mode="json"))


def warm_start_adapter(out: Path) -> Path:
    """Where WARM_START's adapter is (or will be) saved."""
    from krpo_cli.run_dir import ADAPTER

    task, arm, seed = WARM_START
    return (out / task / f"{arm}-seed{seed}" / ADAPTER).resolve()


def is_warm_start(run: PlannedRun) -> bool:
    return (run.task, run.arm, run.seed) == WARM_START


def warm_start_label() -> str:
    return "the adapter of {} · {} · seed {}".format(*WARM_START)


def warm_start_needed(out: Path, size: Size, planned: list[PlannedRun], extra: list[str]) -> list[PlannedRun]:
    """WARM_START's run, when a planned task starts from it and the plan does not already train it."""
    if not any(TASKS[run.task].warm_start for run in planned):
        return []
    task, arm, seed = WARM_START
    run = plan_run(out, size, task, arm, seed, extra)
    return [] if run in planned else [run]


def run_state(run_dir: Path, steps: int) -> str:
    """'done' (the last step logged with its held-out evaluation, the adapter saved), 'started' or 'new'."""
    from krpo_cli.compare import EVAL_ACCURACY
    from krpo_cli.run_dir import ADAPTER, METRICS

    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    last = None
    try:
        lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    finished = isinstance(last, dict) and last.get("step") == steps and EVAL_ACCURACY in last
    return "done" if finished and (run_dir / ADAPTER / "adapter_config.json").is_file() else "started"


IGNORED_KEYS = ("run.output_dir",)  # where the study folder is; the runs' names already say which run it is
PATH_KEYS = ("data.path", "lora.init_from")  # files the study writes inside its folder: compared relative to it


def comparable(recipe: dict) -> dict:
    """A resolved recipe as flat dotted keys, each path inside the study's folder made relative to it,
    so that a study folder that was moved or renamed still matches its plan."""
    from krpo_cli.run_dir import flatten

    flat = flatten(recipe)
    out = Path(str(flat.get("run.output_dir", ""))).parent  # runs live in <out>/<task>
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and Path(value).is_relative_to(out):
            flat[key] = "<study>/" + Path(value).relative_to(out).as_posix()
    return flat


def recipe_differences(planned: PlannedRun) -> list[str]:
    """The keys whose value in the run's recipe.yaml differs from the plan's ([] when there is no recipe.yaml).

    The saved recipe is validated again first, so a key that a newer krpo added reads as its default."""
    import yaml
    from pydantic import ValidationError

    from krpo_cli.config import Recipe
    from krpo_cli.recipe_yaml import load_yaml
    from krpo_cli.run_dir import RECIPE

    path = planned.run_dir / RECIPE
    if not path.is_file():
        return []
    try:
        saved = comparable(Recipe.model_validate(load_yaml(path.read_text(encoding="utf-8"))).model_dump(mode="json"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError):
        return ["recipe.yaml (unreadable, or no longer a valid recipe)"]
    wanted = comparable(planned.recipe)
    keys = dict.fromkeys([*wanted, *saved])
    return [key for key in keys if key not in IGNORED_KEYS and saved.get(key) != wanted.get(key)]


def check_recipes(runs: list[PlannedRun]) -> None:
    """Refuse to count or continue a run that was trained with another recipe than the study's now."""
    for run in runs:
        differing = recipe_differences(run)
        if differing:
            raise StudyError(
                f"'{run.run_dir}' was trained with another recipe than the study's now (differs in "
                f"{', '.join(differing[:4])}{', …' if len(differing) > 4 else ''}); move it away or choose another --out"
            )


def estimated_seconds(size: Size, runs: int) -> float:
    """The budget arithmetic of the module docstring for `runs` runs of `size`."""
    evaluations = -(-size.steps // size.eval_every)  # every eval_every steps, the last step included
    per_run = (
        LOAD_SECONDS
        + size.steps * size.prompts_per_step * size.group_size * SECONDS_PER_COMPLETION
        + evaluations * size.eval_questions * SECONDS_PER_EVAL_QUESTION
    )
    return runs * per_run


def train_run(planned: PlannedRun, state: str, console: Console) -> None:
    """Train one planned run: afresh, from its latest checkpoint, or over again when it has none."""
    from krpo_cli.recipe_loading import load_recipe
    from krpo_cli.run_dir import list_checkpoints
    from krpo_cli.train import train

    recipe, text = load_recipe(BASE_RECIPE, list(planned.overrides))
    if state == "started" and list_checkpoints(planned.run_dir):
        train(recipe, text, console=console, resume=True)
    else:
        train(recipe, text, overwrite=state == "started", console=console)  # killed before its first checkpoint


def start_eval_dir(out: Path, task: str) -> Path:
    """Where the task's starting point is evaluated: the base model, or the warm-start adapter."""
    return out / task / ("start-eval" if TASKS[task].warm_start else "base-eval")


def evaluate_start(task: str, out: Path, size: Size, extra: list[str], console: Console) -> Path:
    """The starting point on the task's held-out questions: the base model (no adapter) or, for a
    warm-started task, WARM_START's adapter. Writes <start_eval_dir>/results.json."""
    from krpo_cli.evaluate import EvalTarget, run_eval
    from krpo_cli.recipe_loading import load_recipe

    folder = start_eval_dir(out, task)
    if not (folder / "results.json").is_file():
        recipe, _ = load_recipe(BASE_RECIPE, [*task_overrides(task, out), *size.overrides(), *extra])
        adapter = warm_start_adapter(out) if TASKS[task].warm_start else None
        target = EvalTarget(recipe.model.name_or_path, adapter, recipe, folder, f"{BASE_RECIPE} for the task {task}")
        run_eval(target, limit=recipe.eval.size, batch_size=recipe.eval.batch_size, console=console, overwrite=True)
    return folder / "results.json"


def check_started(states: dict[PlannedRun, str], resume: bool) -> None:
    """Without --resume, refuse before training anything if an interrupted run is left."""
    started = [planned for planned, state in states.items() if state == "started"]
    if started and not resume:
        raise StudyError(
            f"{len(started)} run(s) were interrupted, e.g. '{started[0].run_dir}'; rerun with --resume to continue them"
        )


def run_study(args: argparse.Namespace, console: Console) -> dict:
    """Plan, train what is not done (the warm start first), evaluate each task's starting point, write the report."""
    from krpo_cli.multi_seed import parse_seeds
    from studies.study_report import write_report

    size = SIZES[args.size]
    out = Path(args.out or f"runs/study-{args.size}")
    tasks, arms = chosen(args.tasks, GRID, "tasks"), chosen(args.arms, ARMS, "arms")
    planned = plan_runs(out, size, parse_seeds(args.seeds), tasks, arms, list(args.set))
    first = warm_start_needed(out, size, planned, list(args.set))  # not reported
    ordered = sorted([*first, *planned], key=lambda run: not is_warm_start(run))  # the warm start first, always
    states = {run: run_state(run.run_dir, run.steps) for run in ordered}
    check_recipes([run for run, state in states.items() if state != "new"])
    todo = [run for run, state in states.items() if state != "done"]
    minutes = estimated_seconds(size, len(todo)) / 60
    warm = " (one of them the warm start {} · {} · seed {})".format(*WARM_START) if first else ""
    console.print(f"[bold]estimator study[/] size {args.size}: {len(states)} runs{warm}, {len(states) - len(todo)} done, "
                  f"{len(todo)} to train (≈ {minutes:.0f} min on 2 CPU cores) → {escape(str(out))}", highlight=False)
    if args.plan:
        for run in states:
            console.print(f"  {states[run]:>7}  {escape(str(run.run_dir))}", highlight=False)
        return {}
    if not args.report_only:
        check_started(states, args.resume)
        for index, run in enumerate(todo, start=1):
            console.print(f"[bold]{run.task} · {run.arm} · seed {run.seed}[/] ({index}/{len(todo)})", highlight=False)
            train_run(run, states[run], console)
        for task in tasks:
            evaluate_start(task, out, size, list(args.set), console)
    return write_report(out, planned, console, args.size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m studies.estimators", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="run size (SIZES); default full")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma list; each arm takes the first N (GRID); default {DEFAULT_SEEDS}")
    parser.add_argument("--tasks", help=f"comma list of {', '.join(GRID)} (default: all)")
    parser.add_argument("--arms", help=f"comma list of {', '.join(ARMS)} (default: all of GRID)")
    parser.add_argument("--out", help="output folder (default: runs/study-<size>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every run")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their latest checkpoint")
    parser.add_argument("--plan", action="store_true", help="list the runs and their state, train nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from krpo_cli.train import TrainingInterrupted

    args = parse_args(argv)
    console = Console()
    try:
        run_study(args, console)
    except KrpoError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # one line
        return 2
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        given = list(argv if argv is not None else sys.argv[1:])
        again = " ".join(["python -m studies.estimators", *given, *([] if "--resume" in given else ["--resume"])])
        console.print(f"{stop or 'interrupted'}. Continue with: {again}", highlight=False, markup=False, soft_wrap=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
