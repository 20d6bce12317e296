"""The `krpo` command line: parse, delegate to one function per command, map errors to exit codes.

Mistakes a user can make (a bad recipe, a missing file, a model that cannot load) are
printed as one message and exit with code 2, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from krpo_cli import __version__

app = typer.Typer(
    name="krpo",
    help="Fine-tune small LLMs for reasoning with KRPO (GRPO with a Kalman-filter baseline) and LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Write the built-in datasets as JSONL.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors() -> tuple[type[Exception], ...]:
    from krpo_cli.config import RecipeError
    from krpo_cli.data import DataError
    from krpo_cli.models import ModelError
    from krpo_cli.train import RunDirError

    return RecipeError, DataError, ModelError, RunDirError


def report(err: Exception) -> None:
    from krpo_cli.config import RecipeError

    if isinstance(err, RecipeError):
        lines = [f"{err.source}: {len(err.problems)} problem(s)"] + [f"  - {p}" for p in err.problems]
        fail("\n".join(lines))
    fail(str(err))


def version_callback(value: bool) -> None:
    if value:
        console.print(f"krpo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    pass


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe (e.g. quickstart).")],
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. train.learning_rate=1e-5.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty run directory.")] = False,
) -> None:
    """Train a LoRA adapter with KRPO (or GRPO) as a recipe describes."""
    from krpo_cli.config import load_recipe
    from krpo_cli.train import train as run_training

    try:
        loaded, text = load_recipe(recipe, overrides or [])
        run_training(loaded, text, overwrite=overwrite, console=console)
    except user_errors() as err:
        report(err)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.")] = None,
) -> None:
    """Check a recipe without loading a model."""
    from krpo_cli.config import load_recipe

    try:
        load_recipe(recipe, overrides or [])
    except user_errors() as err:
        report(err)
    console.print(f"{recipe}: ok")


@data_app.command("arithmetic")
def data_arithmetic(
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    difficulty: Annotated[str, typer.Option(help="easy, normal or hard (hard is every row).")] = "hard",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default: standard output).")] = None,
) -> None:
    """Write the paper's arithmetic dataset (seed 42) as JSONL."""
    from krpo_cli.arithmetic import arithmetic_split, write_jsonl

    try:
        rows = arithmetic_split(split, difficulty)
    except ValueError as err:
        fail(str(err))
    if out is None:
        write_jsonl(rows, sys.stdout)
        sys.stdout.flush()
        return
    try:
        with out.open("w", encoding="utf-8", newline="\n") as f:
            write_jsonl(rows, f)
    except OSError as err:
        fail(f"cannot write '{out}': {err.strerror or err}")
    errors.print(f"wrote {len(rows):,} rows to {out}", highlight=False)
