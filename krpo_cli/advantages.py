"""Advantage estimators: pure tensor math, no model and no I/O.

Every estimator takes rewards of shape (num_groups, G) — one row per prompt, the G
rewards of its completions in the order they were sampled — and returns advantages of
the same shape.

KRPO (arXiv 2505.07527) replaces GRPO's group mean and standard deviation with a 1-D
Kalman filter's posterior mean and variance. For each group a fresh filter starts at
x̂ = init_mean, P = init_var and reads the group's rewards in sampled order:

    P⁻ = P + Q            K = P⁻ / (P⁻ + R)
    x̂  = x̂ + K (r − x̂)    P = (1 − K) P⁻
    A  = (r − x̂) / sqrt(P + ε)

(`eps_placement: std` divides by sqrt(P) + ε instead, as the paper's released code does.)
The advantage uses the posterior after r was absorbed. K and P do not depend on the
rewards, so the advantages are order dependent, do not sum to zero and are about ten
times GRPO's scale; an all-correct group gets small positive advantages.

With `kalman.scope: prompt` (PromptBaselines) the filter of a prompt that comes back starts
from the (x̂, P) its previous group left instead of (init_mean, init_var).
"""

from __future__ import annotations

import hashlib

import torch


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (num_groups, group_size), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")


def reading_order(rewards: torch.Tensor, order: str = "sampled", generator: torch.Generator | None = None) -> torch.Tensor:
    """Per group, the positions in the order the filter reads them: (num_groups, G) indices.

    sampled: as generated; sorted: ascending reward (ties keep sampled order); shuffled: a
    random permutation per group drawn from `generator`.
    """
    num_groups, group_size = rewards.shape
    if order == "sampled":
        return torch.arange(group_size, device=rewards.device).expand(num_groups, group_size)
    if order == "sorted":
        return torch.sort(rewards, dim=1, stable=True).indices
    if order == "shuffled":
        keys = torch.rand(num_groups, group_size, generator=generator).to(rewards.device)
        return torch.argsort(keys, dim=1)
    raise ValueError(f"unknown kalman order {order!r}; expected sampled, shuffled or sorted")


