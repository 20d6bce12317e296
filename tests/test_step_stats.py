import math

import pytest
import torch

from krpo_cli.step_stats import batch_reward_std, clip_ratios, group_reward_std, length_stats, truncated_fraction


def test_reward_std_is_the_mean_of_the_groups_stds_not_the_batch_std():
    groups = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # group stds (Bessel): √0.5 = 0.7071 and 0 → mean 0.35355; all four rewards together: std of 0,1,1,1 = 0.5
    assert group_reward_std(groups) == pytest.approx(0.5**0.5 / 2)
    assert batch_reward_std(groups.flatten()) == pytest.approx(0.5)
    assert batch_reward_std(torch.tensor([3.0])) == 0.0


def test_truncated_fraction_counts_completions_without_eos():
    assert truncated_fraction(torch.tensor([True, False, True, True])) == 0.25


def test_clip_ratios_are_shares_of_the_trained_tokens():
    assert clip_ratios(1.0, 3.0, 8.0) == {"clip_ratio_low": 0.125, "clip_ratio_high": 0.375, "clip_ratio_region": 0.5}
    assert all(math.isnan(v) for v in clip_ratios(0.0, 0.0, 0.0).values())


def test_length_stats():
    assert length_stats(torch.tensor([3.0, 8.0, 1.0, 4.0])) == {
        "completion_len_min": 1.0, "completion_len_mean": 4.0, "completion_len_max": 8.0
    }
