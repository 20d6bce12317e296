"""Where `krpo eval` writes its results, and when it may.

An eval folder holds results.json, samples.jsonl and krpo's marker (krpo_cli/run_dir.py). krpo eval
writes only into a folder that does not exist yet, an empty one, or an earlier eval's: never into
a run directory (its samples.jsonl is the training log), a checkpoint, an adapter or a model.

The default folder names what was evaluated (krpo_cli/evaluate.py resolve_target): `eval`,
`eval-base` or `eval+ADAPTER`, then `-with-RECIPE` for --recipe and `-on-DATA` for --data or a
split other than test. Each results.json records the evaluation's key, everything that decides
its figures (`evaluation_key`). The same evaluation run again replaces its results; another one
in a folder that holds results is refused, unless --overwrite says to replace them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from krpo_cli.errors import KrpoError
from krpo_cli.run_dir import EVAL_KIND, EVAL_RESULTS, check_own_output, read_marker, write_marker

if TYPE_CHECKING:
    from krpo_cli.evaluate import EvalTarget

# Keys of results.json written before it recorded the evaluation's key: the top level, then settings.
_EARLIER_KEYS = ("model", "adapter", "dataset")
_EARLIER_SETTINGS = ("samples", "max_new_tokens", "seed")


class EvalOutputError(KrpoError):
    """The eval output folder cannot take these results."""


def output_suffix(recipe: str | None, data: str | None, split: str = "test") -> str:
    """What a default eval folder's name adds for --recipe, --data and --split:
    (None, None) → '', ('gsm8k', 'mine.jsonl') → '-with-gsm8k-on-mine', (None, None, 'train') → '-on-train'."""
    suffix = f"-with-{Path(recipe).stem}" if recipe else ""
    on = [Path(data).stem] if data else []
    if split != "test":
        on.append(split)
    return suffix + (f"-on-{'-'.join(on)}" if on else "")


def evaluation_key(target: "EvalTarget", dataset: str, limit: int | None, samples: int, max_new_tokens: int | None) -> dict:
    """Everything that decides an evaluation's figures: model, adapter, data, questions, decoding,
    and a digest of the recipe's prompt, grader and data settings."""
    recipe = target.recipe
    gen = recipe.generation
    settings = {
        "data": recipe.data.model_dump(mode="json", exclude={"train_split", "max_samples"}),
        "reward": recipe.reward.model_dump(mode="json"),
        "model": recipe.model.model_dump(mode="json", include={"quantization", "dtype"}),
        "sampling": [gen.temperature, gen.top_p, gen.top_k] if samples else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model": target.model,
        "adapter": str(target.adapter) if target.adapter else None,
        "dataset": dataset,
        "limit": limit,
        "samples": samples,
        "max_new_tokens": max_new_tokens or gen.max_new_tokens,
        "seed": recipe.run.seed,
        "recipe_settings": digest,
    }


def recorded_key(results: dict) -> dict:
    """The key of an earlier results.json; one written before krpo recorded keys gives what it has."""
    if isinstance(results.get("evaluation"), dict):
        return results["evaluation"]
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    return {name: results[name] for name in _EARLIER_KEYS if name in results} | {
        name: settings[name] for name in _EARLIER_SETTINGS if name in settings
    }


def _same(old, new) -> bool:
    """Equal values; a path given two ways (relative, absolute) is the same path."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and os.path.exists(new):
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def key_differences(old: dict, new: dict) -> list[str]:
    """The names whose values differ between two keys (a name one of them lacks is not compared)."""
    return [name for name in new if name in old and not _same(old[name], new[name])]


def check_eval_output(folder: Path, key: dict, overwrite: bool) -> None:
    """Refuses a folder krpo eval may not write into, or whose results.json another evaluation wrote
    (without `overwrite`); both before any model loads."""
    check_own_output(folder, EVAL_KIND, "choose another --output (a new or empty folder)")
    results = folder / EVAL_RESULTS
    if overwrite or not results.is_file():
        return
    try:
        earlier = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    differing = key_differences(recorded_key(earlier), key) if isinstance(earlier, dict) else ["unreadable"]
    if differing:
        raise EvalOutputError(
            f"'{results}' holds the results of another evaluation (it differs in {', '.join(differing)}); "
            "pass --output DIR to keep both, or --overwrite to replace them"
        )


def mark_eval_folder(folder: Path) -> None:
    """Marks an eval folder as krpo's (once)."""
    if read_marker(folder).get("kind") != EVAL_KIND:
        write_marker(folder, EVAL_KIND)
