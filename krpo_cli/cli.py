"""The `krpo` command line: parse, delegate to one function per command, map errors to exit codes.

Mistakes a user can make (a bad recipe, a missing file, a model that cannot load) are
printed as one message and exit with code 2, never as a traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from krpo_cli import __version__
from krpo_cli.config import MAX_COUNT, MAX_GROUP_SIZE, MAX_NEW_TOKENS  # the recipe's bounds, for eval's options
from krpo_cli.errors import KrpoError

# Usage errors are click's ClickException, which Typer re-exports only through BadParameter (recent Typer
# versions carry their own copy of click, so `import click` would name another class).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """krpo's commands, whose usage errors (an unknown option, `--limit x`) are one line and exit 2, like
    every other mistake, instead of Typer's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `krpo` alone: the help was printed
                sys.exit(err.exit_code)
            where = getattr(err, "ctx", None)
            hint = f" (see {where.command_path} --help)" if where is not None else ""
            message = " ".join(err.format_message().split())  # click may wrap a message over lines
            errors.print(f"[bold red]error:[/] {escape(message + hint)}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            errors.print("aborted", highlight=False, markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="krpo",
    help="Fine-tune small LLMs for reasoning with KRPO (GRPO with a Kalman-filter baseline) and LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Write a built-in dataset as JSONL: arithmetic (the paper's set).", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    # escape: a message quotes user input, and "[...]" in it would be read as Rich markup and vanish
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def report(err: Exception) -> None:
    """A user's mistake (any KrpoError): its message, exit code 2."""
    from krpo_cli.config import RecipeError

    if isinstance(err, RecipeError):
        if len(err.problems) == 1:
            fail(f"{err.source}: {err.problems[0]}")
        lines = [f"{err.source}: {len(err.problems)} problems"] + [f"  - {p}" for p in err.problems]
        fail("\n".join(lines))
    fail(str(err))


def warn_ineffective(recipe) -> None:
    """A warning on stderr for each key the recipe sets that its other settings make inert."""
    from krpo_cli.recipe_loading import ineffective_keys

    for key in ineffective_keys(recipe):
        errors.print(f"warning: {key} has no effect", highlight=False, markup=False, soft_wrap=True)


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run's directory (never a folder krpo did not make).")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its latest checkpoint.")] = False,
    resume_from: Annotated[
        Optional[Path], typer.Option("--resume-from", help="Continue the run from this checkpoint directory.")
    ] = None,
    seeds: Annotated[
        Optional[str],
        typer.Option("--seeds", help="Train once per seed, e.g. 1,2,3 (runs NAME-seedN), then compare: mean ± std."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved recipe and the first two training prompts as the model "
                     "sees them, then stop: loads the tokenizer only, writes nothing."),
    ] = False,
) -> None:
    """Train a LoRA adapter with KRPO (or GRPO) as a recipe describes."""
    from krpo_cli.hub import check_hub_sources
    from krpo_cli.recipe_loading import load_recipe

    try:
        if dry_run:
            from krpo_cli.dry_run import dry_run as show_dry_run

            checked = load_recipe(recipe, overrides or [])[0]
            warn_ineffective(checked)
            show_dry_run(checked, console)
            return
        check_hub_sources(load_recipe(recipe, overrides or [])[0])  # offline and not cached: refused before torch loads
    except KrpoError as err:
        report(err)
    from krpo_cli.train import TrainingInterrupted
    from krpo_cli.train import train as run_training
    from krpo_cli.update import NumericalFailure

    if seeds is not None and resume_from is not None:
        fail("--resume-from names one checkpoint; with --seeds use --resume")
    again = shlex.join(["krpo", "train", recipe, *(overrides or []), *(["--seeds", seeds] if seeds else []), "--resume"])
    loaded = None
    try:
        if seeds is not None:
            from krpo_cli.multi_seed import train_seeds

            warn_ineffective(load_recipe(recipe, overrides or [])[0])
            train_seeds(recipe, overrides or [], seeds, overwrite=overwrite, resume=resume, console=console)
        else:
            loaded, text = load_recipe(recipe, overrides or [])
            if resume or resume_from:  # RUN/recipe.yaml of a moved or renamed run: continue it where it is now
                from krpo_cli.run_dir import follow_moved_run

                loaded = follow_moved_run(recipe, loaded, overrides or [])
            else:  # (a run's resolved recipe.yaml sets every key: its start already warned)
                warn_ineffective(loaded)
            run_training(loaded, text, overwrite=overwrite, console=console, resume=str(resume_from) if resume_from else resume)
    except TrainingInterrupted as stop:
        # soft_wrap: the command stays one line, whatever the width, so that it can be pasted
        errors.print(f"interrupted after step {stop.step}; checkpoint {stop.checkpoint}. Resume with: {again}",
                     highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # a second Ctrl+C, or one before the first step
        from krpo_cli.run_dir import list_checkpoints, run_dir_of

        if seeds is not None:
            outcome = f"the seeds' runs that wrote a checkpoint resume with: {again}"
        elif loaded is not None and list_checkpoints(run_dir_of(loaded)):
            outcome = f"the last checkpoint resumes with: {again}"
        else:
            outcome = "no checkpoint was written"
        errors.print(f"aborted; {outcome}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except NumericalFailure as err:
        fail(str(err), code=1)
    except KrpoError as err:
        report(err)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.")] = None,
) -> None:
    """Check a recipe without loading a model (a user grader's module is imported, to check it loads)."""
    from krpo_cli.recipe_loading import load_recipe
    from krpo_cli.rewards import load_grader, user_grader_specs

    try:
        loaded = load_recipe(recipe, overrides or [])[0]
        warn_ineffective(loaded)
        for spec in user_grader_specs(loaded.reward):
            load_grader(spec)
    except KrpoError as err:
        report(err)
    console.print(f"{recipe}: ok", markup=False)


@app.command()
def recipes(
    dest: Annotated[
        Optional[str], typer.Argument(help="With --copy: the file (or folder) to write; default ./NAME.yaml.")
    ] = None,
    keys: Annotated[bool, typer.Option("--keys", help="Print every recipe key with its type, default and meaning.")] = False,
    copy: Annotated[
        Optional[str], typer.Option("--copy", metavar="NAME", help="Write the shipped recipe NAME to DEST to edit.")
    ] = None,
) -> None:
    """List the shipped recipes and their files (name them without a path: krpo train quickstart)."""
    from krpo_cli.config import RECIPES_DIR, RecipeError
    from krpo_cli.recipe_docs import copy_recipe, reference_markdown, shipped_recipes

    if dest is not None and copy is None:
        fail(f"'{dest}': a destination needs --copy NAME (krpo recipes --copy quickstart {dest})")
    if keys and copy is not None:
        fail("--keys and --copy do different things; use one")
    if keys:
        sys.stdout.write(reference_markdown())
        return
    if copy is not None:
        try:
            written = copy_recipe(copy, dest or ".")
        except RecipeError as err:
            report(err)
        console.print(f"wrote {written}; edit it, then: krpo train {shlex.quote(str(written))}",
                      markup=False, highlight=False, soft_wrap=True)
        return
    from rich.table import Table

    console.print(f"shipped recipes, in {RECIPES_DIR} (copy one to edit: krpo recipes --copy NAME [DEST])",
                  markup=False, highlight=False, soft_wrap=True)
    table = Table(show_edge=False)
    table.add_column("recipe", style="bold")
    table.add_column("file", no_wrap=True)
    table.add_column("what it trains")
    for name, description in shipped_recipes():
        table.add_row(name, f"{name}.yaml", description)
    console.print(table)


@app.command("eval")
def eval_command(
    target: Annotated[str, typer.Argument(help="A run directory, or a model (hub id, directory, .gguf, embedded name).")],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="key.path=value overrides of the recipe eval uses, e.g. generation.max_new_tokens=256."),
    ] = None,
    adapter: Annotated[Optional[str], typer.Option(help="A PEFT adapter directory to apply to the model.")] = None,
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="Evaluate a run's base model alone (the baseline); not with --adapter.")
    ] = False,
    recipe: Annotated[
        Optional[str],
        typer.Option(
            help="Recipe for prompt, grader, data and generation (default: the run's; with --adapter RUN/adapter, "
            "RUN/recipe.yaml; for a merged model, the recipe saved in it; else the built-in default). A recipe "
            "read from a folder may not turn on remote code or name a user grader: see docs/security.md."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model repository's own Python code (only if you trust it).")
    ] = False,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="A local .jsonl, .json, .parquet or .csv file, or a built-in set: digits, arithmetic, "
            "arithmetic-easy, arithmetic-normal, arithmetic-hard (default: the recipe's)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of a built-in dataset: train or test.")] = "test",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most N questions.")] = None,
    samples: Annotated[
        int, typer.Option(min=0, max=MAX_GROUP_SIZE, help="Also sample K completions per question: mean@K, pass@K.")
    ] = 0,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Questions per generate call.")] = 32,
    max_new_tokens: Annotated[
        Optional[int], typer.Option(min=1, max=MAX_NEW_TOKENS, help="Longest answer (default: the recipe's).")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder for results.json and samples.jsonl. Default for a run: RUN/eval, or RUN/eval-base with "
            "--no-adapter. For a model: MODEL/eval if it is a directory, else runs/eval/NAME. An --adapter other than "
            "the run's own adds +ITS_RUN: --adapter runs/q1/adapter gives runs/eval/NAME+q1 (or RUN/eval+q1); "
            "--recipe R adds -with-R, --data D (or --split train) -on-D. A new or empty folder, or an earlier eval's."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the results of another evaluation in the output folder "
                     "(the same evaluation run again always replaces its own)."),
    ] = False,
) -> None:
    """Score a model on a dataset with the grader training uses; writes results.json and samples.jsonl (see --output)."""
    from krpo_cli.hub import check_hub_model

    try:
        check_hub_model(target)  # offline and not cached: refused before torch loads
    except KrpoError as err:
        report(err)
    from krpo_cli.evaluate import resolve_target, run_eval

    try:
        chosen = resolve_target(target, adapter, recipe, no_adapter, output, overrides or [], trust_remote_code,
                                data=data, split=split)
        run_eval(chosen, data, split, limit, samples, batch_size, max_new_tokens, console=console, overwrite=overwrite)
    except KrpoError as err:
        report(err)


