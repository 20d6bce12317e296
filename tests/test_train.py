"""Integration: the real loop on a tiny random model (no download)."""

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from krpo_cli import train as train_module
from krpo_cli import update as update_module
from krpo_cli.config import Recipe
from krpo_cli.rewards import Grade
from conftest import read_jsonl, tiny_recipe


def varied_grader(completion: str, reference: str) -> Grade:
    """A random model never answers right; this reward still varies between samples."""
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, completion[:3])


@pytest.fixture
def captured(monkeypatch):
    """Run the real loop, but keep a handle on the model it trained."""
    holder = {}
    real_load = train_module.load_policy

    def load_and_keep(*args, **kwargs):
        holder["loaded"] = real_load(*args, **kwargs)
        return holder["loaded"]

    monkeypatch.setattr(train_module, "load_policy", load_and_keep)
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)
    return holder


@pytest.mark.parametrize("estimator", ["krpo", "grpo", "dr_grpo", "rloo"])
def test_two_steps_change_lora_not_base(tmp_path, tiny_model_dir, captured, estimator):
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, algorithm={"advantage": estimator}))
    run_dir = train_module.train(recipe, "# test\n")
    model = captured["loaded"].model

    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=captured["loaded"].dtype)
    base_state = base.state_dict()
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(param.detach(), base_state[key]), f"base weight {key} changed"

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["reward_mean"] <= 1.0 and 0.0 <= m["frac_zero_std"] <= 1.0
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["kl"] >= 0
        assert m["completion_len_mean"] > 0 and m["step_seconds"] > 0 and m["tokens_per_s"] > 0
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 4 and {"question", "answer", "completion", "reward"} <= samples[0].keys()

    # The saved adapter is standard PEFT and reproduces the trained model.
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_several_optimizer_steps_per_rollout_batch(tmp_path, tiny_model_dir, captured):
    """minibatch < rollout and 2 epochs: 4 optimizer steps per rollout, old log-probs kept from the rollout."""
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1, "minibatch_size": 4, "epochs_per_batch": 2, "micro_batch_size": 2})
    )
    run_dir = train_module.train(recipe)
    (metrics,) = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics["skipped_updates"] == 0 and math.isfinite(metrics["loss"])
    assert metrics["clip_frac"] > 0, "later minibatches see a moved policy (lr is large), so some ratios clip"


def test_same_seed_same_run(tmp_path, tiny_model_dir, captured):
    first = read_jsonl(train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / "a"))) / "metrics.jsonl")
    second = read_jsonl(train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / "b"))) / "metrics.jsonl")
    keys = ("reward_mean", "loss", "kl", "grad_norm", "completion_len_mean")
    assert [[m[k] for k in keys] for m in first] == [[m[k] for k in keys] for m in second]


def test_kalman_options_train_and_are_recorded(tmp_path, tiny_model_dir, captured):
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path, algorithm={"kalman": {"order": "shuffled", "adaptive": True}})
    )
    run_dir = train_module.train(recipe)
    assert "order: shuffled" in (run_dir / "recipe.yaml").read_text()
    assert all(math.isfinite(m["loss"]) for m in read_jsonl(run_dir / "metrics.jsonl"))


def test_auto_micro_batch_budgets_tokens_on_cpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert update_module.auto_micro_batch(16, 156, cpu) == 640 // 156 == 4
    assert update_module.auto_micro_batch(16, 10_000, cpu) == 1  # never zero rows
    assert update_module.auto_micro_batch(3, 20, cpu) == 3  # never more than the minibatch
    assert update_module.auto_micro_batch(16, 156, gpu) == 16
    assert update_module.auto_micro_batch(16, 156, cpu, update_module.CPU_TOKENS_PER_FIXED_BATCH) == 8
    assert update_module.auto_micro_batch(16, 156, gpu, update_module.CPU_TOKENS_PER_FIXED_BATCH) == 16


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_fixed_log_probs_take_twice_the_tokens_per_forward_on_cpu_unless_the_recipe_sets_it(
    tmp_path, tiny_model_dir, monkeypatch, micro_batch_size
):
    """The reference pass keeps nothing for backward: on a CPU it reads twice the update's tokens per
    forward; a recipe's train.micro_batch_size is the user's memory knob and holds for both."""
    seen = {"fixed": [], "update": []}
    real_fixed, real_log_probs = update_module.fixed_log_probs, update_module.completion_log_probs

    def fixed(run, rollout, micro_batch):
        seen["fixed"].append(micro_batch)
        return real_fixed(run, rollout, micro_batch)

    def update_forward(model, sequences, *args, **kwargs):
        seen["update"].append(sequences.shape[0])
        return real_log_probs(model, sequences, *args, **kwargs)

    monkeypatch.setattr(update_module, "fixed_log_probs", fixed)
    monkeypatch.setattr(update_module, "completion_log_probs", update_forward)
    monkeypatch.setattr(update_module, "CPU_TOKENS_PER_MICRO_BATCH", 1)  # one row per update forward
    monkeypatch.setattr(update_module, "CPU_TOKENS_PER_FIXED_BATCH", 10**6)  # the whole minibatch
    train_section = {"steps": 1, "prompts_per_step": 2, "minibatch_size": 8, "micro_batch_size": micro_batch_size}
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, train=train_section,
                                               algorithm={"group_size": 4, "kl_beta": 0.04}))
    train_module.train(recipe)
    if micro_batch_size is None:
        assert seen["fixed"] == [8] and set(seen["update"]) == {1}
    else:
        assert seen["fixed"] == [3] and max(seen["update"]) == 3


