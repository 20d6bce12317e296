"""algorithm.kalman.scope: prompt — one filter state per prompt, carried across steps and checkpoints."""

import pytest
import torch

from krpo_cli import train as train_module
from krpo_cli.advantages import PromptBaselines, kalman_filter, krpo_advantages, prompt_key
from krpo_cli.run_dir import list_checkpoints
from krpo_cli.config import Recipe, RecipeError
from krpo_cli.recipe_loading import load_recipe
from krpo_cli.rewards import Grade
from conftest import read_jsonl, tiny_recipe, write_recipe

# Q = 0, R = 1, x̂₀ = 0, P₀ = 1, ε = 0: round numbers by hand.
SIMPLE = {"process_noise": 0.0, "measurement_noise": 1.0, "init_mean": 0.0, "init_var": 1.0, "eps": 0.0}
TIMING_KEYS = {"tokens_per_s", "rollout_seconds", "update_seconds", "step_seconds"}


def test_second_visit_starts_from_the_first_visits_final_state():
    store = PromptBaselines()
    # Visit 1 of "a", rewards 1, 1:
    #   r=1: P⁻=1, K=1/2, x̂=1/2, P=1/2,   A=(1−1/2)/√(1/2) = 0.707107
    #   r=1: P⁻=1/2, K=1/3, x̂=2/3, P=1/3, A=(1−2/3)/√(1/3) = 0.577350      → state (2/3, 1/3)
    # "b", rewards 0, 0: x̂ stays 0, P = 1/2 then 1/3, A = 0, 0            → state (0, 1/3)
    first = store.advantages(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), ["a", "b"], **SIMPLE)
    assert first.flatten().tolist() == pytest.approx([0.707107, 0.577350, 0.0, 0.0], abs=1e-6)
    assert store.states[prompt_key("a")] == pytest.approx((2 / 3, 1 / 3))
    assert store.states[prompt_key("b")] == pytest.approx((0.0, 1 / 3))

    # "c" is new: a fresh filter on 0, 1:
    #   r=0: K=1/2, x̂=0, P=1/2, A=0;   r=1: K=1/3, x̂=1/3, P=1/3, A=(2/3)/√(1/3) = 1.154701
    # Visit 2 of "a", rewards 0, 1, from (2/3, 1/3):
    #   r=0: P⁻=1/3, K=1/4, x̂=2/3−1/6=1/2, P=1/4, A=(0−1/2)/√(1/4) = −1
    #   r=1: P⁻=1/4, K=1/5, x̂=1/2+1/10=3/5, P=1/5, A=(1−3/5)/√(1/5) = 0.894427  → state (3/5, 1/5)
    second = store.advantages(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), ["c", "a"], **SIMPLE)
    assert second.flatten().tolist() == pytest.approx([0.0, 1.154701, -1.0, 0.894427], abs=1e-6)
    assert store.states[prompt_key("a")] == pytest.approx((0.6, 0.2))
    assert store.states[prompt_key("c")] == pytest.approx((1 / 3, 1 / 3))
    assert store.states[prompt_key("b")] == pytest.approx((0.0, 1 / 3)), "a prompt not in the batch is untouched"


def test_two_visits_equal_one_filter_over_both_groups():
    """No extra noise between visits: visiting twice is reading the concatenated rewards once."""
    torch.manual_seed(0)
    rewards = torch.rand(1, 10, dtype=torch.float64)
    settings = {"process_noise": 1e-3, "measurement_noise": 0.05, "init_mean": 0.3, "init_var": 2.0}
    store = PromptBaselines()
    first = store.advantages(rewards[:, :6], ["q"], **settings)
    second = store.advantages(rewards[:, 6:], ["q"], **settings)
    whole = krpo_advantages(rewards, **settings)
    assert torch.cat([first, second], dim=1)[0].tolist() == pytest.approx(whole[0].tolist(), rel=1e-12)


def test_kalman_filter_from_the_initial_state_is_krpo_and_returns_the_final_state():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    advantages, estimate, variance = kalman_filter(rewards, torch.zeros(2), torch.ones(2))
    assert torch.equal(advantages, krpo_advantages(rewards))
    # P after three rewards does not depend on them: both groups end with the same P.
    assert variance[0] == variance[1] and estimate[0] > estimate[1] > 0
    with pytest.raises(ValueError, match="one per group"):
        kalman_filter(rewards, torch.zeros(3), torch.ones(3))


def test_same_prompt_twice_in_a_batch_both_start_from_the_stored_state():
    store = PromptBaselines()
    out = store.advantages(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), ["a", "a"], **SIMPLE)
    assert out.flatten().tolist() == pytest.approx([0.707107, 0.577350, 0.0, 0.0], abs=1e-6)
    assert store.states[prompt_key("a")] == pytest.approx((0.0, 1 / 3)), "the later group's state is kept"


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    store = PromptBaselines()
    store.advantages(torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.0]]), ["what is 2+2?", "what is 3-1?"])
    torch.save({"prompt_baselines": store.state()}, tmp_path / "state.pt")
    restored = PromptBaselines()
    restored.load_state(torch.load(tmp_path / "state.pt", weights_only=True)["prompt_baselines"])
    assert restored.states == store.states
    rewards = torch.tensor([[0.0, 1.0, 1.0]])
    assert torch.equal(restored.advantages(rewards, ["what is 3-1?"]), store.advantages(rewards, ["what is 3-1?"]))


def test_scope_prompt_with_another_estimator_is_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"algorithm": {"advantage": "grpo", "kalman": {"scope": "prompt"}}})
    with pytest.raises(RecipeError, match="needs algorithm.advantage: krpo"):
        load_recipe(str(path))
    assert Recipe.model_validate({}).algorithm.kalman.scope == "group"


def varied_grader(completion: str, reference: str) -> Grade:
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, None)


def untimed(lines):
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def test_prompt_scope_resumes_exactly_and_differs_from_group_scope(tmp_path, tiny_model_dir, monkeypatch):
    """Three training rows, two prompts per step: prompts come back from step 2 on."""
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)

    def recipe(out, steps, scope="prompt"):
        return Recipe.model_validate(
            tiny_recipe(
                tiny_model_dir, tmp_path / out, data={"max_samples": 3}, train={"steps": steps},
                algorithm={"kalman": {"scope": scope}}, output={"save_every": 2},
            )
        )

    straight = read_jsonl(train_module.train(recipe("a", 4)) / "metrics.jsonl")
    run_dir = train_module.train(recipe("b", 2))
    state = torch.load(list_checkpoints(run_dir)[-1] / "trainer_state.pt", weights_only=True)
    assert 1 <= len(state["prompt_baselines"]) <= 3
    train_module.train(recipe("b", 4), resume=True)
    assert untimed(read_jsonl(run_dir / "metrics.jsonl")) == untimed(straight)

    # By step 3 some prompt has come back, so carrying its state must change something.
    grouped = read_jsonl(train_module.train(recipe("c", 3, scope="group")) / "metrics.jsonl")
    assert straight[0]["advantage_mean"] == grouped[0]["advantage_mean"], "first visits start from (x̂₀, P₀)"
    assert [m["advantage_mean"] for m in straight[1:3]] != [m["advantage_mean"] for m in grouped[1:]]
