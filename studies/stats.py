"""Statistics of a study across seeds: mean ± std, and a paired difference with its t-interval.

Pure functions on plain lists, no dependencies beyond the standard library (scipy is not one of
krpo's). Student's t quantile is computed from the closed form of the t distribution's CDF for a
whole number of degrees of freedom (Abramowitz & Stegun 26.7.3–4), inverted by bisection.
"""

from __future__ import annotations

import math
import statistics


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with `df` (a whole number ≥ 1) degrees of freedom.

    With θ = atan(t/√df) and c = cos²θ, P(|T| < |t|) is
    sin θ · (1 + c/2 + 1·3/(2·4) c² + … up to c^((df−2)/2)) for even df, and
    (2/π)(θ + sin θ cos θ (1 + 2/3 c + 2·4/(3·5) c² + … up to c^((df−3)/2))) for odd df.
    """
    if df < 1 or df != int(df):
        raise ValueError(f"degrees of freedom must be a whole number ≥ 1, not {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c * (2 * k - 1) / (2 * k)
            total += term
        central = math.sin(theta) * total
    else:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c * (2 * k) / (2 * k + 1)
            total += term
        central = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return 0.5 + math.copysign(central / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p, for 0 < p < 1 (bisection on `t_cdf` to ~1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be strictly between 0 and 1, not {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


def mean_std(values: list[float]) -> dict:
    """{'n', 'mean', 'std'}: the sample std (n − 1), None for fewer than two values; mean None for none."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def paired_difference(first: dict[int, float], second: dict[int, float], confidence: float = 0.95) -> dict:
    """first − second on the seeds both have: each seed's difference, their mean, std and t-interval.

    The interval is mean ± t(1 − α/2, n − 1) · std/√n with α = 1 − confidence; it is None for fewer
    than two paired seeds.
    """
    seeds = sorted(set(first) & set(second))
    differences = {seed: first[seed] - second[seed] for seed in seeds}
    summary = mean_std(list(differences.values()))
    interval = None
    if summary["n"] > 1:
        half = t_quantile(1 - (1 - confidence) / 2, summary["n"] - 1) * summary["std"] / math.sqrt(summary["n"])
        interval = [summary["mean"] - half, summary["mean"] + half]
    return {"seeds": seeds, "differences": differences, **summary, "confidence": confidence, "interval": interval}
