"""The run directory: the files of a run, finding a run, and checking one before it starts or resumes.

`krpo train` writes, and `krpo eval` and `krpo merge` read, one layout:

```
runs/<name>/
  recipe.yaml            the resolved recipe, every key's value (a resumption rewrites the keys it may change)
  recipe.original.yaml   the recipe as written
  run_info.json          what training actually used: quantization, dtype, device, model path, engine, processes
  metrics.jsonl          one line per step
  samples.jsonl          a few completions per step
  adapter/               the trained LoRA adapter (PEFT's standard files)
  checkpoints/step_NNNNNN/   adapter + resumable state (krpo_cli.checkpoint)
  checkpoints/abandoned-<time>/   what a resume from an earlier checkpoint set aside: later checkpoints, adapter, log lines
  eval/                  krpo eval's results
  merged/                krpo merge's standalone model, which keeps the recipe as krpo_recipe.yaml
  .krpo                  the marker: krpo made this folder (also in every merged model and eval folder)
```

`--overwrite` replaces only what krpo made (`check_own_output`): an empty folder, or one that
carries krpo's marker of the right kind and holds nothing but what krpo writes there. Folders
made before krpo wrote markers are recognised by their layout: a run by recipe.yaml and
run_info.json, a merged model by merge_info.json and model files, an eval folder by results.json.

An adapter is found back to its run from `RUN/adapter` or `RUN/checkpoints/step_N/adapter`:
the run's recipe holds the prompt and grader the adapter learned with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from krpo_cli import __version__
from krpo_cli.config import Recipe
from krpo_cli.recipe_loading import recipe_to_yaml
from krpo_cli.recipe_yaml import load_yaml
from krpo_cli.errors import KrpoError

RECIPE = "recipe.yaml"
RECIPE_ORIGINAL = "recipe.original.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
MERGED = "merged"
RECIPE_IN_MODEL_DIR = "krpo_recipe.yaml"  # written by `krpo merge` so a merged model keeps its prompt and grader
TENSORBOARD = "tensorboard"  # output.log_to: tensorboard
WANDB = "wandb"  # output.log_to: wandb (its local files)
WANDB_ID_FILE = "wandb_run_id.txt"
EVAL_RESULTS = "results.json"  # in an eval folder, with samples.jsonl
_STEP_DIR = re.compile(r"step_(\d{6,})")

# The marker krpo writes into every folder it makes as output: what made it, and krpo's version.
MARKER = ".krpo"
RUN_KIND, MERGED_KIND, EVAL_KIND = "run", "merged model", "eval"
_KIND_NOUN = {RUN_KIND: "a run directory", MERGED_KIND: "a merged model", EVAL_KIND: "an eval folder"}
# Every name krpo writes at the top of a run directory; an eval folder of any name is checked as one.
_RUN_LAYOUT = {MARKER, RECIPE, RECIPE_ORIGINAL, RUN_INFO, METRICS, SAMPLES, ADAPTER, CHECKPOINTS, MERGED,
               TENSORBOARD, WANDB, WANDB_ID_FILE, f"{MERGED}.tmp"}  # merged.tmp: where krpo merge once staged
# What `krpo merge` wrote before merged models carried a marker: weights, config, tokenizer, merge_info.json, the recipe.
_MERGED_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|merge_info"
    r"|model\.safetensors\.index)\.json|model(-\d+-of-\d+)?\.safetensors|merges\.txt|tokenizer\.model"
    r"|chat_template\.(jinja|json)|" + re.escape(RECIPE_IN_MODEL_DIR)
)


class RunDirError(KrpoError):
    """The run directory cannot be used as asked."""


class CheckpointError(KrpoError):
    """A checkpoint cannot be used to resume; the message says why."""


# ---------------------------------------------------------------------------------------
# Finding a run

def run_dir_of(recipe: Recipe) -> Path:
    """Where a recipe's run lives: run.output_dir/run.name."""
    return Path(recipe.run.output_dir) / recipe.run.name


def is_run_dir(path: Path) -> bool:
    """A run's directory: its recipe, and an adapter or checkpoints (or at least logged steps) from training."""
    return (path / RECIPE).is_file() and any((path / name).exists() for name in (ADAPTER, CHECKPOINTS, METRICS))


