"""`krpo eval`: score a model on a dataset with the grader that training uses as its reward.

Metrics (greedy decoding): accuracy (pass@1, full credit), mean reward, share of answers in
the expected format. With K samples per question (temperature from the recipe): mean@K (the
average share of correct samples) and pass@K (share of questions with at least one correct
sample). Accuracy is broken down by every grouping column the data has (for arithmetic:
difficulty, num_terms, num_digits).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from krpo_cli.config import Recipe
from krpo_cli.recipe_loading import apply_overrides, load_recipe
from krpo_cli.data import drop_overlong, load_eval_rows, prompt_token_budget, row_prompt
from krpo_cli.eval_output import check_eval_output, evaluation_key, mark_eval_folder, output_suffix
from krpo_cli.models import ModelError, adapter_base, load_base
from krpo_cli.rewards import grader_names, load_reward
from krpo_cli.rollout import generate_rollout
from krpo_cli.run_dir import ADAPTER, RECIPE, RECIPE_IN_MODEL_DIR, SAMPLES, adapter_label, is_run_dir, run_of_adapter
from krpo_cli.run_dir import check_writable, run_adapter, stopped_run_note
from krpo_cli.run_log import JsonlWriter, counted
from krpo_cli.trust import consent_of, refuse_folder_code

MAX_GROUP_VALUES = 30
GRADED_FIELDS = ("reference", "completion", "extracted", "reward", "correct", "formatted", "sample_correct", "sample_rewards")  # a column with more distinct values is an attribute, not a grouping


@dataclass
class EvalTarget:
    model: str  # what `model.name_or_path` accepts
    adapter: Path | None
    recipe: Recipe
    output_dir: Path
    recipe_source: str = "the default recipe"  # printed, so a user sees whose prompt and grader are used


def resolve_target(
    target: str,
    adapter: str | None,
    recipe: str | None,
    no_adapter: bool,
    output: Path | None,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
    data: str | None = None,
    split: str = "test",
) -> EvalTarget:
    """What to evaluate: a run directory (base + its adapter), or a model (+ an adapter).

    Default output folders differ for every combination of adapter, --recipe, --data and --split
    (krpo_cli/eval_output.py), so that evaluating one base with several adapters, or without one,
    or on other data, never replaces an earlier result. A recipe read from a
    folder may not run code the user did not ask for (krpo_cli/trust.py).
    """
    if no_adapter and adapter:
        raise ModelError("--no-adapter and --adapter contradict each other; choose one")
    path = Path(target)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json)")
    named = load_recipe(recipe)[0] if recipe else None
    if is_run_dir(path):
        loaded, _ = load_recipe(str(path / RECIPE))
        found = source = str(path / RECIPE)
        if named is not None:  # prompt, grader, data and generation from --recipe; the model stays the run's
            loaded, source = named.model_copy(update={"model": loaded.model}), recipe
        own = path / ADAPTER if no_adapter or adapter else run_adapter(path)  # a stopped run: its latest checkpoint's
        chosen = None if no_adapter else Path(adapter) if adapter else own
        if chosen is None:
            name = "eval-base"
        elif chosen.resolve() == own.resolve():
            name = "eval"
        else:  # another run's adapter on this run's base
            name = f"eval+{adapter_label(chosen)}"
        name += output_suffix(recipe, data, split)
        loaded = users_settings(loaded, source, found, overrides or [], trust_remote_code, named)
        return EvalTarget(loaded.model.name_or_path, chosen, loaded, output or path / name, shown(source, overrides))
    chosen = Path(adapter) if adapter else None
    adapter_run = run_of_adapter(chosen) if chosen is not None else None
    found = None
    if named is not None:
        loaded, source = named, recipe
    elif adapter_run is not None:
        found = source = str(adapter_run / RECIPE)
        loaded = load_recipe(found)[0]
    elif (path / RECIPE_IN_MODEL_DIR).is_file():
        found = source = str(path / RECIPE_IN_MODEL_DIR)
        loaded = load_recipe(found)[0]
    else:
        loaded, source = Recipe(), "the default recipe"
    loaded = users_settings(loaded, source, found, overrides or [], trust_remote_code, named)
    default_out = (path / "eval") if path.is_dir() else Path("runs") / "eval" / path.name
    if chosen is not None:
        default_out = default_out.with_name(f"{default_out.name}+{adapter_label(chosen)}")
    default_out = default_out.with_name(default_out.name + output_suffix(recipe, data, split))
    return EvalTarget(target, chosen, loaded, output or default_out, shown(source, overrides))


def users_settings(
    recipe: Recipe, source: str, found: str | None, overrides: list[str], trust_remote_code: bool, named: Recipe | None
) -> Recipe:
    """`recipe` (read from `source`) with the user's overrides and --trust-remote-code; when it was built on
    the recipe `found` in a folder, refused if that asks to run code the user did not ask for."""
    recipe = apply_overrides(recipe, overrides, source)
    if trust_remote_code:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"trust_remote_code": True})})
    if found is not None:
        refuse_folder_code(recipe, found, consent_of(trust_remote_code, overrides, named))
    return recipe


def shown(source: str, overrides: list[str] | None) -> str:
    return f"{source} with command-line overrides" if overrides else source


def load_adapter(base, adapter_dir: Path, base_name: str):
    """Base + adapter for inference; an adapter made for another base is refused by name."""
    from peft import PeftModel
    from safetensors import SafetensorError

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"the adapter file '{weights}' is missing")
    try:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (SafetensorError, OSError) as err:  # a file cut short (a full disk, an interrupted copy) or not safetensors
        detail = " ".join(str(err).split())[:120]
        raise ModelError(f"the adapter file '{weights}' is damaged (cut short or not safetensors: {detail})") from None
    except (RuntimeError, ValueError, KeyError) as err:
        trained_on = adapter_base(adapter_dir)
        arch = ",".join(getattr(base.config, "architectures", None) or [type(base).__name__])
        detail = " ".join(str(err).split())[:200]
        raise ModelError(
            f"the adapter '{adapter_dir}' (made for base '{trained_on}') does not fit the base '{base_name}' "
            f"({arch}, hidden size {getattr(base.config, 'hidden_size', '?')}): {detail}"
        ) from None


def grouping_columns(rows: list[dict]) -> list[str]:
    """Columns with a few distinct scalar values, usable to break accuracy down."""
    columns = []
    for key in rows[0]:
        if key in ("id", "question", "answer") or key in GRADED_FIELDS:
            continue
        values = {row.get(key) for row in rows}
        if all(isinstance(v, (str, int, bool)) for v in values) and 2 <= len(values) <= MAX_GROUP_VALUES:
            columns.append(key)
    return columns


@dataclass
class EvalReport:
    metrics: dict
    by_group: dict
    records: list[dict] = field(default_factory=list)


def evaluate_model(
    model,
    tokenizer,
    rows: list[dict],
    recipe: Recipe,
    samples: int = 0,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    on_batch=None,
) -> EvalReport:
    """Greedy pass@1 (and mean@K / pass@K with `samples` = K) over `rows`."""
    grader = load_reward(recipe.reward.grader, recipe.reward.graders)  # accuracy: the first grader's
    gen = recipe.generation
    max_new = max_new_tokens or gen.max_new_tokens
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [row_prompt(tokenizer, recipe.data, row) for row in batch]
        greedy = generate_rollout(model, tokenizer, prompts, 1, max_new, greedy=True, engine=gen.engine)
        sampled = None
        if samples:
            sampled = generate_rollout(
                model, tokenizer, prompts, samples, max_new, temperature=gen.temperature, top_p=gen.top_p,
                top_k=gen.top_k, batch_size=batch_size, engine=gen.engine,
            )
        for i, row in enumerate(batch):
            grade = grader(greedy.completions[i], row["answer"])
            record = {k: v for k, v in row.items() if k not in ("question", "answer")}
            record |= {
                "question": row["question"],
                "reference": row["answer"],
                "completion": greedy.completions[i],
                "extracted": grade.extracted,
                "reward": grade.reward,
                "correct": grade.correct,
                "formatted": grade.formatted,
            }
            if sampled is not None:
                sample_grades = [grader(c, row["answer"]) for c in sampled.completions[i * samples : (i + 1) * samples]]
                record["sample_correct"] = [g.correct for g in sample_grades]
                record["sample_rewards"] = [g.reward for g in sample_grades]
            records.append(record)
        if on_batch is not None:
            on_batch(len(batch))
    return EvalReport(summarise(records, samples), breakdown(records, grouping_columns(rows)), records)


def summarise(records: list[dict], samples: int = 0) -> dict:
    metrics = {
        "accuracy": statistics.fmean(r["correct"] for r in records),
        "mean_reward": statistics.fmean(r["reward"] for r in records),
        "format_rate": statistics.fmean(r["formatted"] for r in records),
        "num_questions": len(records),
    }
    if samples:
        metrics[f"mean@{samples}"] = statistics.fmean(statistics.fmean(r["sample_correct"]) for r in records)
        metrics[f"pass@{samples}"] = statistics.fmean(any(r["sample_correct"]) for r in records)
    return metrics


def breakdown(records: list[dict], columns: list[str]) -> dict:
    """{column: {value: {n, accuracy, mean_reward}}}, values sorted."""
    result = {}
    for column in columns:
        groups = defaultdict(list)
        for record in records:
            groups[record.get(column)].append(record)
        result[column] = {
            str(value): {
                "n": len(members),
                "accuracy": statistics.fmean(m["correct"] for m in members),
                "mean_reward": statistics.fmean(m["reward"] for m in members),
            }
            for value, members in sorted(groups.items(), key=lambda kv: (str(type(kv[0])), kv[0]))
        }
    return result


def run_eval(
    target: EvalTarget,
    data: str | None = None,
    split: str = "test",
    limit: int | None = None,
    samples: int = 0,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    console: Console | None = None,
    device: torch.device | None = None,
    overwrite: bool = False,
) -> EvalReport:
    """Load the model, evaluate, write results.json and samples.jsonl, print a table.

    The output folder is checked first (krpo_cli/eval_output.py): results of another evaluation
    there are replaced only with `overwrite`."""
    console = console or Console()
    started = time.perf_counter()
    recipe = target.recipe
    rows, dataset_name = load_eval_rows(data, recipe.data, split)
    if limit is not None:
        rows = rows[:limit]
    key = evaluation_key(target, dataset_name, limit, samples, max_new_tokens)
    check_eval_output(target.output_dir, key, overwrite)
    check_writable(target.output_dir, "output directory")  # before a model download, not after
    note = stopped_run_note(target.adapter) if target.adapter is not None else None
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    loaded = load_base(target.model, recipe.model.quantization, recipe.model.dtype, device, recipe.model.trust_remote_code,
                       console=console)
    model, tokenizer = loaded.model, loaded.tokenizer
    quantization, dtype, device = loaded.quantization, loaded.dtype, loaded.device
    if target.adapter is not None:
        model = load_adapter(model, target.adapter, target.model)
    model.eval()
    budget = prompt_token_budget(model, tokenizer, max_new_tokens or recipe.generation.max_new_tokens)
    rows = drop_overlong(rows, tokenizer, recipe.data, budget, dataset_name)  # a 100 KB question: skipped
    # Made once the model has loaded (a mistyped model leaves no empty folder), before the long part.
    try:
        target.output_dir.mkdir(parents=True, exist_ok=True)
        mark_eval_folder(target.output_dir)
    except OSError as err:
        raise ModelError(f"cannot write the output directory '{target.output_dir}': {err.strerror or err}") from None
    torch.manual_seed(recipe.run.seed)
    what = f"{target.model}" + (f" + adapter {target.adapter}" if target.adapter else " (no adapter)")
    where = f"{dataset_name}: {counted(len(rows), 'question')} · prompt and grader from {target.recipe_source}"
    console.print(f"[bold]krpo eval[/] {escape(what)} · {escape(where)}", highlight=False, soft_wrap=True)
    with Progress(
        TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("eval", total=len(rows))
        report = evaluate_model(
            model, tokenizer, rows, recipe, samples, batch_size, max_new_tokens,
            on_batch=lambda n: progress.advance(task, n),
        )

    settings = {"samples": samples, "max_new_tokens": max_new_tokens or recipe.generation.max_new_tokens,
                "quantization": quantization, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    results = results_record(target, report, dataset_name, len(rows), key, settings, time.perf_counter() - started)
    write_results(target.output_dir, results, report.records)
    print_report(console, report, samples)
    console.print(f"wrote {target.output_dir / 'results.json'} and samples.jsonl", highlight=False, markup=False,
                  soft_wrap=True)
    return report


def results_record(target: EvalTarget, report: EvalReport, dataset_name: str, num_questions: int, key: dict,
                   settings: dict, seconds: float) -> dict:
    """What results.json holds: the metrics, their breakdown, and what was evaluated how."""
    recipe = target.recipe
    return {
        "metrics": report.metrics,
        "by_group": report.by_group,
        "model": target.model,
        "adapter": str(target.adapter) if target.adapter else None,
        "dataset": dataset_name,
        "num_questions": num_questions,
        "evaluation": key,  # what a later eval into this folder is compared with
        "settings": {
            "grader": grader_names(recipe.reward)[0],  # the correctness grader, which accuracy counts
            **({"graders": recipe.reward.graders} if recipe.reward.graders else {}),
            "samples": settings["samples"],
            "temperature": recipe.generation.temperature if settings["samples"] else None,
            "max_new_tokens": settings["max_new_tokens"],
            "quantization": settings["quantization"],
            "dtype": settings["dtype"],
            "device": settings["device"],
            "seed": recipe.run.seed,
        },
        "seconds": round(seconds, 2),
    }


def write_results(folder: Path, results: dict, records: list[dict]) -> None:
    """results.json and samples.jsonl into `folder`; a write that fails (a full disk) is one line."""
    try:
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        writer = JsonlWriter(folder / SAMPLES, mode="w")
        for record in records:
            writer.write(record)
        writer.close()
    except OSError as err:
        raise ModelError(f"cannot write the results in '{folder}': {err.strerror or err}") from None


def print_report(console: Console, report: EvalReport, samples: int) -> None:
    table = Table(title="krpo eval", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    m = report.metrics
    table.add_row("questions", f"{m['num_questions']:,}")
    table.add_row("accuracy (greedy pass@1)", f"{m['accuracy']:.3f}")
    table.add_row("mean reward", f"{m['mean_reward']:.3f}")
    table.add_row("format rate", f"{m['format_rate']:.3f}")
    if samples:
        table.add_row(f"mean@{samples}", f"{m[f'mean@{samples}']:.3f}")
        table.add_row(f"pass@{samples}", f"{m[f'pass@{samples}']:.3f}")
    console.print(table)
    for column, groups in report.by_group.items():
        sub = Table(title=f"accuracy by {column}", show_edge=False)
        sub.add_column(column)
        sub.add_column("n", justify="right")
        sub.add_column("accuracy", justify="right")
        for value, stats in groups.items():
            sub.add_row(value, str(stats["n"]), f"{stats['accuracy']:.3f}")
        console.print(sub)

