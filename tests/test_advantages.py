import math

import pytest
import torch

from krpo_cli.advantages import compute_advantages, grpo_advantages, krpo_advantages

# DESIGN reference values (G = 12), rewards in sampled order.
ONE_THEN_ZEROS = [0.0995, -7.0481, -5.7514, -4.9725, -4.4365, -4.0368, -3.7227, -3.4663, -3.2509, -3.0659, -2.9042, -2.7607]
ZEROS_THEN_ONE = [0.0] * 11 + [31.0079]
ALL_ONES = [0.0995, 0.0705, 0.0575, 0.0497, 0.0444, 0.0404, 0.0372, 0.0347, 0.0325, 0.0307, 0.0290, 0.0276]


def reference_krpo(rewards, q=1e-5, r=1e-2, x=0.0, p=1.0, eps=1e-8):
    """The filter written out reward by reward, the way the paper states it."""
    out = []
    for reward in rewards:
        p_prior = p + q
        k = p_prior / (p_prior + r)
        x = x + k * (reward - x)
        p = (1 - k) * p_prior
        out.append((reward - x) / (p + eps) ** 0.5)
    return out


@pytest.mark.parametrize(
    "rewards, expected",
    [([1.0] + [0.0] * 11, ONE_THEN_ZEROS), ([0.0] * 11 + [1.0], ZEROS_THEN_ONE), ([1.0] * 12, ALL_ONES)],
)
def test_krpo_matches_reference_values(rewards, expected):
    got = krpo_advantages(torch.tensor([rewards]))[0]
    # The table is rounded to 4 decimals; compare to that rounding (≤ 1e-4 relative on the big ones).
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=6e-5)


def test_krpo_groups_are_independent_and_vectorised():
    rewards = torch.tensor([[1.0] + [0.0] * 11, [0.0] * 11 + [1.0], [1.0] * 12])
    batched = krpo_advantages(rewards)
    for row in range(3):
        alone = krpo_advantages(rewards[row : row + 1])[0]
        assert torch.equal(batched[row], alone)


def test_krpo_equals_reward_by_reward_loop_on_random_rewards():
    torch.manual_seed(0)
    rewards = torch.rand(5, 7, dtype=torch.float64)
    got = krpo_advantages(rewards, process_noise=1e-3, measurement_noise=0.5, init_mean=0.2, init_var=2.0)
    for row in range(5):
        expected = reference_krpo(rewards[row].tolist(), q=1e-3, r=0.5, x=0.2, p=2.0)
        assert got[row].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("group_size", [1, 2, 12])
@pytest.mark.parametrize("starts", ["one", "per_group"])
def test_the_shared_gain_product_equals_the_filter_step_by_step(group_size, starts, monkeypatch):
    """With one P₀ and a fixed R the filter is an affine map of the rewards: same advantages and end states."""
    from krpo_cli import advantages
    from krpo_cli.advantages import _filter_step_by_step, _filter_with_shared_gains

    torch.manual_seed(1)
    monkeypatch.setattr(advantages, "ROWS_PER_BLOCK", 128)  # several blocks, the last one short
    rewards = torch.rand(300, group_size, dtype=torch.float64)
    estimate = torch.full((300,), 0.3, dtype=torch.float64) if starts == "one" else torch.randn(300, dtype=torch.float64)
    shared = _filter_with_shared_gains(rewards, estimate, 0.7, 1e-3, 0.05, 1e-8, torch.float64)
    stepwise = _filter_step_by_step(rewards, estimate, torch.full((300,), 0.7, dtype=torch.float64), 1e-3, 0.05, 1e-8,
                                    adaptive=False)
    for ours, theirs in zip(shared, stepwise):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert shared[0].abs().max() > 0.1  # not a comparison of zeros


def test_krpo_is_order_dependent_and_does_not_sum_to_zero():
    a = krpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    b = krpo_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert not torch.allclose(a.sort().values, b.sort().values)
    assert abs(float(a.sum())) > 1.0


