"""Loading a recipe: the file (read by recipe_yaml), key=value overrides, validation against the
schema in config.py with every problem reported at once, and warnings for keys that have no effect.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from krpo_cli.config import RECIPES_DIR, AlgorithmSettings, Recipe, RecipeError, TrainSettings, minibatch_problem
from krpo_cli.recipe_yaml import RefusedYAML, load_yaml, yaml_problem

_TABLE_KEYS = ("path", "config", "train_split", "test_split", "test_size", "split_seed", "question_field",
               "answer_field", "answer_format", "messages_field")


def ineffective_keys(recipe: Recipe) -> list[str]:
    """Keys the recipe sets (in its file or an override) that its other settings make inert, each as
    'key (why)': krpo warns of them rather than ignore them silently."""
    data, kalman, advantage = recipe.data, recipe.algorithm.kalman, recipe.algorithm.advantage
    found = []
    if data.source in ("arithmetic", "digits"):  # built-in sets: no file, no fields, their own test split
        found += [f"data.{key} (data.source is {data.source})" for key in _TABLE_KEYS if key in data.model_fields_set]
    if data.source != "arithmetic" and "difficulty" in data.model_fields_set:
        found.append(f"data.difficulty (only data.source: arithmetic has difficulties; it is {data.source})")
    if advantage != "krpo":  # (a scope other than group is an error there, not a warning)
        inert = [key for key in kalman.model_fields_set if key != "scope"]
        found += [f"algorithm.kalman.{key} (algorithm.advantage is {advantage}, not krpo)" for key in sorted(inert)]
    found += _inert_algorithm_keys(recipe.algorithm)
    reward = recipe.reward
    if reward.graders and "grader" in reward.model_fields_set and reward.grader != type(reward)().grader:
        found.append("reward.grader (reward.graders is set and replaces it)")
    return found


def _inert_algorithm_keys(algorithm) -> list[str]:
    """algorithm.* keys (outside kalman) that the algorithm's other settings make inert."""
    given, found = algorithm.model_fields_set, []
    if "grpo_eps" in given and algorithm.advantage != "grpo":
        found.append(f"algorithm.grpo_eps (algorithm.advantage is {algorithm.advantage}, not grpo)")
    if "clip_eps" in given and algorithm.clip_eps_low is not None and algorithm.clip_eps_high is not None:
        found.append("algorithm.clip_eps (algorithm.clip_eps_low and clip_eps_high are both set)")
    return found


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for key in path:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        known = _known_keys(Recipe, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean '{'.'.join(loc[:-1] + (hint[0],))}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return message
    found = repr(error.get("input"))
    if len(found) > 80:  # a wrong value may be a whole list or mapping: quote its start
        found = found[:77] + "…"
    return f"{key}: {message} (found {found})"


def _validate(raw: Any, source: str, overrides: list[str] = ()) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, found {type(raw).__name__}"], source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_attribute(_describe(e), e, overrides) for e in err.errors()]
        raise RecipeError(problems + _cross_section_problems(raw, problems, overrides), source) from None


def _cross_section_problems(raw: dict, problems: list[str], overrides: list[str]) -> list[str]:
    """Checks across sections, which pydantic skips once any key is invalid: all mistakes are reported at once."""
    def only(section: str, keys: tuple) -> dict:  # the keys the check reads; the section's others may be invalid
        given = raw.get(section)
        return {key: given[key] for key in keys if key in given} if isinstance(given, dict) else {}

    try:
        problem = minibatch_problem(
            TrainSettings.model_validate(only("train", ("minibatch_size", "prompts_per_step"))),
            AlgorithmSettings.model_validate(only("algorithm", ("group_size",))),
        )
    except ValidationError:
        return []  # one of those keys is itself invalid, and reported
    if not problem:
        return []
    problem = _attribute(problem, {"loc": (), "type": "value_error"}, overrides)
    return [problem] if problem not in problems else []


def _attribute(problem: str, error: dict, overrides: list[str]) -> str:
    """`problem`, saying which command-line override set the key, when one did."""
    # A check across keys has no location; its message starts with the key it blames.
    key = ".".join(str(p) for p in error["loc"]) or re.match(r"[\w.]*", problem).group()
    for item in reversed(overrides):  # of two overrides of one key the last is the one merged
        overridden = item.partition("=")[0]
        shown = item if item.isprintable() else repr(item)[1:-1]  # a newline in a value would make two lines
        shown = shown if len(shown) <= 80 else shown[:77] + "…"  # the value may be long: the key is what matters
        if key == overridden or key.startswith(overridden + "."):
            return f"{problem}, set on the command line by '{shown}'"
        if error["type"] == "extra_forbidden" and overridden.startswith(key + "."):  # `trian.steps=3`
            return f"{problem}, set on the command line by '{shown}'"
    return problem


def resolve_recipe_path(name: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (`quickstart` → krpo_cli/recipes/quickstart.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file() and not path.suffix:
        return shipped
    shipped_names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.stem, shipped_names, n=1) if not path.suffix or path.suffix == ".yaml" else []
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise RecipeError([f"no recipe file '{name}' ({hint}shipped recipes: {', '.join(shipped_names) or 'none'})"], name)


def _annotation_at(path: list[str]) -> Any:
    """The type of the recipe key at `path` (['run', 'name'] → str); None for an unknown key."""
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if depth == len(path) - 1:
            return field.annotation
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


def _text_key(annotation: Any) -> tuple[bool, bool]:
    """Whether a key takes text (str, or a choice of words), and whether it may also be null."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    words = [o for o in options if o is not type(None)]
    text = bool(words) and all(
        o is str or (get_origin(o) is Literal and all(isinstance(v, str) for v in get_args(o))) for o in words
    )
    return text, len(words) < len(options)


def _override_value(path: list[str], value: str) -> Any:
    """The value of one `key=value` override.

    A key that takes text gets the text as written (run.name=2024-01-01, data.system_prompt=Think: then
    answer); quotes around it are removed as YAML would, and null clears a key that may be null. Any
    other key gets the YAML value (numbers, true/false, [lists], {mappings}).
    """
    text, nullable = _text_key(_annotation_at(path))
    if text:
        if nullable and value.strip() in ("null", "Null", "NULL", "~"):
            return None
        if value[:1] in ("'", '"'):
            try:
                quoted = load_yaml(value)
            except yaml.YAMLError:
                return value
            return quoted if isinstance(quoted, str) else value
        return value
    if not value.strip():
        return ""
    try:
        return load_yaml(value)
    except RefusedYAML:
        raise  # parse_overrides reports it
    except yaml.YAMLError:
        return value  # not YAML: the text as written, which the key's type then accepts or refuses


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings → nested dict; values typed by the key they set (see _override_value)."""
    nested: dict = {}
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override '{item}' is not of the form key.path=value")
            continue
        try:
            parsed = _override_value(key.split("."), value)
        except RefusedYAML as err:
            shown = item if len(item) <= 60 else item[:57] + "…"
            problems.append(f"override '{shown}': {yaml_problem(err)}")
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override '{item}' conflicts with another override")
                break
        else:
            node[parts[-1]] = parsed
    if problems:
        raise RecipeError(problems, "overrides")
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(name: str, overrides: list[str] | None = None) -> tuple[Recipe, str]:
    """Load, override and validate a recipe. Returns the recipe and its text as written."""
    path = resolve_recipe_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([f"cannot read the recipe: {err}"], str(path)) from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {yaml_problem(err)}"], str(path)) from None
    if raw is None:  # nothing but blank lines and comments: not a recipe of every default by mistake
        raise RecipeError(["the recipe file is empty; write at least one key (krpo recipes --keys lists them)"], str(path))
    if overrides:
        if raw is not None and not isinstance(raw, dict):
            return _validate(raw, str(path)), text
        raw = _merge(raw or {}, parse_overrides(overrides))
    return _validate(raw, str(path), overrides or []), text


def apply_overrides(recipe: Recipe, overrides: list[str], source: str) -> Recipe:
    """A recipe krpo already holds (e.g. a run's, for `krpo eval`) with key=value overrides merged on,
    validated as a recipe file with those overrides would be; the keys it set stay the keys it set."""
    if not overrides:
        return recipe
    raw = _merge(recipe.model_dump(mode="json", exclude_unset=True), parse_overrides(overrides))
    return _validate(raw, source, overrides)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
