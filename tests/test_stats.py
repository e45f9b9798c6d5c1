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
