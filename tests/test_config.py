from pathlib import Path

import pytest

from krpo_cli.config import RECIPES_DIR, Recipe, RecipeError, load_recipe, parse_overrides
from conftest import write_recipe


def recipe_error(tmp_path: Path, recipe, overrides=None) -> RecipeError:
    path = tmp_path / "r.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe, encoding="utf-8")
    else:
        write_recipe(path, recipe)
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path), overrides)
    return info.value


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    recipe, text = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert text.startswith("#"), "every shipped recipe starts with a comment header"


def test_shipped_recipe_by_name():
    recipe, _ = load_recipe("quickstart")
    assert recipe.run.name == "quickstart"


def test_paper_recipes_hold_the_paper_settings():
    for difficulty in ("easy", "normal", "hard"):
        recipe, _ = load_recipe(f"arithmetic-{difficulty}")
        assert recipe.data.difficulty == difficulty
        assert (recipe.algorithm.group_size, recipe.train.prompts_per_step, recipe.train.minibatch_size) == (12, 32, 16)
        assert (recipe.algorithm.clip_eps, recipe.algorithm.kl_beta) == (0.2, 0.01)
        assert (recipe.generation.temperature, recipe.generation.top_p, recipe.generation.max_new_tokens) == (1.0, 1.0, 1024)
        assert (recipe.algorithm.kalman.process_noise, recipe.algorithm.kalman.measurement_noise) == (1e-5, 1e-2)
        assert recipe.train.epochs_per_batch == 1 and recipe.run.seed == 42


def test_unknown_key_suggests_the_right_one(tmp_path):
    err = recipe_error(tmp_path, {"algorithm": {"kalman": {"measurment_noise": 0.1}}})
    assert err.problems == [
        "algorithm.kalman.measurment_noise: unknown key (did you mean 'algorithm.kalman.measurement_noise'?)"
    ]


def test_all_mistakes_reported_together(tmp_path):
    err = recipe_error(
        tmp_path,
        {"algorithm": {"group_size": 1, "kalman": {"measurement_noise": -1}}, "train": {"learning_rate": "fast"}, "trian": {}},
    )
    text = "\n".join(err.problems)
    assert len(err.problems) == 4
    for key in ("algorithm.group_size", "algorithm.kalman.measurement_noise", "train.learning_rate", "trian"):
        assert key in text


def test_minibatch_larger_than_rollout_is_an_error(tmp_path):
    err = recipe_error(tmp_path, {"train": {"prompts_per_step": 2, "minibatch_size": 100}, "algorithm": {"group_size": 4}})
    assert "train.minibatch_size (100) is larger than a rollout batch" in err.problems[0]


def test_minibatch_check_runs_beside_other_mistakes_and_names_its_override(tmp_path):
    # pydantic skips a model's own checks once any field is invalid; krpo still reports every mistake.
    err = recipe_error(tmp_path, {"train": {"steps": "ten", "prompts_per_step": 4}}, ["train.minibatch_size=100"])
    assert len(err.problems) == 2 and "train.steps" in err.problems[0]
    assert err.problems[1] == (
        "train.minibatch_size (100) is larger than a rollout batch (train.prompts_per_step × algorithm.group_size = 48), "
        "set on the command line by 'train.minibatch_size=100'"
    )
    err = recipe_error(tmp_path, {"train": {"steps": "ten", "minibatch_size": "big"}})
    assert len(err.problems) == 2  # an invalid minibatch_size is reported once, by its own check


@pytest.mark.parametrize("name", ["../../etc", "a/../..", "..", "", ".", "/tmp/x"])
def test_a_run_name_stays_inside_the_output_dir(tmp_path, name):
    err = recipe_error(tmp_path, {"run": {"name": name}})
    assert err.problems == [f"run.name must be a folder inside run.output_dir, without '..' (found {name!r})"]
    assert Recipe.model_validate({"run": {"name": "ablations/lr-1e-5"}}).run.name == "ablations/lr-1e-5"


def test_target_modules_from_the_command_line():
    for given, expected in [("q_proj", ["q_proj"]), ("q_proj, v_proj", ["q_proj", "v_proj"]), ("[o_proj]", ["o_proj"]),
                            ("all-linear", "all-linear"), ("ALL-LINEAR", "all-linear"), ("[all-linear]", "all-linear")]:
        recipe, _ = load_recipe("quickstart", [f"lora.target_modules={given}"])
        assert recipe.lora.target_modules == expected
    for given in (",", "[]"):
        with pytest.raises(RecipeError, match="lora.target_modules must name at least one module"):
            load_recipe("quickstart", [f"lora.target_modules={given}"])


@pytest.mark.parametrize("text", ["a: [1, 2", "- just\n- a list\n"])
def test_malformed_or_non_mapping_yaml(tmp_path, text):
    err = recipe_error(tmp_path, text)
    assert len(err.problems) == 1


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["train.learning_rate=0.5", "algorithm.advantage=grpo", "lora.target_modules=[q_proj]"]) == {
        "train": {"learning_rate": 0.5},
        "algorithm": {"advantage": "grpo"},
        "lora": {"target_modules": ["q_proj"]},
    }
    recipe, _ = load_recipe("quickstart", ["train.learning_rate=1e-5", "algorithm.advantage=grpo"])
    assert recipe.train.learning_rate == 1e-5 and recipe.algorithm.advantage == "grpo"


@pytest.mark.parametrize("override, key", [("train.learning_rat=1", "train.learning_rat"), ("algorithm.group_size=abc", "algorithm.group_size")])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert key in info.value.problems[0]


@pytest.mark.parametrize("override", ["learning_rate", "=3", "train..steps=2"])
def test_malformed_overrides(override):
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_overrides([override])


def test_missing_recipe_names_shipped_ones():
    with pytest.raises(RecipeError) as info:
        load_recipe("no-such-recipe")
    assert "quickstart" in info.value.problems[0]


def test_grader_names_and_user_specs(tmp_path):
    assert load_recipe("quickstart", ["reward.grader=math_verify"])[0].reward.grader == "math_verify"
    assert load_recipe("quickstart", ["reward.grader=my_pkg.graders:score"])[0].reward.grader == "my_pkg.graders:score"
    err = recipe_error(tmp_path, {"reward": {"grader": "answer_tag"}})
    assert "did you mean 'answer_tags'" in err.problems[0] and "reward.grader" in err.problems[0]


def test_min_new_tokens_above_max_new_tokens_is_refused():
    with pytest.raises(RecipeError, match=r"generation.min_new_tokens \(20\) is larger than generation.max_new_tokens \(16\)"):
        load_recipe("quickstart", ["generation.min_new_tokens=20"])
