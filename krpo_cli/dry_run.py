"""`krpo train --dry-run`: what a run would do, shown without doing it.

It prints the resolved recipe (every key's value, as RUN/recipe.yaml would hold it) and the first
training prompts exactly as the model would see them (the chat template applied). Only the
tokenizer is loaded, never the model's weights, and nothing is written: no run directory.
"""

from __future__ import annotations

from rich.console import Console

from krpo_cli.config import Recipe
from krpo_cli.recipe_loading import recipe_to_yaml

PROMPTS_SHOWN = 2


def dry_run(recipe: Recipe, console: Console, count: int = PROMPTS_SHOWN) -> None:
    """Print the resolved recipe and the data's first `count` training prompts, formatted."""
    from krpo_cli.data import load_rows, row_prompt
    from krpo_cli.models import load_tokenizer_only

    rows = load_rows(recipe.data, "train")[:count]
    tokenizer = load_tokenizer_only(recipe.model.name_or_path, recipe.model.trust_remote_code)
    plain = dict(highlight=False, markup=False, soft_wrap=True)
    console.print("# the resolved recipe", **plain)
    console.print(recipe_to_yaml(recipe).rstrip("\n"), **plain)
    for number, row in enumerate(rows, 1):
        console.print(f"# training prompt {number} of the first {len(rows)}, as the model sees it:", **plain)
        console.print(row_prompt(tokenizer, recipe.data, row), **plain)
    console.print("# dry run: no model weights loaded, nothing written; without --dry-run this recipe trains",
                  **plain)
