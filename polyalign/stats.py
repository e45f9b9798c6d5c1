"""Small statistics used in results and reports: the Wilson interval and the exact McNemar test from
scipy; the clustered paired bootstrap and the Holm correction, which scipy does not have, here."""
from __future__ import annotations


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved at 0 and 1, unlike the normal one),
    from scipy. `z` stays the published 1.96 (scipy takes a confidence level: 2*Phi(1.96) - 1, not
    exactly 0.95, so the digits match the closed form we used before to ~1e-16)."""
    from scipy.stats import binomtest, norm

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(correct, n).proportion_ci(confidence_level=2 * norm.cdf(z) - 1, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


# ----------------------------------------------------------------------------- paired comparisons
def paired_bootstrap_delta(base, other, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                           clustered: bool = False) -> tuple[float, float, float]:
    """Accuracy delta (other - base) on paired 0/1 outcomes with a percentile bootstrap CI.

    `base` and `other` are sequences of per-item correctness for the SAME items in the same order;
    or lists of such sequences (one per language): then the statistic is the mean over groups of
    each group's delta, so every language keeps its weight as in an unweighted average over
    languages. Items are resampled within their group (a stratified bootstrap); with `clustered`,
    the groups must hold the same items in the same order (parallel test sets: item i is one
    review in every language), and one resample of item indices is shared by all groups, so that
    the translations of one item stay together: they are not independent observations.
    Returns (delta, ci_low, ci_high).
    """
    import numpy as np

    groups_a, groups_b = _as_groups(base), _as_groups(other)
    if len(groups_a) != len(groups_b):
        raise ValueError("base and other hold different numbers of groups")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    point = 0.0
    if clustered:
        d = np.asarray([np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
                        for a, b in zip(groups_a, groups_b)])
        if d.ndim != 2 or d.shape[1] == 0:
            raise ValueError("clustered: every group needs the same, non-empty list of items")
        per_item = d.mean(axis=0)      # the mean over groups of each item's delta
        n, step = len(per_item), max(1, 2_000_000 // d.shape[1])
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            total[start:stop] = per_item[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        alpha = (1 - level) / 2
        lo, hi = np.quantile(total, [alpha, 1 - alpha])
        return float(per_item.mean()), float(lo), float(hi)
    for a, b in zip(groups_a, groups_b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise ValueError("each group needs two non-empty paired outcome vectors of equal length")
        d = b - a
        point += d.mean()
        # Resample in chunks to bound memory (n_boot x n indices).
        n, step = len(d), max(1, 2_000_000 // len(d))
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            total[start:stop] += d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    k = len(groups_a)
    total /= k
    alpha = (1 - level) / 2
    lo, hi = np.quantile(total, [alpha, 1 - alpha])
    return float(point / k), float(lo), float(hi)


def _as_groups(x) -> list:
    """A flat outcome vector -> [vector]; a list of vectors stays as is."""
    if len(x) and hasattr(x[0], "__len__"):
        return list(x)
    return [x]


def discordant(base, other) -> tuple[int, int]:
    """(b, c): items only `base` got right, items only `other` got right."""
    if len(base) != len(other):
        raise ValueError("paired outcome vectors differ in length")
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    return b, c


def mcnemar(base, other, mid_p: bool = False) -> float:
    """Two-sided exact McNemar test on paired 0/1 outcomes (a binomial test on the discordant
    pairs, p = 1/2); with mid_p, the mid-p variant (less conservative, Fagerland et al. 2013)."""
    b, c = discordant(base, other)
    return mcnemar_from_counts(b, c, mid_p)


def mcnemar_from_counts(b: int, c: int, mid_p: bool = False) -> float:
    """The same test from the discordant counts: b = only base right, c = only the other right."""
    from scipy.stats import binom, binomtest

    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    if mid_p:     # scipy has no mid-p binomial test: 2 * (P(X <= k) - P(X = k) / 2)
        return min(1.0, float(2 * binom.cdf(k, n, 0.5) - binom.pmf(k, n, 0.5)))
    return min(1.0, float(binomtest(k, n, 0.5).pvalue))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over the list), in input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
