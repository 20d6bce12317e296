"""Several graders, weighted (reward.graders): the summed reward, per-grader metrics, eval accuracy."""

import math
from types import SimpleNamespace

import pytest
import torch

from krpo_cli import evaluate as evaluate_module
from krpo_cli import train as train_module
from krpo_cli.config import Recipe
from krpo_cli.recipe_loading import ineffective_keys, load_recipe
from krpo_cli.rewards import (
    Grade,
    WeightedGrader,
    get_grader,
    grade_last_number,
    grade_think_format,
    load_reward,
    soft_overlong_penalty,
    user_grader_specs,
)
from conftest import read_jsonl, tiny_recipe
from test_config import recipe_error


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<think>3+4</think><answer>7</answer>", 1.0),
        ("<think>\nreasoning\n</think>\nanswer", 1.0),  # anything may follow </think>
        (" <think>a</think>", 0.0),  # must open the completion
        ("<think>a", 0.0),  # never closed
        ("<think>a</think><think>b</think>", 0.0),  # a second <think>
        ("<answer>7</answer>", 0.0),
    ],
)
def test_think_format_is_trls_format_reward(completion, reward):
    grade = grade_think_format(completion, "7")
    assert grade.reward == reward and grade.formatted == (reward == 1.0) and grade.correct is False


def test_weighted_sum_hand_computed_and_first_grader_decides_correct():
    reward = load_reward("answer_tags", {"last_number": 1.0, "think_format": 0.2})
    assert isinstance(reward, WeightedGrader) and reward.names == ["last_number", "think_format"]
    both = reward("<think>3+4</think> 7", "7")
    assert both == Grade(1.2, True, True, "7", (1.0, 1.0))
    wrong = reward("<think>3+4</think> 8", "7")
    assert wrong.reward == pytest.approx(0.2) and wrong.parts == (0.0, 1.0) and wrong.correct is False
    bare = reward("7", "7")
    assert bare.reward == 1.0 and bare.parts == (1.0, 0.0) and bare.correct is True
    penalty = load_reward("answer_tags", {"last_number": 1.0, "think_format": -0.5})("7", "7")
    assert penalty.reward == pytest.approx(1.0) and load_reward("x", {"think_format": -0.5})("7", "7").reward == 0.0


def test_one_grader_stays_the_plain_grader():
    assert load_reward("last_number", {}) is grade_last_number
    loaded = []
    load_reward("answer_tags", {"last_number": 1.0, "a.b:c": 2.0}, load=lambda spec: loaded.append(spec) or get_grader("numeric"))
    assert loaded == ["last_number", "a.b:c"]  # each grader through the loader it is given, in order


def test_recipe_keys_validation_and_the_user_graders_named():
    recipe = load_recipe("quickstart", ["reward.graders={numeric: 1.0, think_format: 0.2, my_pkg.graders:brevity: -0.1}"])[0]
    assert recipe.reward.graders == {"numeric": 1.0, "think_format": 0.2, "my_pkg.graders:brevity": -0.1}
    assert user_grader_specs(recipe.reward) == ["my_pkg.graders:brevity"]
    assert user_grader_specs(SimpleNamespace(grader="a.b:c")) == ["a.b:c"]
    assert load_recipe("quickstart")[0].reward.graders == {}  # the default: reward.grader alone


def test_unknown_grader_in_the_list_names_the_key(tmp_path):
    err = recipe_error(tmp_path, {"reward": {"graders": {"numeric": 1.0, "think_fromat": 0.2}}})
    assert "reward.graders" in err.problems[0] and "did you mean 'think_format'" in err.problems[0]
    err = recipe_error(tmp_path, {"reward": {"graders": {"numeric": ".inf"}}})
    assert "reward.graders" in err.problems[0]


def test_a_grader_set_beside_graders_is_reported_as_without_effect():
    both = load_recipe("quickstart", ["reward.grader=numeric", "reward.graders={last_number: 1.0}"])[0]
    assert any(key.startswith("reward.grader ") for key in ineffective_keys(both))
    alone = load_recipe("quickstart", ["reward.grader=numeric"])[0]
    assert not any(key.startswith("reward.grader") for key in ineffective_keys(alone))