def test_8bit_adamw_keeps_8bit_state_that_survives_a_weights_only_round_trip(tmp_path):
    """bitsandbytes' AdamW keeps uint8 moments, descends, and resumes exactly from a checkpointed state."""
    pytest.importorskip("bitsandbytes")  # not installed on macOS
    from krpo_cli.config import TrainSettings
    from krpo_cli.train import make_optimizer

    torch.manual_seed(0)
    target = torch.randn(8, 1024)  # 8192 elements: above bitsandbytes' 4096-element floor for 8-bit state
    settings = TrainSettings(optimizer="adamw_8bit", learning_rate=0.05)

    def run(param, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            ((param - target) ** 2).mean().backward()
            optimizer.step()

    param = torch.nn.Parameter(torch.zeros(8, 1024))
    optimizer = make_optimizer([param], settings)
    start_loss = float(((param - target) ** 2).mean())
    run(param, optimizer, 20)
    assert optimizer.state[param]["state1"].dtype == torch.uint8
    assert float(((param - target) ** 2).mean()) < 0.5 * start_loss

    torch.save(optimizer.state_dict(), tmp_path / "state.pt")
    copy = torch.nn.Parameter(param.detach().clone())
    restored = make_optimizer([copy], settings)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    run(param, optimizer, 3)
    run(copy, restored, 3)
    assert torch.equal(param, copy)


def test_the_logged_lr_is_the_one_the_step_trained_with(tmp_path, tiny_model_dir, captured):
    # Linear warm-up over 4 updates, one update a step (minibatch = rollout): as in transformers, update k
    # (from 0) uses k/4 of the rate, so step s trains with (s - 1)/4 of it (it once logged the next step's).
    train = {"steps": 2, "prompts_per_step": 2, "minibatch_size": 8, "learning_rate": 1e-4, "warmup_steps": 4}
    run_dir = train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, train=train)))
    assert [m["lr"] for m in read_jsonl(run_dir / "metrics.jsonl")] == pytest.approx([0.0, 2.5e-5])


@pytest.mark.parametrize(
    "algorithm",
    [
        {"loss_aggregation": "token"},
        {"loss_aggregation": "constant"},
        {"clip_eps_low": 0.1, "clip_eps_high": 0.28},
        {"importance_ratio": "sequence"},
        {"mask_eos": True},
        {"skip_equal_reward_groups": True},
        {"kalman": {"eps_placement": "std"}},
        {"advantage": "grpo", "grpo_eps": 1e-6},
    ],
    ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()),
)
def test_each_loss_option_trains(tmp_path, tiny_model_dir, captured, algorithm):
    """One step of 2 epochs × 2 minibatches, so that ratios move away from 1 and clipping can happen."""
    train = {"steps": 1, "minibatch_size": 4, "epochs_per_batch": 2, "micro_batch_size": 2}
    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, algorithm=algorithm, train=train))
    (metrics,) = read_jsonl(train_module.train(recipe) / "metrics.jsonl")
    assert math.isfinite(metrics["loss"]) and metrics["skipped_updates"] == 0
    assert 0.0 <= metrics["clip_ratio_region"] <= 1.0
    assert metrics["clip_ratio_region"] == pytest.approx(metrics["clip_ratio_low"] + metrics["clip_ratio_high"])
    assert metrics["completion_len_min"] <= metrics["completion_len_mean"] <= metrics["completion_len_max"]
    assert 0.0 <= metrics["clipped_ratio"] <= 1.0 and metrics["reward_std"] >= 0 and metrics["reward_std_batch"] >= 0


def first_loss(tmp_path, tiny_model_dir, name, **algorithm):
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path / name, algorithm=algorithm, train={"steps": 1})
    )
    return read_jsonl(train_module.train(recipe) / "metrics.jsonl")[0]["loss"]


def test_dr_grpo_aggregates_over_a_constant_by_default(tmp_path, tiny_model_dir, captured):
    """advantage: dr_grpo is Dr. GRPO's advantage and its loss: loss_aggregation auto means constant."""
    auto = first_loss(tmp_path, tiny_model_dir, "auto", advantage="dr_grpo")
    constant = first_loss(tmp_path, tiny_model_dir, "constant", advantage="dr_grpo", loss_aggregation="constant")
    sequence = first_loss(tmp_path, tiny_model_dir, "sequence", advantage="dr_grpo", loss_aggregation="sequence")
    assert auto == constant and auto != sequence


def test_skipping_equal_reward_groups_leaves_them_out_of_the_update(tmp_path, tiny_model_dir, captured, monkeypatch):
    """Every completion rewarded 1: KRPO's advantages are small and positive, so the adapter moves;
    skipping the (all-equal) groups leaves nothing to train on."""
    monkeypatch.setattr(train_module, "get_grader", lambda name: lambda completion, reference: Grade(1.0, True, True, ""))

    def lora_moved(name, skip):
        recipe = Recipe.model_validate(tiny_recipe(
            tiny_model_dir, tmp_path / name, algorithm={"skip_equal_reward_groups": skip}, train={"steps": 1}
        ))
        metrics = read_jsonl(train_module.train(recipe) / "metrics.jsonl")[0]
        moved = any(p.abs().max() > 0 for n, p in captured["loaded"].model.named_parameters() if "lora_B" in n)
        return moved, metrics

    moved, metrics = lora_moved("kept", False)
    assert moved and math.isfinite(metrics["loss"])
    moved, metrics = lora_moved("skipped", True)
    assert not moved and math.isnan(metrics["loss"]) and math.isnan(metrics["kl"]) and metrics["frac_zero_std"] == 1.0
