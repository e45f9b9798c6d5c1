"""The statistics of results and reports (polyalign.stats), against scipy, numpy and direct computations."""
from __future__ import annotations

import pytest

from polyalign.stats import paired_bootstrap_delta


# ----------------------------------------------------------------------------- the statistics, against scipy
@pytest.mark.parametrize("b, c", [(0, 0), (0, 5), (3, 9), (10, 10), (40, 61), (700, 760)])
def test_mcnemar_matches_scipy(b, c):
    from scipy.stats import binom, binomtest

    from polyalign.stats import mcnemar, mcnemar_from_counts

    n, k = b + c, min(b, c)
    exact = binomtest(k, n, 0.5).pvalue if n else 1.0
    assert mcnemar_from_counts(b, c) == pytest.approx(exact, rel=1e-9)
    mid = min(1.0, 2 * binom.cdf(k, n, 0.5) - binom.pmf(k, n, 0.5)) if n else 1.0
    assert mcnemar_from_counts(b, c, mid_p=True) == pytest.approx(mid, rel=1e-9, abs=1e-300)
    base = [True] * b + [False] * c + [True] * 5 + [False] * 7
    other = [False] * b + [True] * c + [True] * 5 + [False] * 7
    assert mcnemar(base, other) == mcnemar_from_counts(b, c)


def test_paired_bootstrap_matches_scipy():
    import numpy as np
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.55
    b = np.where(rng.random(400) < 0.2, ~a, a)
    d, lo, hi = paired_bootstrap_delta(a, b, n_boot=20000, seed=1)
    assert d == pytest.approx(b.mean() - a.mean())
    ref = bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: y.mean(axis) - x.mean(axis),
                    paired=True, vectorized=True, method="percentile", n_resamples=20000, random_state=2)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_stratified_bootstrap_weights_languages_equally():
    import numpy as np

    rng = np.random.default_rng(0)
    small_a, small_b = [False] * 10, [True] * 10                     # +100 points on 10 items
    big_a = list(rng.random(1000) < 0.5)
    big_b = list(big_a)                                               # no change on 1000 items
    d, lo, hi = paired_bootstrap_delta([small_a, big_a], [small_b, big_b], n_boot=2000)
    assert d == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    with pytest.raises(ValueError):
        paired_bootstrap_delta([True, False], [True])


def test_holm_matches_a_direct_computation():
    from polyalign.stats import holm

    p = [0.01, 0.04, 0.03, 0.5, 0.001]
    order = sorted(range(len(p)), key=p.__getitem__)
    expected, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        expected[i] = running
    assert holm(p) == pytest.approx(expected)
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5, 0.005])


def test_clustered_bootstrap_keeps_translations_together():
    import numpy as np

    rng = np.random.default_rng(5)
    a = rng.random(200) < 0.5
    b = np.where(rng.random(200) < 0.3, ~a, a)
    groups_a, groups_b = [a] * 10, [b] * 10          # ten "languages" that behave identically
    d, lo, hi = paired_bootstrap_delta(groups_a, groups_b, n_boot=4000, seed=3, clustered=True)
    # A direct computation: resample item indices once for all languages.
    per_item = (b.astype(float) - a.astype(float))
    idx = np.random.default_rng(3).integers(0, 200, size=(4000, 200))
    ref = np.quantile(per_item[idx].mean(axis=1), [0.025, 0.975])
    assert d == pytest.approx(per_item.mean()) and (lo, hi) == pytest.approx(tuple(ref))
    # Treating the ten copies as independent strata would claim a CI about sqrt(10) times narrower.
    _, slo, shi = paired_bootstrap_delta(groups_a, groups_b, n_boot=4000, seed=3)
    assert (hi - lo) > 2.5 * (shi - slo)
    with pytest.raises(ValueError):
        paired_bootstrap_delta([a, a[:10]], [b, b[:10]], clustered=True)


# ----------------------------------------------------------------------------- independent references
def _exact_mcnemar(b: int, c: int, mid_p: bool = False) -> float:
    """The exact binomial tail in integer arithmetic (a brute-force reference for scipy's)."""
    from fractions import Fraction
    from math import comb

    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(k + 1))
    p = Fraction(2 * tail - (comb(n, k) if mid_p else 0), 2 ** n)
    return float(min(Fraction(1), p))


@pytest.mark.parametrize("b, c", [(0, 1), (1, 0), (0, 5), (2, 3), (3, 9), (10, 10), (40, 61), (700, 760), (0, 900)])
def test_mcnemar_matches_exact_integer_arithmetic(b, c):
    from polyalign.stats import mcnemar_from_counts

    for mid in (False, True):
        assert mcnemar_from_counts(b, c, mid) == pytest.approx(_exact_mcnemar(b, c, mid), rel=1e-9, abs=1e-300)
    assert mcnemar_from_counts(b, c) == mcnemar_from_counts(c, b)     # two-sided: symmetric
    assert mcnemar_from_counts(0, 0) == 1.0 and mcnemar_from_counts(0, 0, True) == 1.0


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 7), (7, 7), (3, 10), (50, 100), (1, 400), (399, 400)])
def test_wilson_is_the_inverted_score_test(k, n):
    """The Wilson bounds are the p where the score statistic |k/n - p| / sqrt(p(1-p)/n) equals z: the roots
    of (k/n - p)^2 = z^2 p (1 - p) / n, solved here with numpy; at k = 0 (k = n) the lower (upper) root is 0 (1)."""
    import numpy as np

    from polyalign.stats import wilson

    z, ph = 1.96, k / n
    # (1 + z^2/n) p^2 - (2 ph + z^2/n) p + ph^2 = 0
    roots = sorted(np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph]).real)
    lo, hi = wilson(k, n)
    assert (lo, hi) == pytest.approx((max(0.0, roots[0]), min(1.0, roots[1])), abs=1e-12)
    assert 0.0 <= lo <= ph <= hi <= 1.0
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0


def test_wilson_without_items_is_nan():
    import math

    from polyalign.stats import wilson

    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_matches_the_closed_form_to_the_last_digits():
    """The published digits (results.json keeps full floats) stay those of the closed form used before scipy."""
    import math

    from polyalign.stats import wilson

    z = 1.96
    for n in (1, 2, 19, 200, 1000):
        for k in range(0, n + 1, max(1, n // 25)):
            p = k / n
            denom = 1 + z * z / n
            centre = (p + z * z / (2 * n)) / denom
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
            assert wilson(k, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-14)
