"""Intervals and tests that fit how evaluation rows are drawn: paired and clustered.

* Two models answer the *same* prompts, so their unsafe rates are paired: ``newcombe_paired_ci``
  (Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
  based on paired data", Stat Med 17:2635-2650, method 10) and the exact McNemar test
  (``mcnemar_exact_p``: a two-sided binomial test on the discordant pairs).
* Rows are clustered (samples of one prompt; prompts of one (template, task) pair of the synthetic
  world, or of one category of a real set). Intervals that treat rows as independent overstate
  precision when rows of a cluster agree, so ``cluster_bootstrap_ci`` resamples whole clusters
  with replacement (percentile interval, seeded).

Also here: the Wilson interval of one rate and Newcombe's method 10 for two independent rates
(Newcombe 1998, Stat Med 17:873-890), which the paired method builds on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

Z_95 = 1.959963984540054


def wilson_ci(num_hits: int, num_total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0 % and 100 % and for small n)."""
    if num_total == 0:
        return (0.0, 1.0)
    p = num_hits / num_total
    denom = 1 + z * z / num_total
    centre = (p + z * z / (2 * num_total)) / denom
    half = z * math.sqrt(p * (1 - p) / num_total + z * z / (4 * num_total * num_total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference_ci(a: dict, b: dict) -> dict:
    """``a - b`` of two *independent* rates (dicts with rate, ci_low, ci_high from Wilson), 95 % interval.

    Newcombe (1998), method 10 for independent samples: sound near 0 % where the normal (Wald)
    interval is not. On paired data (two models, same prompts) use ``newcombe_paired_ci``.
    """
    if a["rate"] is None or b["rate"] is None:
        raise ValueError("difference_ci needs two rates with at least one judged row each")
    pa, pb = a["rate"], b["rate"]
    d = pa - pb
    low = d - math.sqrt((pa - a["ci_low"]) ** 2 + (b["ci_high"] - pb) ** 2)
    high = d + math.sqrt((a["ci_high"] - pa) ** 2 + (pb - b["ci_low"]) ** 2)
    return {"difference": d, "ci_low": low, "ci_high": high}


def newcombe_paired_ci(a: int, b: int, c: int, d: int, z: float = Z_95) -> tuple[float, float]:
    """95 % interval of ``p1 - p2 = (b - c) / n`` for paired binary outcomes (Newcombe 1998, method 10).

    Args:
        a: pairs where both outcomes are positive; b: first positive, second negative;
        c: first negative, second positive; d: both negative.

    The Wilson intervals of the two marginal rates are combined by "square and add" with the
    estimated correlation phi between them, using Newcombe's correction: phi is 0 when
    0 <= ad - bc <= n/2, and ad - bc - n/2 replaces ad - bc above that.
    """
    n = a + b + c + d
    if n == 0:
        return (-1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_ci(a + b, n, z)
    l2, u2 = wilson_ci(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    excess = a * d - b * c
    if margins == 0 or 0 <= excess <= n / 2:
        phi = 0.0
    else:
        phi = (excess - n / 2 if excess > 0 else excess) / math.sqrt(margins)
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return (max(-1.0, low), min(1.0, high))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact McNemar p-value: two-sided binomial test of ``b`` successes in ``b + c`` trials at 1/2.

    Only the discordant pairs carry information about a difference; with none, p = 1.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def cluster_bootstrap_ci(
    clusters: Sequence[Hashable],
    values: Sequence[float],
    *,
    num_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of a mean of per-row ``values`` when rows come in ``clusters``.

    Each resample draws as many clusters as there are, with replacement, and takes the mean over
    all rows of the drawn clusters (a cluster drawn twice counts twice). For a rate the values are
    0/1; for a paired difference they are ``x_baseline - x_backtrack`` in {-1, 0, 1}.

    Returns:
        ``(low, high)``; a single cluster gives its own mean twice (no spread can be estimated).
    """
    import numpy as np

    if len(clusters) != len(values):
        raise ValueError(f"cluster_bootstrap_ci: {len(clusters)} clusters for {len(values)} values")
    if not values:
        raise ValueError("cluster_bootstrap_ci needs at least one value")
    sums: dict[Hashable, list[float]] = defaultdict(lambda: [0.0, 0])
    for key, v in zip(clusters, values):
        sums[key][0] += float(v)
        sums[key][1] += 1
    totals = np.array([s for s, _ in sums.values()])
    counts = np.array([n for _, n in sums.values()], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(totals), size=(num_resamples, len(totals)))
    means = totals[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))
