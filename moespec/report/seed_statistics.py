"""Runs that differ only in ``trainer.seed``: groups, mean ± std, and the paired difference.

One seed is not evidence. Two groups (say aux-only and specialization) are compared seed by
seed: d_s = value(second, s) − value(first, s) over the seeds both ran; the 95% interval is
mean(d) ± t_{0.975, n−1} · sd(d) / √n, and a difference is significant only when the interval
excludes zero (n ≥ 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SEED_KEY = "trainer.seed"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; NaN for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class Paired:
    """The paired difference second − first over ``seeds``, with its 95% interval."""

    seeds: list[int]
    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """True when the 95% interval excludes zero."""
        return len(self.seeds) >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(first: dict[int, float], second: dict[int, float]) -> Paired | None:
    """``second[s] − first[s]`` over the seeds in both (by seed); None without a common seed."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    diffs = [second[s] - first[s] for s in seeds]
    mean, sd = mean_std(diffs)
    if len(diffs) < 2:
        return Paired(seeds, mean, math.nan, math.nan)
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(seeds, mean, mean - half, mean + half)


@dataclass
class SeedGroup:
    """Runs with the same overrides but ``trainer.seed``; ``members`` are indices of runs."""

    overrides: tuple[str, ...]
    members: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def seed_of(overrides: list[str]) -> int:
    """The run's ``trainer.seed`` override (0, the default, when absent)."""
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == SEED_KEY:
            return int(value)
    return 0


def group_by_seed(run_overrides: list[list[str]]) -> list[SeedGroup]:
    """Groups of runs whose overrides are equal once ``trainer.seed`` is left out; in the
    order their first run comes. Two runs of one group with the same seed are an error."""
    groups: dict[tuple[str, ...], SeedGroup] = {}
    for i, overrides in enumerate(run_overrides):
        rest = tuple(sorted(o for o in overrides if o.lstrip("+").partition("=")[0] != SEED_KEY))
        g = groups.setdefault(rest, SeedGroup(rest))
        seed = seed_of(overrides)
        if seed in g.seeds:
            raise ValueError(
                f"two runs with trainer.seed={seed} and the same overrides "
                f"({' '.join(rest) or 'none'}): give each seed once"
            )
        g.members.append(i)
        g.seeds.append(seed)
    return list(groups.values())