def test_grader_metrics_hand_computed():
    metrics = train_module.grader_metrics(
        {"last_number": torch.tensor([1.0, 0.0, 1.0, 0.0]), "think_format": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    )
    assert metrics["rewards/last_number/mean"] == 0.5
    assert metrics["rewards/last_number/std"] == pytest.approx(math.sqrt(1 / 3))  # sample std: 4 × 0.25 / 3
    assert metrics["rewards/think_format/mean"] == 1.0 and metrics["rewards/think_format/std"] == 0.0
    assert train_module.grader_metrics({}) == {}


def varied(completion: str, reference: str) -> Grade:
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, None)


def test_training_sums_the_weighted_graders_and_logs_each(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(train_module, "get_grader", lambda spec: varied if spec == "fake.graders:varied" else get_grader(spec))
    graders = {"last_number": 0.5, "fake.graders:varied": 1.0}  # last_number first: the correctness grader
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, reward={"graders": graders}))
    metrics = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    for m in metrics:
        varied_mean, last_mean = m["rewards/fake.graders:varied/mean"], m["rewards/last_number/mean"]
        assert m["reward_mean"] == pytest.approx(1.0 * varied_mean + 0.5 * last_mean, abs=1e-6)
        assert m["correct_frac"] == last_mean  # last_number's reward is 1 exactly when it is correct
        assert {"rewards/fake.graders:varied/std", "rewards/last_number/std"} <= m.keys()
    assert any(m["rewards/fake.graders:varied/std"] > 0 for m in metrics)


def test_single_grader_run_logs_no_per_grader_metrics(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(train_module, "get_grader", lambda spec: varied)
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1}))
    (line,) = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    assert not [key for key in line if key.startswith("rewards/")]


def test_eval_accuracy_is_the_first_graders(monkeypatch):
    completions = ["<think>a</think> 3", "<think>b</think> 5"]  # references 3 and 4: last_number 1, 0; think 1, 1
    monkeypatch.setattr(evaluate_module, "row_prompt", lambda tokenizer, data, row: row["question"])
    monkeypatch.setattr(evaluate_module, "generate_rollout", lambda *a, **k: SimpleNamespace(completions=completions))
    rows = [{"question": "1 + 2", "answer": "3"}, {"question": "2 + 2", "answer": "4"}]

    def report(graders):
        recipe = Recipe.model_validate({"reward": {"graders": graders}})
        return evaluate_module.evaluate_model(None, None, rows, recipe).metrics

    first_correctness = report({"last_number": 1.0, "think_format": 0.5})
    assert first_correctness["accuracy"] == 0.5 and first_correctness["mean_reward"] == pytest.approx((1.5 + 0.5) / 2)
    assert report({"think_format": 0.5, "last_number": 1.0})["accuracy"] == 0.0  # a format grader is never correct


def test_soft_overlong_penalty_hand_computed():
    # 10 tokens at most, a buffer of 4: nothing up to 6 tokens, then -1/4 a token, -1 from 10.
    assert [soft_overlong_penalty(n, 10, 4) for n in (0, 6, 7, 8, 10, 11)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_the_length_penalty_is_added_to_the_reward_and_logged(tmp_path, tiny_model_dir):
    recipe = Recipe.model_validate(tiny_recipe(
        tiny_model_dir, tmp_path, train={"steps": 1}, reward={"graders": {"last_number": 1.0}, "overlong_buffer": 3},
    ))
    (m,) = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    penalty = m["rewards/soft_overlong/mean"]
    assert m["reward_mean"] == pytest.approx(m["rewards/last_number/mean"] + penalty, abs=1e-6)
    # max_new_tokens 6, buffer 3: a completion of L tokens loses max(0, L - 3) / 3, so on average at least
    # (mean length - 3) / 3, and at most 1.
    assert -1.0 <= penalty <= -(m["completion_len_mean"] - 3) / 3 + 1e-6
