from pathlib import Path

import pytest
import yaml

from krpo_cli.config import RECIPES_DIR, Recipe, RecipeError
from krpo_cli.recipe_loading import load_recipe, parse_overrides
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


# Overrides: a value for a text key stays the text the user typed.
@pytest.mark.parametrize(
    "override, key, value",
    [
        ("run.name=123", ("run", "name"), "123"),
        ("run.name=2024-01-01", ("run", "name"), "2024-01-01"),
        ("run.name=yes", ("run", "name"), "yes"),
        ("run.name=null", ("run", "name"), "null"),
        ('run.name="quoted name"', ("run", "name"), "quoted name"),  # YAML quoting is still removed
        ("data.system_prompt=Think: then answer", ("data", "system_prompt"), "Think: then answer"),
        ("data.system_prompt=", ("data", "system_prompt"), ""),
        ("data.system_prompt=a=b", ("data", "system_prompt"), "a=b"),  # the key ends at the first '='
        ("run.name=true", ("run", "name"), "true"),
        ("model.name_or_path=1.5", ("model", "name_or_path"), "1.5"),
        ("data.prompt_template=Q {question} # not a comment", ("data", "prompt_template"), "Q {question} # not a comment"),
        ("data.prompt_template=[{question}]", ("data", "prompt_template"), "[{question}]"),
        ("data.config=null", ("data", "config"), None),  # a key that may be null is cleared by null
        ("data.config=2024", ("data", "config"), "2024"),
        ("output.log_to=tensorboard", ("output", "log_to"), ["tensorboard"]),
        ("output.log_to=tensorboard,wandb", ("output", "log_to"), ["tensorboard", "wandb"]),
        ("output.log_to=[wandb]", ("output", "log_to"), ["wandb"]),
        ("output.log_to=", ("output", "log_to"), []),
        ("algorithm.kalman.order=sorted", ("algorithm", "kalman", "order"), "sorted"),
    ],
)
def test_override_values_for_text_keys_stay_text(override, key, value):
    recipe, _ = load_recipe("quickstart", [override])
    found = recipe
    for part in key:
        found = getattr(found, part)
    assert found == value


def test_output_dir_expands_the_home_folder():
    recipe, _ = load_recipe("quickstart", ["run.output_dir=~/krpo-runs"])
    assert recipe.run.output_dir == str(Path.home() / "krpo-runs")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
        ("train.learning_rate=1e400", "train.learning_rate: Input should be a finite number"),
        ("algorithm.kalman.init_mean=.nan", "algorithm.kalman.init_mean: Input should be a finite number"),
        ("algorithm.kl_beta=.inf", "algorithm.kl_beta: Input should be a finite number"),
        ("generation.temperature=.inf", "generation.temperature: Input should be a finite number"),
        ("algorithm.kalman.process_noise=.inf", "algorithm.kalman.process_noise: Input should be a finite number"),
        ("data.test_size=.nan", "data.test_size: Input should be a finite number"),
        ("train.steps=true", "train.steps: expected a number, not true/false"),
        ("train.learning_rate=true", "train.learning_rate: expected a number, not true/false"),
        ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
        ("run.seed=4294967296", "run.seed: Input should be less than or equal to 4294967295"),
        ("run.seed=100000000000000000000000", "run.seed"),
        ("data.split_seed=-3", "data.split_seed"),
        ("algorithm.group_size=100000000000000000000000", "algorithm.group_size: Input should be less than or equal to 1024"),
        ("lora.r=100000000", "lora.r: Input should be less than or equal to 4096"),
        ("generation.max_new_tokens=1000000000", "generation.max_new_tokens: Input should be less than or equal to 32768"),
        ("train.prompts_per_step=1000000000", "train.prompts_per_step: Input should be less than or equal to 8192"),
        ("train.steps=100000000000", "train.steps: Input should be less than or equal to 10000000"),
    ],
)
def test_non_finite_floats_and_unbounded_integers_are_refused(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert len(info.value.problems) == 1 and message in info.value.problems[0], info.value.problems


@pytest.mark.parametrize("name", ["a\0b", "x" * 101, "a\\b", "a/", "a//b", "a\nb", "bad\udcffname"])
def test_unusable_run_names_are_refused(name):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [f"run.name={name}"])
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("run.name"), info.value.problems


def test_a_long_wrong_value_is_quoted_short():
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", ["train.steps=[" + ",".join(["1"] * 50_000) + "]"])
    assert len(info.value.problems[0]) < 300


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the recipe file is empty"),
        ("# only a comment\n\n", "the recipe file is empty"),
        ("train:\n  steps: 3\n  steps: 5\n", "line 3, column 3: key 'steps' is written twice (first at line 2)"),
        ("train: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper than 32 levels"),
        ("run: &a\n  name: *a\n", "an alias refers to the value that contains it"),
        ("data:\n  filters: &f {x: [*f]}\n", "an alias refers to the value that contains it"),
        ("a: &a [" + ",".join(['"lol"'] * 9) + "]\n"
         + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi")),
         "more than 100,000 values, counting each alias"),
    ],
    ids=["empty", "comments only", "key twice", "20000 brackets", "self alias", "self alias in a list", "alias bomb"],
)
def test_hostile_or_empty_yaml_is_one_problem(tmp_path, text, message):
    err = recipe_error(tmp_path, text)  # must finish: no hang, no RecursionError
    assert len(err.problems) == 1 and message in err.problems[0], err.problems