def test_krpo_keeps_dtype_and_rejects_bad_shapes():
    assert krpo_advantages(torch.zeros(2, 3, dtype=torch.float32)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        krpo_advantages(torch.zeros(12))
    with pytest.raises(ValueError, match="floating"):
        krpo_advantages(torch.zeros(2, 3, dtype=torch.long))


def test_grpo_hand_computed():
    # rewards 1, 0, 0, 0: mean 0.25, Bessel std sqrt(0.75/3) = 0.5
    got = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert got[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-6)


def test_grpo_all_equal_group_is_zero_not_nan():
    got = grpo_advantages(torch.ones(3, 5))
    assert torch.equal(got, torch.zeros(3, 5))


def test_compute_advantages_dispatch():
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    assert torch.equal(compute_advantages(rewards, "grpo"), grpo_advantages(rewards))
    assert torch.equal(compute_advantages(rewards, "krpo", measurement_noise=0.1), krpo_advantages(rewards, measurement_noise=0.1))
    with pytest.raises(ValueError, match="unknown"):
        compute_advantages(rewards, "ppo")


def test_grpo_all_equal_nonzero_rewards_are_exactly_zero_in_float32():
    # 0.01 ("tags but wrong") is common; its float32 group mean is off by an ulp, which ε would blow up.
    rewards = torch.full((4, 12), 0.01, dtype=torch.float32)
    assert torch.equal(grpo_advantages(rewards), torch.zeros(4, 12))


def test_dr_grpo_and_rloo_hand_computed():
    from krpo_cli.advantages import dr_grpo_advantages, rloo_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert dr_grpo_advantages(rewards)[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # leave-one-out: the others' mean is 0 for the first, 1/3 for each of the rest
    assert rloo_advantages(rewards)[0].tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert torch.equal(compute_advantages(rewards, "rloo"), rloo_advantages(rewards))
    assert torch.equal(compute_advantages(rewards, "dr_grpo"), dr_grpo_advantages(rewards))


def test_krpo_sorted_order_reads_ascending_rewards_and_returns_sampled_positions():
    sampled = torch.tensor([[1.0, 0.0, 0.0]])
    got = krpo_advantages(sampled, order="sorted")
    ascending = krpo_advantages(torch.tensor([[0.0, 0.0, 1.0]]))  # what the filter reads
    assert got[0].tolist() == pytest.approx([ascending[0, 2].item(), ascending[0, 0].item(), ascending[0, 1].item()])
    # the order of the input no longer matters
    assert torch.allclose(krpo_advantages(torch.tensor([[0.0, 1.0, 0.0]]), order="sorted")[0, 1], got[0, 0])


def test_krpo_shuffled_order_is_a_seeded_permutation():
    torch.manual_seed(3)
    rewards = (torch.rand(6, 5) < 0.5).float()
    got = krpo_advantages(rewards, order="shuffled", generator=torch.Generator().manual_seed(11))
    keys = torch.rand(6, 5, generator=torch.Generator().manual_seed(11))
    for g in range(6):
        perm = torch.argsort(keys[g])
        expected = reference_krpo(rewards[g, perm].tolist())
        assert got[g, perm].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    again = krpo_advantages(rewards, order="shuffled", generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, again)


def test_krpo_adaptive_noise_hand_computed():
    # rewards 1, 0, 1 with Q = 0, R floor 0.01. The first two rewards use R = 0.01 (fewer than two
    # rewards read before them); the third uses the sample variance of (1, 0) = 0.5.
    got = krpo_advantages(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), process_noise=0.0, adaptive=True)[0]
    k1 = 1 / 1.01
    x1, p1 = k1, (1 - k1)
    k2 = p1 / (p1 + 0.01)
    x2, p2 = x1 + k2 * (0 - x1), (1 - k2) * p1
    k3 = p2 / (p2 + 0.5)
    x3, p3 = x2 + k3 * (1 - x2), (1 - k3) * p2
    expected = [(1 - x1) / math.sqrt(p1 + 1e-8), (0 - x2) / math.sqrt(p2 + 1e-8), (1 - x3) / math.sqrt(p3 + 1e-8)]
    assert got.tolist() == pytest.approx(expected, rel=1e-9)
    fixed = krpo_advantages(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), process_noise=0.0)[0]
    assert got[:2].tolist() == pytest.approx(fixed[:2].tolist()) and got[2] != pytest.approx(fixed[2].item())
    # an all-equal group has zero spread: the floor keeps R at measurement_noise, same as the paper
    ones = torch.ones(1, 6)
    assert torch.equal(krpo_advantages(ones, adaptive=True), krpo_advantages(ones))


# --- ε placement, GRPO's own ε, groups of equal rewards -----------------------------------------------

from krpo_cli.advantages import equal_reward_groups, kalman_filter, rows_to_train  # noqa: E402


@pytest.mark.parametrize("shared_gains", [True, False])
def test_eps_placement_std_divides_by_sqrt_p_plus_eps(shared_gains):
    # Q = 0, R = 1, x̂₀ = 0, P₀ = 1, reward 1: K = 0.5, x̂ = 0.5, P = 0.5; ε = 0.5 to make the placements differ.
    # variance: 0.5 / sqrt(0.5 + 0.5) = 0.5; std (the paper's code): 0.5 / (sqrt(0.5) + 0.5) = 0.414214
    rewards = torch.tensor([[1.0], [1.0]])
    variances = torch.tensor([1.0, 1.0]) if shared_gains else torch.tensor([1.0, 1.0 + 1e-12])  # unequal P₀: step by step
    settings = dict(process_noise=0.0, measurement_noise=1.0, eps=0.5)
    inside, _, _ = kalman_filter(rewards, torch.zeros(2), variances, **settings)
    outside, _, _ = kalman_filter(rewards, torch.zeros(2), variances, eps_placement="std", **settings)
    assert inside.flatten().tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    assert outside.flatten().tolist() == pytest.approx([0.5 / (0.5**0.5 + 0.5)] * 2, rel=1e-6)
    assert outside[0, 0].item() == pytest.approx(0.414214, abs=1e-6)


def test_eps_placement_reaches_krpo_advantages_and_barely_matters_at_the_default_eps():
    rewards = torch.tensor([[1.0] + [0.0] * 11])
    paper_code = krpo_advantages(rewards, eps_placement="std")
    assert paper_code[0].tolist() == pytest.approx(ONE_THEN_ZEROS, abs=1e-4)
    assert not torch.equal(paper_code, krpo_advantages(rewards))
    with pytest.raises(ValueError):
        krpo_advantages(rewards, eps_placement="outside")


def test_grpo_takes_its_own_eps():
    rewards = torch.tensor([[0.0, 1.0]])  # mean 0.5, std (Bessel) √0.5 = 0.7071
    assert compute_advantages(rewards, "grpo", grpo_eps=1.0)[0].tolist() == pytest.approx([-0.5 / 1.7071068, 0.5 / 1.7071068])
    # the filter's eps no longer reaches GRPO
    assert compute_advantages(rewards, "grpo", eps=1.0)[0].tolist() == pytest.approx([-0.7071068, 0.7071068], rel=1e-6)


def test_equal_reward_groups_and_the_rows_left_to_train():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert equal_reward_groups(rewards).tolist() == [True, False, True, False]
    assert rows_to_train(rewards, False).tolist() == list(range(12))
    assert rows_to_train(rewards, True).tolist() == [3, 4, 5, 9, 10, 11]