def run_adapter(run_dir: Path) -> Path:
    """The adapter a run has: RUN/adapter once training finished; for a run stopped before its end
    (interrupted, killed), the adapter of its latest complete checkpoint."""
    if (run_dir / ADAPTER).is_dir():
        return run_dir / ADAPTER
    for checkpoint in reversed(list_checkpoints(run_dir)):
        adapter = checkpoint / ADAPTER
        if (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
            return adapter
    raise RunDirError(f"the run '{run_dir}' has no adapter: it stopped before its first checkpoint was written")


def stopped_run_note(adapter: Path) -> str | None:
    """For a checkpoint's adapter of a run that has no final adapter, one line to print:
    "run stopped at step 12 of 50; using checkpoint RUN/checkpoints/step_000012"."""
    checkpoint = adapter.parent
    run_dir = checkpoint.parent.parent
    step = _STEP_DIR.fullmatch(checkpoint.name)
    if checkpoint.parent.name != CHECKPOINTS or step is None or (run_dir / ADAPTER).is_dir():
        return None
    try:
        total = load_yaml((run_dir / RECIPE).read_text(encoding="utf-8"))["train"]["steps"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        total = "?"
    return f"run stopped at step {int(step.group(1))} of {total}; using checkpoint {checkpoint}"


def run_of_adapter(adapter: Path) -> Path | None:
    """The run an adapter was trained in (RUN/adapter, or a checkpoint's RUN/checkpoints/step_N/adapter):
    its recipe holds the prompt and grader the adapter learned with."""
    holder = Path(os.path.abspath(adapter)).parent  # abspath: "." names the adapter folder; symlinks kept
    if is_run_dir(holder):
        return holder
    if holder.parent.name == CHECKPOINTS and (holder.parent.parent / RECIPE).is_file():
        return holder.parent.parent
    return None


def find_adapter(source: Path) -> tuple[Path, Path | None]:
    """(adapter directory, run directory or None) for a run directory or an adapter directory."""
    if is_run_dir(source):
        return run_adapter(source), source
    if (source / "adapter_config.json").is_file():
        return source, run_of_adapter(source)  # RUN/adapter, or a checkpoint's: its recipe and run_info
    raise RunDirError(f"'{source}' is neither a run directory (recipe.yaml + adapter/) nor a PEFT adapter directory")


def adapter_label(adapter: Path) -> str:
    """A short name for an adapter, for its default output folder: the run's name for RUN/adapter,
    RUN-step_N for a checkpoint's RUN/checkpoints/step_N/adapter, else the folder's own name."""
    folder = adapter.resolve()
    if folder.name != ADAPTER:
        return folder.name
    holder = folder.parent
    if holder.parent.name == CHECKPOINTS:
        return f"{holder.parent.parent.name}-{holder.name}"
    return holder.name


def read_run_info(run_dir: Path | None) -> dict:
    """run_info.json of a run ({} when there is no run or no file)."""
    path = run_dir / RUN_INFO if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunDirError(f"'{path}' is not valid JSON; delete it to merge without the NF4 default") from None
    return info if isinstance(info, dict) else {}


def write_run_info(run_dir: Path, info: dict) -> None:
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# What krpo made: the marker, and the only folders krpo replaces

def write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    """Marks `folder` as krpo's output of `kind` (run, merged model, eval); `files`: every name krpo wrote in it."""
    record = {"made_by": "krpo", "kind": kind, "version": __version__}
    if files is not None:
        record["files"] = sorted(files)
    (folder / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def read_marker(folder: Path) -> dict:
    """The folder's marker record ({} when it has none, or not one krpo wrote)."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("made_by") == "krpo" else {}


def _json_keys(path: Path) -> set:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(record) if isinstance(record, dict) else set()


def is_eval_folder(folder: Path) -> bool:
    """krpo eval's output: marked so, or (made before markers) holding krpo's results.json."""
    return read_marker(folder).get("kind") == EVAL_KIND or {"metrics", "settings"} <= _json_keys(folder / EVAL_RESULTS)


def _krpo_subfolder(path: Path) -> bool:
    """A folder inside a run or merged model that krpo made: an eval folder, a merge's staging folder
    (not another run: a run named inside a run, run.name=a/b, is not replaced with run a)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (read_marker(path).get("kind") in (EVAL_KIND, MERGED_KIND) or is_eval_folder(path)
            or (path.name.startswith("eval") and not any(path.iterdir())))


def _quoted(names: list[str]) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _what_it_is(folder: Path, names: list[str]) -> str:
    marker = read_marker(folder)
    if marker:
        return f"it is {_KIND_NOUN.get(marker.get('kind'), 'a folder')} krpo made"
    if (folder / RECIPE).is_file():
        return "it is a run directory"
    for name, what in (("trainer_state.pt", "a training checkpoint"), ("adapter_config.json", "a LoRA adapter"),
                       ("config.json", "a model")):
        if (folder / name).is_file():
            return f"it is {what}"
    return f"it holds {_quoted(names)}"


def not_own_output(folder: Path, kind: str) -> str | None:
    """Why the existing directory `folder` is not krpo's own output of `kind` (None when it is, or is empty).

    Own output: marked with `kind`, or made before markers (a run: recipe.yaml and krpo's run_info.json; a
    merged model: krpo's merge_info.json; an eval folder: krpo's results.json); and holding only
    names krpo writes there (a merged model: those its marker lists), or folders krpo made.
    Other files in an eval folder do not matter: krpo eval writes only its two files there.
    """
    names = sorted(path.name for path in folder.iterdir())
    if not names:
        return None
    marker = read_marker(folder)
    if kind == EVAL_KIND:
        return None if is_eval_folder(folder) else _what_it_is(folder, names)
    if marker.get("kind", kind) != kind:
        return _what_it_is(folder, names)
    if kind == RUN_KIND:
        known = marker or ((folder / RECIPE).is_file() and {"quantization", "dtype"} <= _json_keys(folder / RUN_INFO))
        allowed = _RUN_LAYOUT.__contains__
    else:
        known = marker or "merge_dtype" in _json_keys(folder / "merge_info.json")
        listed = set(marker.get("files") or ()) | {MARKER}
        allowed = listed.__contains__ if marker else lambda name: bool(_MERGED_FILE.fullmatch(name))
    if not known:
        return _what_it_is(folder, names)
    foreign = [name for name in names if not (allowed(name) or _krpo_subfolder(folder / name))]
    return f"it holds what krpo did not write there: {_quoted(foreign)}" if foreign else None


def check_own_output(folder: Path, kind: str, instead: str) -> None:
    """Refuses `folder` as the place of a new output of `kind` unless it does not exist, is empty or is
    krpo's own output of that kind (see not_own_output); `instead` says what to do."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunDirError(f"'{folder}' exists and is not a directory: {instead}")
    reason = not_own_output(folder, kind)
    if reason:
        verb = "written into" if kind == EVAL_KIND else "replaced"
        raise RunDirError(f"'{folder}' is not {_KIND_NOUN[kind]} krpo made ({reason}), so it is not {verb}: {instead}")


def enclosing_run(path: Path) -> Path | None:
    """The run directory that `path` lies inside (not `path` itself), if any."""
    for folder in path.parents:
        if is_run_dir(folder) or read_marker(folder).get("kind") == RUN_KIND:
            return folder
    return None


def remove_own_output(folder: Path, kind: str, instead: str) -> None:
    """Deletes `folder`, checked again just before (see check_own_output): krpo deletes only what it made."""
    if folder.is_symlink():
        raise RunDirError(f"'{folder}' is a symbolic link, so it is not replaced: {instead}")
    check_own_output(folder, kind, instead)
    if folder.exists():
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------
# Starting a run

def check_writable(folder: Path, what: str) -> None:
    """Refuses a folder (`what`: 'run directory', 'output directory') that cannot be made or written,
    without making it: checked before a model loads, not after."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write the {what} '{folder}': '{existing}' is not a writable directory")


def check_run_dir(recipe: Recipe, overwrite: bool, resume: bool) -> Path:
    """The run directory, refused early (before any loading) if it holds another run."""
    run_dir = run_dir_of(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory '{run_dir}' exists and is not a directory")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        check_own_output(run_dir, RUN_KIND, NOT_A_RUN_HINT)  # a folder that is not a run is never replaced
        if not overwrite:
            raise RunDirError(
                f"run directory '{run_dir}' is not empty; pass --resume to continue it or --overwrite to replace it"
            )
    return run_dir


NOT_A_RUN_HINT = "choose another run.name or run.output_dir, or remove the folder yourself"


def prepare_run_dir(run_dir: Path, recipe: Recipe, recipe_text: str) -> Path:
    """Create the run directory (replacing an old run, checked again) and mark it as krpo's; save the
    recipe as written and as resolved."""
    try:
        if run_dir.exists() and any(run_dir.iterdir()):
            remove_own_output(run_dir, RUN_KIND, NOT_A_RUN_HINT)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, RUN_KIND)
        save_resolved_recipe(run_dir, recipe)
        (run_dir / RECIPE_ORIGINAL).write_text(recipe_text, encoding="utf-8")
    except OSError as err:
        raise RunDirError(f"cannot write the run directory '{run_dir}': {err.strerror or err}") from None
    return run_dir


def save_resolved_recipe(run_dir: Path, recipe: Recipe) -> None:
    """recipe.yaml: every key's value; a resumption rewrites it with the keys it may change (train.steps, …)."""
    (run_dir / RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Resuming a run

def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Temporary directories left by a process killed while writing a checkpoint."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(run_dir: Path, resume: str | bool) -> Path:
    """The checkpoint to continue `run_dir` from: the latest, or the one named (which must be the run's own)."""
    if isinstance(resume, str) and resume:
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        if not (path / "trainer_state.pt").is_file():
            raise CheckpointError(f"'{path}' is not a krpo checkpoint (no trainer_state.pt)")
        owner = path.resolve().parent.parent
        if owner != run_dir.resolve():
            # Another run's checkpoint was made with that run's recipe and logged that run's steps.
            hint = (
                f"; to continue that run: krpo train {owner / RECIPE} --resume-from {path}"
                if (owner / RECIPE).is_file()
                else ""
            )
            raise CheckpointError(f"'{path}' is not a checkpoint of the run '{run_dir}'{hint}")
        return path
    found = list_checkpoints(run_dir)
    if not found and not (run_dir.is_dir() and any(run_dir.iterdir())):
        raise CheckpointError(f"no run to resume: '{run_dir}' does not hold one yet; run without --resume to start it")
    if not found:
        raise CheckpointError(f"no checkpoint to resume in '{run_dir}/{CHECKPOINTS}'; start over with --overwrite")
    return found[-1]


# Keys that may differ between a run and its resumption: they do not change what was computed so far
# (run.name and run.output_dir: where the run lives, after it was moved or renamed).
RESUMABLE_CHANGES = ("train.steps", "output.", "eval.", "generation.batch_size", "train.max_consecutive_skips",
                     "run.name", "run.output_dir")


def follow_moved_run(recipe_file: str, recipe: Recipe, overrides: list[str]) -> Recipe:
    """For `krpo train RUN/recipe.yaml --resume`: the run is the folder that holds that recipe.yaml, even
    when the run was moved or renamed since (its run.output_dir/run.name name the old place), unless the
    overrides set run.name or run.output_dir."""
    path = Path(recipe_file)
    if path.name != RECIPE or not (path.parent / RUN_INFO).is_file() or not list_checkpoints(path.parent):
        return recipe  # not a run's recipe.yaml beside its checkpoints
    if any(o.split("=", 1)[0].strip() in ("run.name", "run.output_dir") for o in overrides):
        return recipe
    holder = Path(os.path.abspath(path.parent))
    if os.path.abspath(run_dir_of(recipe)) == str(holder):
        return recipe
    moved = recipe.model_copy(deep=True)
    moved.run.output_dir, moved.run.name = str(holder.parent), holder.name
    return moved


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_default(dotted_key: str):
    """The default of a recipe key such as "algorithm.kalman.scope" (None if it has none)."""
    section, *path = dotted_key.split(".")
    model, field = Recipe, section
    try:
        for name in path:
            model, field = model.model_fields[field].annotation, name
        default = model.model_fields[field].get_default(call_default_factory=True)
    except (KeyError, AttributeError, TypeError):
        return None
    return default.model_dump(mode="json") if hasattr(default, "model_dump") else default


def check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """A checkpoint continues only the recipe it was made with (train.steps, output and eval may change)."""
    saved_path = run_dir / RECIPE
    try:
        raw = load_yaml(saved_path.read_text(encoding="utf-8"))
        saved = flatten(raw)
    except (OSError, yaml.YAMLError, AttributeError):
        raise CheckpointError(f"'{saved_path}' is missing or unreadable; cannot check the checkpoint's recipe") from None
    try:  # read as krpo reads recipes now: a relative data.path saved by an older krpo is made absolute
        saved = flatten(Recipe.model_validate(raw).model_dump(mode="json"))
    except ValidationError:
        pass  # e.g. a key krpo no longer has: compared as saved, and reported as a difference
    current = flatten(recipe.model_dump(mode="json"))
    # A key the saved recipe lacks was added to krpo after the run started: it ran with the default.
    saved = {key: saved[key] if key in saved else recipe_default(key) for key in set(saved) | set(current)}
    differing = sorted(
        key for key in saved if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} → {current.get(k)!r})" for k in differing[:4])
        raise CheckpointError(
            f"the checkpoint in '{run_dir}' was made with a different recipe: {shown}; "
            f"continue the run with its own recipe: krpo train {run_dir / RECIPE} --resume "
            "(train.steps, output.* and eval.* may change)"
        )


def read_jsonl_log(path: Path) -> tuple[list[bytes], bool]:
    """A log's complete lines (bytes, without newlines) and whether an incomplete last line was dropped.

    A process killed mid-write leaves a last line that is cut short: it is dropped. A damaged line
    anywhere else is an error naming the file and the line.
    """
    lines = path.read_bytes().split(b"\n")
    torn = False
    if lines[-1]:  # no newline at the end: the last write did not finish
        try:
            json.loads(lines[-1])
        except ValueError:
            torn = True
            lines.pop()
    lines = [line for line in lines if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CheckpointError(f"'{path}' line {number} is not a logged step; repair or delete that line, then resume")
    return lines, torn


def truncate_jsonl(path: Path, last_step: int, cut_to: Path | None = None) -> str | None:
    """Drop lines written after the checkpoint (a crashed run may have logged later steps), and an
    incomplete last line; the lines dropped after the step are kept in `cut_to` when given.
    Returns a note when an incomplete last line was dropped."""
    if not path.is_file():
        return None
    lines, torn = read_jsonl_log(path)
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    cut = [line for line in lines if json.loads(line)["step"] > last_step]
    if cut_to is not None and cut:
        cut_to.write_bytes(b"".join(line + b"\n" for line in cut))
    path.write_bytes(b"".join(line + b"\n" for line in kept))
    return f"{path.name}: dropped an incomplete last line (the run was killed while writing it)" if torn else None


def set_aside_later_checkpoints(run_dir: Path, step: int, stamp: str) -> Path | None:
    """Resuming from an earlier checkpoint abandons the timeline after it: its later checkpoints and
    its adapter/ move to checkpoints/abandoned-<stamp>/, so a later --resume cannot pick them (the
    caller cuts the logs to `step`, into that folder). Returns the folder, or None when nothing was later."""
    later = [p for p in list_checkpoints(run_dir) if int(_STEP_DIR.fullmatch(p.name).group(1)) > step]
    if not later:
        return None
    aside = run_dir / CHECKPOINTS / f"abandoned-{stamp}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    if (run_dir / ADAPTER).is_dir():
        (run_dir / ADAPTER).rename(aside / ADAPTER)
    return aside


def logged_rewards(run_dir: Path) -> list[float]:
    """reward_mean of every step in metrics.jsonl, in order."""
    lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines()
    return [json.loads(line).get("reward_mean", float("nan")) for line in lines if line]
