"""MEXA cross-lingual alignment score (Kargaran et al. 2024) and its link to accuracy.

For one layer, embed N parallel items in the pivot language (English) and in language X and
build the N×N cosine matrix S (S[i, j] = cos(x_i, pivot_j)). Item i is aligned when S[i, i] is
strictly greater than every other entry of row i and of column i: its translation is the nearest
neighbour both ways. MEXA(X) is the share of aligned items; a tie is not aligned. Pooled over the
transformer layers (1..L; the embeddings, layer 0, are reported but not pooled) by mean and max.

Then, across languages, the change of MEXA from base to adapter is correlated with the change of
accuracy (Pearson and Spearman via scipy, a percentile bootstrap CI over languages): did the
languages that became more aligned gain the most?
"""
from __future__ import annotations

import numpy as np


def _unit(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def mexa_per_layer(x: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """MEXA of each layer: x, pivot [N, L, H] (item i parallel in both) -> [L] shares in [0, 1].
    One batched matmul per call: S [L, N, N]; no loop over items or pairs."""
    x, pivot = np.asarray(x, dtype=np.float64), np.asarray(pivot, dtype=np.float64)
    if x.shape != pivot.shape or x.ndim != 3:
        raise ValueError(f"need two [N, L, H] arrays of one shape, got {x.shape} and {pivot.shape}")
    n = x.shape[0]
    if n < 2:
        return np.full(x.shape[1], np.nan)
    sim = np.einsum("ilh,jlh->lij", _unit(x), _unit(pivot))
    diag = np.diagonal(sim, axis1=1, axis2=2)                     # [L, N]
    off = np.where(np.eye(n, dtype=bool)[None], -np.inf, sim)     # the diagonal out of the race
    aligned = (diag > off.max(axis=2)) & (diag > off.max(axis=1))
    return aligned.mean(axis=1)


def pooled(per_layer: np.ndarray) -> dict:
    """Mean and max over the transformer layers (index 1..L; index 0, the embeddings, left out)."""
    layers = np.asarray(per_layer, dtype=float)[1:] if len(per_layer) > 1 else np.asarray(per_layer, dtype=float)
    return {"mean": float(np.mean(layers)), "max": float(np.max(layers))}


def mexa_scores(states: dict[str, np.ndarray], pivot: str) -> dict[str, dict]:
    """{lang: {"per_layer": [...], "mean", "max"}} for every language but the pivot."""
    out = {}
    for lang, x in states.items():
        if lang == pivot:
            continue
        per_layer = mexa_per_layer(x, states[pivot])
        out[lang] = {"per_layer": [float(v) for v in per_layer], **pooled(per_layer)}
    return out


# ----------------------------------------------------------------------------- Δ MEXA vs Δ accuracy
def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair ([B, k] each); NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def correlation(x, y, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Pearson and Spearman of paired per-language values, each with a percentile bootstrap CI that
    resamples languages (resamples with a constant side have no correlation and are dropped)."""
    from scipy.stats import pearsonr, rankdata, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    k = len(x)
    out = {"n_langs": k}
    if k < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return {**out, "pearson": nan, "pearson_p": nan, "pearson_ci": [nan, nan],
                "spearman": nan, "spearman_p": nan, "spearman_ci": [nan, nan]}
    p, s = pearsonr(x, y), spearmanr(x, y)
    idx = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    xs, ys = x[idx], y[idx]
    boot = {"pearson": _rowwise_pearson(xs, ys),
            "spearman": _rowwise_pearson(rankdata(xs, axis=1), rankdata(ys, axis=1))}
    alpha = (1 - level) / 2
    for name, stat in (("pearson", p), ("spearman", s)):
        b = boot[name][np.isfinite(boot[name])]
        out[name] = float(stat.statistic)
        out[f"{name}_p"] = float(stat.pvalue)
        out[f"{name}_ci"] = [float(v) for v in np.quantile(b, [alpha, 1 - alpha])] if len(b) else [np.nan] * 2
    return out
