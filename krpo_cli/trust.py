"""What may make krpo run code that is not krpo's: only you, never a folder krpo reads.

Two recipe settings run code: `model.trust_remote_code: true` runs the model repository's own
Python, and a user grader `package.module:function` imports that module. krpo obeys them only
when they come from you: the recipe file you name on the command line (`krpo train RECIPE`,
`krpo eval --recipe RECIPE`), a `key=value` override, or `--trust-remote-code`.

A recipe krpo finds in a folder — a run's `recipe.yaml`, the run an adapter belongs to, a merged
model's `krpo_recipe.yaml` — may have come with a model someone shared. Its prompt, data and
generation settings are used, but when it asks for either of those two, krpo refuses in one line
that names the option to pass if you trust it (rather than silently using another grader, which
would report a different metric).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from krpo_cli.config import Recipe, RewardSettings
from krpo_cli.errors import KrpoError
from krpo_cli.recipe_loading import parse_overrides
from krpo_cli.rewards import user_grader_specs


class UntrustedSettingError(KrpoError):
    """A recipe read from a folder asks to run code that the user did not ask for."""


@dataclass(frozen=True)
class Consent:
    """What the user's own command line (options, overrides, the recipe file they named) allows."""

    remote_code: bool = False
    graders: frozenset[str] = field(default_factory=frozenset)


def consent_of(trust_remote_code: bool, overrides: list[str], named: Recipe | None = None) -> Consent:
    """The consent given by `--trust-remote-code`, key=value overrides and a recipe file the user named.

    An override of `model.trust_remote_code` (either value) is the user's own choice; the user graders
    an override of `reward.*` names are the user's, as are those of the named recipe.
    """
    parsed = parse_overrides(overrides) if overrides else {}
    model, reward = parsed.get("model"), parsed.get("reward")
    remote = trust_remote_code or (isinstance(model, dict) and "trust_remote_code" in model)
    graders = set(user_grader_specs(named.reward)) if named is not None else set()
    if isinstance(reward, dict):
        try:
            graders |= set(user_grader_specs(RewardSettings.model_validate(reward)))
        except ValidationError:
            pass  # not a reward section by itself (it adds to the folder's): it names no grader of its own
    return Consent(remote or bool(named and named.model.trust_remote_code), frozenset(graders))


def refuse_remote_code(recipe: Recipe, source: str, consent: Consent) -> None:
    """A folder's recipe may not turn on `model.trust_remote_code` unless the user allowed it."""
    if recipe.model.trust_remote_code and not consent.remote_code:
        raise UntrustedSettingError(
            f"{source} sets model.trust_remote_code: true, which would run the model's own Python code; krpo does "
            "that only when you ask for it: if you trust the model, pass --trust-remote-code"
        )


def refuse_user_graders(recipe: Recipe, source: str, consent: Consent) -> None:
    """A folder's recipe may not make krpo import a user grader the user did not name."""
    unnamed = [spec for spec in user_grader_specs(recipe.reward) if spec not in consent.graders]
    if unnamed:
        raise UntrustedSettingError(
            f"{source} names the user grader '{unnamed[0]}', which would import and run that module; krpo does "
            f"that only when you name it: if you trust it, pass reward.grader={unnamed[0]} (or --recipe with a "
            "recipe file that names it)"
        )


def refuse_folder_code(recipe: Recipe, source: str, consent: Consent) -> None:
    """Both checks, for a recipe built on one read from a folder (`krpo eval`)."""
    refuse_remote_code(recipe, source, consent)
    refuse_user_graders(recipe, source, consent)