def kalman_filter(
    rewards: torch.Tensor,
    init_estimate: torch.Tensor,
    init_variance: torch.Tensor,
    process_noise: float = 1e-5,
    measurement_noise: float = 1e-2,
    eps: float = 1e-8,
    order: str = "sampled",
    adaptive: bool = False,
    generator: torch.Generator | None = None,
    eps_placement: str = "variance",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Kalman filter per group, each started from its own (x̂₀, P₀).

    `init_estimate` and `init_variance` have shape (num_groups,). Returns the advantages (in
    sampled positions, the rewards' dtype) and each filter's final x̂ and P (float64), after
    the group's last reward: the state that `kalman.scope: prompt` carries to the next visit.
    The other arguments are krpo_advantages'.
    """
    _check_rewards(rewards)
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError(f"unknown eps placement {eps_placement!r}; expected one of {', '.join(EPS_PLACEMENTS)}")
    r = rewards  # in reading order
    if order != "sampled":
        index = reading_order(rewards, order, generator)
        r = rewards.gather(1, index)
    num_groups = r.shape[0]
    estimate = init_estimate.to(device=r.device, dtype=torch.float64)
    variance = init_variance.to(device=r.device, dtype=torch.float64)
    if estimate.shape != (num_groups,) or variance.shape != (num_groups,):
        raise ValueError(f"initial states must have shape ({num_groups},), one per group")
    if not adaptive and num_groups > 0 and bool((variance == variance[0]).all()):
        advantages, estimate, variance = _filter_with_shared_gains(
            r, estimate, float(variance[0]), process_noise, measurement_noise, eps, rewards.dtype, eps_placement
        )
    else:
        advantages, estimate, variance = _filter_step_by_step(
            r.to(torch.float64), estimate, variance, process_noise, measurement_noise, eps, adaptive, eps_placement
        )
    if order != "sampled":
        advantages = torch.empty_like(advantages).scatter_(1, index, advantages)
    return advantages.to(rewards.dtype), estimate, variance


EPS_PLACEMENTS = ("variance", "std")


def advantage_scale(variance, eps: float, eps_placement: str = "variance"):
    """The divisor of KRPO's advantage: sqrt(P + ε) (`variance`, krpo's default) or sqrt(P) + ε
    (`std`, the paper's released code). `variance`: a float or a float64 tensor."""
    if eps_placement == "std":
        return variance**0.5 + eps
    return (variance + eps) ** 0.5


def _filter_step_by_step(r, estimate, variance, process_noise, measurement_noise, eps, adaptive, eps_placement="variance"):
    """The filter reward by reward (vectorised across groups): rewards `r` (float64) in reading
    order, each group from its own (x̂₀, P₀). Returns advantages in reading order, final x̂ and P."""
    num_groups, group_size = r.shape
    noise = torch.full((num_groups,), float(measurement_noise), dtype=torch.float64, device=r.device)
    advantages = torch.empty_like(r)
    for i in range(group_size):
        if adaptive and i >= 2:
            noise = r[:, :i].var(dim=1, unbiased=True).clamp(min=measurement_noise)
        prior_variance = variance + process_noise
        gain = prior_variance / (prior_variance + noise)
        estimate = estimate + gain * (r[:, i] - estimate)
        variance = (1.0 - gain) * prior_variance
        if eps_placement == "variance":
            advantages[:, i] = (r[:, i] - estimate) / (variance + eps).sqrt()
        else:
            advantages[:, i] = (r[:, i] - estimate) / advantage_scale(variance, eps, eps_placement)
    return advantages, estimate, variance


ROWS_PER_BLOCK = 4096


def _filter_with_shared_gains(r, estimate, init_variance: float, process_noise, measurement_noise, eps, out_dtype,
                              eps_placement="variance"):
    """The same filter when every group starts from one P₀ and R is fixed (krpo_advantages' case).

    The gains K_i and variances P_i then do not depend on the rewards or the group, so each
    estimate is an affine function of its group's rewards, x̂_i = a_i·x̂₀ + Σ_{j≤i} W_ji·r_j, with
    a_i = Π_{m≤i}(1 − K_m) and W_ji = K_j·Π_{j<m≤i}(1 − K_m). Every group's advantages
    (r_i − x̂_i)/√(P_i + ε) are then one (groups × G)·(G × G) product in float64: the
    step-by-step filter's values up to float64 rounding. `r`: rewards in reading order;
    advantages come back in `out_dtype`, the final estimates and variances in float64.
    """
    group_size = r.shape[1]
    weights = [[0.0] * group_size for _ in range(group_size)]  # W[j][i]
    decay, scales, variance = [], [], init_variance
    for i in range(group_size):
        prior = variance + process_noise
        gain = prior / (prior + measurement_noise)
        variance = (1.0 - gain) * prior
        for j in range(i):
            weights[j][i] = (1.0 - gain) * weights[j][i - 1]
        weights[i][i] = gain
        decay.append((1.0 - gain) * (decay[-1] if decay else 1.0))  # a_i
        scales.append(1.0 / advantage_scale(variance, eps, eps_placement))
    # advantages = r·M − x̂₀·c with M_ji = (δ_ji − W_ji)·s_i and c_i = a_i·s_i
    to_advantages = torch.tensor([[((j == i) - weights[j][i]) * scales[i] for i in range(group_size)]
                                  for j in range(group_size)], dtype=torch.float64, device=r.device)
    from_start = torch.tensor([a * s for a, s in zip(decay, scales)], dtype=torch.float64, device=r.device)
    last_weights = torch.tensor([row[-1] for row in weights], dtype=torch.float64, device=r.device)
    shared_offset = None  # one x̂₀ for every group (krpo_advantages): a bias row, not a matrix
    if bool((estimate == estimate[0]).all()):
        shared_offset = from_start * -float(estimate[0])
    advantages = torch.empty(r.shape, dtype=out_dtype, device=r.device)
    final_estimate = estimate * decay[-1]
    # Blocks of rows keep the float64 temporaries small enough to be reused by the allocator
    # rather than fresh pages each call, whose faults cost more than the product itself
    # (measured, 100k groups: 10 ms in one block, 2.6 ms in blocks of 4096; smaller blocks
    # pay more per-op overhead than they save).
    for start in range(0, r.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        block = r[rows].to(torch.float64)
        offset = shared_offset if shared_offset is not None else estimate[rows, None] * -from_start
        advantages[rows] = torch.addmm(offset, block, to_advantages)
        final_estimate[rows] += block @ last_weights
    return advantages, final_estimate, torch.full_like(estimate, variance)


def krpo_advantages(
    rewards: torch.Tensor,
    process_noise: float = 1e-5,
    measurement_noise: float = 1e-2,
    init_mean: float = 0.0,
    init_var: float = 1.0,
    eps: float = 1e-8,
    order: str = "sampled",
    adaptive: bool = False,
    generator: torch.Generator | None = None,
    eps_placement: str = "variance",
) -> torch.Tensor:
    """KRPO advantages: one Kalman filter per group, rewards read in sampled order.

    Vectorised across groups: K and P are the same for every group here, so all groups'
    advantages are one product with a G × G matrix (`_filter_with_shared_gains`). Computed
    in float64 so that the tiny posterior variances stay accurate, then cast back to the
    rewards' dtype.

    Options beyond the paper (off by default): `order` changes the order in which a
    group's rewards enter the filter (advantages are returned in sampled positions);
    `adaptive` replaces the fixed R, for the i-th reward, by the sample variance of the
    i−1 rewards the filter has already read (once there are at least two), never below
    `measurement_noise`; `eps_placement: std` divides by sqrt(P) + ε (the paper's code) instead of
    sqrt(P + ε).
    """
    _check_rewards(rewards)
    num_groups = rewards.shape[0]
    advantages, _, _ = kalman_filter(
        rewards,
        torch.full((num_groups,), float(init_mean), dtype=torch.float64),
        torch.full((num_groups,), float(init_var), dtype=torch.float64),
        process_noise=process_noise,
        measurement_noise=measurement_noise,
        eps=eps,
        order=order,
        adaptive=adaptive,
        generator=generator,
        eps_placement=eps_placement,
    )
    return advantages


def prompt_key(question: str) -> str:
    """A short stable id of a prompt for PromptBaselines: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


class PromptBaselines:
    """`kalman.scope: prompt`: one filter state (x̂, P) per prompt, kept across steps and epochs.

    A prompt seen for the first time starts at (init_mean, init_var); a prompt seen before starts
    from the state its previous group left, unchanged (no extra process noise for the time
    between visits: Q is added before each reward, as always). The state is plain floats and
    strings, so it can be saved in a checkpoint loaded with torch.load(weights_only=True).
    """

    def __init__(self):
        self.states: dict[str, tuple[float, float]] = {}

    def advantages(
        self,
        rewards: torch.Tensor,
        questions: list[str],
        init_mean: float = 0.0,
        init_var: float = 1.0,
        generator: torch.Generator | None = None,
        **filter_settings,
    ) -> torch.Tensor:
        """KRPO advantages for rewards (num_groups, G) of these questions, one per row; stores
        each prompt's final state. A question twice in one batch: both groups start from the
        stored state and the later one's final state is kept."""
        if len(questions) != rewards.shape[0]:
            raise ValueError(f"{len(questions)} questions for {rewards.shape[0]} groups of rewards")
        keys = [prompt_key(q) for q in questions]
        starts = [self.states.get(key, (float(init_mean), float(init_var))) for key in keys]
        advantages, estimates, variances = kalman_filter(
            rewards,
            torch.tensor([x for x, _ in starts], dtype=torch.float64),
            torch.tensor([p for _, p in starts], dtype=torch.float64),
            generator=generator,
            **filter_settings,
        )
        for key, x, p in zip(keys, estimates.tolist(), variances.tolist()):
            self.states[key] = (x, p)
        return advantages

    def state(self) -> dict[str, list[float]]:
        return {key: [x, p] for key, (x, p) in self.states.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.states = {key: (float(x), float(p)) for key, (x, p) in state.items()}


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """GRPO advantages: (r − group mean) / (group std + ε), std with Bessel's correction.

    A group whose rewards are all equal gets zero advantages (never NaN).
    """
    _check_rewards(rewards)
    if rewards.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 completions per group")
    r = rewards.to(torch.float64)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    advantages = (r - mean) / (std + eps)
    # In floating point the mean of equal rewards can differ from them by an ulp, which ε would
    # then blow up; a group with no spread carries no signal.
    all_equal = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)
    return advantages.masked_fill(all_equal, 0.0).to(rewards.dtype)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's advantages: r − group mean, without dividing by the std."""
    _check_rewards(rewards)
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: r_i − mean of the other G−1 rewards of the group."""
    _check_rewards(rewards)
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per group")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - others


def equal_reward_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(num_groups,) bool: the groups whose rewards are all equal (GRPO gives them zero advantages;
    KRPO does not: an all-correct group's are small and positive)."""
    _check_rewards(rewards)
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def rows_to_train(rewards: torch.Tensor, skip_equal_reward_groups: bool) -> torch.Tensor:
    """The row numbers (i·G + j) the update trains on: all of them, or, with
    `skip_equal_reward_groups`, those of the groups whose rewards are not all equal."""
    num_groups, group_size = rewards.shape
    rows = torch.arange(num_groups * group_size)
    if not skip_equal_reward_groups:
        return rows
    return rows[~equal_reward_groups(rewards).repeat_interleave(group_size)]


ESTIMATORS = ("krpo", "grpo", "dr_grpo", "rloo")


def compute_advantages(
    rewards: torch.Tensor, estimator: str, generator: torch.Generator | None = None, grpo_eps: float = 1e-8, **kalman
) -> torch.Tensor:
    """Dispatch on the recipe's `algorithm.advantage`; `kalman` holds krpo's filter settings, `grpo_eps`
    GRPO's guard of its division by the standard deviation."""
    if estimator == "krpo":
        return krpo_advantages(rewards, generator=generator, **kalman)
    if estimator == "grpo":
        return grpo_advantages(rewards, eps=grpo_eps)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