def test_aliases_and_merge_keys_within_limits_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "train: &t\n  steps: 3\n  prompts_per_step: 2\n  minibatch_size: 4\n"
        "run:\n  name: alias\n"
        "lora:\n  target_modules: &m [q_proj, v_proj]\n",
        encoding="utf-8",
    )
    recipe, _ = load_recipe(str(path))
    assert recipe.train.steps == 3 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    merged = tmp_path / "m.yaml"
    merged.write_text("algorithm: {group_size: 4}\ntrain:\n  <<: {steps: 3, prompts_per_step: 2, minibatch_size: 4}\n  steps: 5\n", encoding="utf-8")
    assert load_recipe(str(merged))[0].train.steps == 5  # a merge key's value is overridden, not written twice


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.filters.x=" + "[" * 20_000 + "]" * 20_000, "nested deeper than 32 levels"),
        ("run.name=caf\udce9", "run.name: is not valid Unicode text"),  # invalid UTF-8 in argv
        ("data.system_prompt=a\0b", "data.system_prompt: contains a NUL character"),
    ],
    ids=["deep override", "surrogate override", "NUL override"],
)
def test_hostile_override_values_are_one_problem(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert len(info.value.problems) == 1 and message in info.value.problems[0], info.value.problems


def test_keys_without_effect_are_named():
    from krpo_cli.recipe_loading import ineffective_keys

    assert ineffective_keys(load_recipe("quickstart")[0]) == []
    found = ineffective_keys(load_recipe("quickstart", ["data.path=x.jsonl", "data.difficulty=hard"])[0])
    assert found == ["data.path (data.source is digits)",
                     "data.difficulty (only data.source: arithmetic has difficulties; it is digits)"]
    # GRPO's ε is algorithm.grpo_eps: the filter's eps, like every kalman key, is inert for grpo
    grpo = ["algorithm.advantage=grpo", "algorithm.kalman.eps=1e-6", "algorithm.grpo_eps=1e-6"]
    assert ineffective_keys(load_recipe("quickstart", grpo)[0]) == ["algorithm.kalman.eps (algorithm.advantage is grpo, not krpo)"]
    krpo = ["algorithm.grpo_eps=1e-6", "algorithm.clip_eps=0.1", "algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.28"]
    assert ineffective_keys(load_recipe("quickstart", krpo)[0]) == [
        "algorithm.grpo_eps (algorithm.advantage is krpo, not grpo)",
        "algorithm.clip_eps (algorithm.clip_eps_low and clip_eps_high are both set)",
    ]


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_set_no_key_without_effect(path):
    from krpo_cli.recipe_loading import ineffective_keys

    assert ineffective_keys(load_recipe(str(path))[0]) == []


def test_recipe_yaml_builds_no_python_objects(tmp_path):
    """The recipe reader is a SafeLoader: a tag that would call os.system is an error, and nothing runs."""
    from krpo_cli.recipe_yaml import RecipeLoader, load_yaml

    assert issubclass(RecipeLoader, yaml.SafeLoader)
    marker = tmp_path / "ran"
    with pytest.raises(yaml.YAMLError, match="python/object"):
        load_yaml(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()
    assert load_yaml("run: {name: x}\n") == {"run": {"name": "x"}}


def test_the_arithmetic_system_prompt_is_the_paper_codes_word_for_word():
    """The KRPO paper's released code (train.py and eval.py): two line breaks inside, one at the end."""
    from krpo_cli.config import PAPER_SYSTEM_PROMPT, DataSettings

    paper = (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think>\n<answer> answer here </answer>\n"
    )
    assert PAPER_SYSTEM_PROMPT == paper and DataSettings().system_prompt == paper
    assert load_recipe("arithmetic-normal")[0].data.system_prompt == paper


def test_the_paper_recipe_sets_the_paper_codes_choices():
    recipe = load_recipe("paper")[0]
    alg = recipe.algorithm
    assert (alg.advantage, alg.group_size, alg.clip_range, alg.kl_beta, alg.aggregation) == ("krpo", 12, (0.2, 0.2), 0.01, "sequence")
    assert alg.mask_eos and alg.kalman.eps_placement == "std"
    assert (recipe.train.steps, recipe.train.prompts_per_step, recipe.train.minibatch_size) == (1870, 32, 16)
    assert recipe.train.learning_rate == 5e-6 and recipe.generation.top_k == 50
    assert recipe.model.name_or_path == "meta-llama/Llama-3.2-1B-Instruct" and recipe.data.difficulty == "normal"
