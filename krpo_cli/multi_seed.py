"""`krpo train RECIPE --seeds 1,2,3`: the same recipe once per seed, then mean ± std across seeds.

Each seed is an ordinary run, `<output_dir>/<name>-seed<N>`, made by adding the overrides
`run.name=<name>-seed<N>` and `run.seed=<N>` to the user's; the training loop is unchanged.
Afterwards `krpo compare` of all seeds is written to `<output_dir>/<name>-seeds.png` and its
table, with the mean and sample standard deviation of each figure, to `<name>-seeds.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from krpo_cli.compare import Smoothing, check_replaceable, compare
from krpo_cli.config import MAX_SEED, Recipe, RecipeError
from krpo_cli.recipe_loading import load_recipe


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' → [1, 2, 3]; anything else (empty items, non-integers, repeats) is a RecipeError."""
    seeds = []
    for item in text.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()) or int(item) > MAX_SEED:  # as run.seed takes: 0 .. 2**32 - 1
            raise RecipeError(
                [f"'{item}' is not a seed: a whole number from 0 to {MAX_SEED} (expected a comma list like 1,2,3)"],
                "--seeds",
            )
        seeds.append(int(item))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise RecipeError([f"seed {repeated[0]} is given twice"], "--seeds")
    return seeds


def seed_overrides(overrides: list[str], base_name: str, seed: int) -> list[str]:
    """The user's overrides plus this seed's run name and seed (later overrides win)."""
    name = json.dumps(f"{base_name}-seed{seed}")  # a JSON string is a YAML string: the name stays text
    return [*overrides, f"run.name={name}", f"run.seed={seed}"]


def seed_recipes(recipe_name: str, overrides: list[str], seeds: list[int]) -> tuple[Recipe, list[tuple[Recipe, str]]]:
    """The recipe as the user gave it, and one (recipe, text) per seed."""
    if any(item.partition("=")[0].strip() == "run.seed" for item in overrides):
        raise RecipeError(["--seeds sets run.seed; drop the run.seed override"], "overrides")
    base, _ = load_recipe(recipe_name, overrides)
    return base, [load_recipe(recipe_name, seed_overrides(overrides, base.run.name, seed)) for seed in seeds]


def train_seeds(
    recipe_name: str,
    overrides: list[str],
    seeds_text: str,
    overwrite: bool = False,
    resume: bool = False,
    console: Console | None = None,
    smoothing: Smoothing = Smoothing("ema", 0.8),
) -> dict:
    """Train once per seed; print and write the comparison with mean ± std. Returns the summary.

    With `resume`, a seed whose run directory holds a run continues from its latest checkpoint
    (a finished one only re-saves its adapter) and the others start afresh.
    """
    from krpo_cli.run_dir import check_run_dir
    from krpo_cli.train import train

    console = console or Console()
    seeds = parse_seeds(seeds_text)
    base, recipes = seed_recipes(recipe_name, overrides, seeds)
    # Refuse a used run directory before any seed trains, not after the first few.
    run_dirs = [check_run_dir(recipe, overwrite, resume) for recipe, _ in recipes]
    out = Path(base.run.output_dir) / f"{base.run.name}-seeds.png"
    check_replaceable(out, out.with_suffix(".json"))  # the summary's place, too, before hours of training
    for index, ((recipe, text), run_dir) in enumerate(zip(recipes, run_dirs), start=1):
        console.print(f"[bold]seed {recipe.run.seed}[/] ({index}/{len(seeds)}): {escape(str(run_dir))}", highlight=False,
                      soft_wrap=True)
        continue_run = resume and run_dir.is_dir() and any(run_dir.iterdir())
        train(recipe, text, overwrite=overwrite, console=console, resume=continue_run)
    return compare(run_dirs, out, smoothing, console, aggregate_runs=True)
