"""Learning-rate schedules: transformers' get_scheduler, by train.lr_scheduler and the warm-up keys."""

import math

import pytest
import torch

from krpo_cli.config import Recipe, TrainSettings
from krpo_cli.train import make_scheduler, optimizer_steps
from conftest import tiny_recipe


def rates(settings: dict, total: int) -> list[float]:
    """The factor of the learning rate at each of `total` optimizer steps."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainSettings(**settings), total)
    factors = []
    for _ in range(total):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_the_default_is_a_constant_rate():
    assert rates({}, 4) == [1.0, 1.0, 1.0, 1.0]


def test_warmup_steps_alone_warm_up_then_stay_constant():
    # transformers: update k of the warm-up uses k / warmup_steps (the first one 0), then 1.
    assert rates({"warmup_steps": 4}, 6) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert rates({"warmup_steps": 4, "lr_scheduler": "constant_with_warmup"}, 6) == rates({"warmup_steps": 4}, 6)


def test_linear_decays_to_zero_after_the_warmup():
    # 2 warm-up steps of 6: 0, 1/2, then (6 - k) / 4 for k = 2 … 5.
    assert rates({"lr_scheduler": "linear", "warmup_steps": 2}, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_cosine_by_warmup_ratio_hand_computed():
    # ratio 0.1 of 10 steps: ceil(1.0) = 1 warm-up step; then 0.5 (1 + cos(pi (k - 1) / 9)).
    got = rates({"lr_scheduler": "cosine", "warmup_ratio": 0.1}, 10)
    assert got == pytest.approx([0.0] + [0.5 * (1 + math.cos(math.pi * (k - 1) / 9)) for k in range(1, 10)])
    assert got[1] == 1.0 and got[5] == pytest.approx(0.5 * (1 + math.cos(4 * math.pi / 9)))
    # 0.15 of 10 rounds up to 2 warm-up steps, as transformers' Trainer rounds it
    assert rates({"lr_scheduler": "cosine", "warmup_ratio": 0.15}, 10)[:3] == pytest.approx([0.0, 0.5, 1.0])


def test_optimizer_steps_of_a_run(tmp_path, tiny_model_dir):
    # tiny recipe: 2 prompts × G 4 = 8 completions a step, minibatches of 3 → 3 updates, × 2 epochs, × 5 steps
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 5, "minibatch_size": 3, "epochs_per_batch": 2})
    )
    assert optimizer_steps(recipe) == 30


def test_warmup_given_two_ways_is_refused():
    with pytest.raises(ValueError, match="train.warmup_steps and train.warmup_ratio"):
        TrainSettings(warmup_steps=2, warmup_ratio=0.1)