@app.command("merge")
def merge_command(
    source: Annotated[Path, typer.Argument(help="A run directory or a PEFT adapter directory.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default: RUN/merged).")] = None,
    dtype: Annotated[str, typer.Option(help="Output dtype: auto (the base's), float32, bfloat16, float16.")] = "auto",
    nf4_round_trip: Annotated[
        str, typer.Option("--nf4-round-trip", help="auto (on when training used NF4), on, off.")
    ] = "auto",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check merged logits against base + adapter.")] = True,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Largest allowed |Δlogit| of the float32 merge.")] = 1e-3,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a model krpo merged earlier (never a folder krpo did not make).")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the base model repository's own Python code (only if you trust it).")
    ] = False,
) -> None:
    """Merge an adapter into a full-precision copy of its base and save a standalone model."""
    from krpo_cli.merge import merge

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"--dtype must be auto, float32, bfloat16 or float16, not '{dtype}'")
    if nf4_round_trip not in ("auto", "on", "off"):
        fail(f"--nf4-round-trip must be auto, on or off, not '{nf4_round_trip}'")
    try:
        merge(source, out, dtype, nf4_round_trip, verify, tolerance, overwrite, console=console,
              trust_remote_code=trust_remote_code)
    except KrpoError as err:
        report(err)


@app.command("compare")
def compare_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (each with a metrics.jsonl).")],
    out: Annotated[Path, typer.Option("--out", help="The PNG to write; the table goes next to it as .json.")] = Path(
        "compare.png"
    ),
    smooth: Annotated[
        str,
        typer.Option(help="EMA weight below 1 (e.g. 0.8), or a moving-average window of 2 or more points (e.g. 10); 0 or 1: none."),
    ] = "0.8",
) -> None:
    """Plot reward, accuracy and KL of several runs in one PNG and print their final and best figures."""
    from krpo_cli.compare import compare, parse_smoothing

    try:
        compare(run_dirs, out, parse_smoothing(smooth), console)
    except KrpoError as err:
        report(err)


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
    errors.print(f"wrote {len(rows):,} rows to {out}", highlight=False, markup=False)
