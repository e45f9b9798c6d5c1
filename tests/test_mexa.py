"""MEXA against a direct loop over the definition (ties included), the Δ correlation against scipy,
and MEXA in geometry's outputs."""
from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from scipy import stats

from polyalign.analysis import geometry, mexa
from polyalign.analysis.common import AnalysedModel as ModelSpec
from polyalign.tasks import load_task
from tinytask import write_tiny_task


def mexa_by_loop(x: np.ndarray, pivot: np.ndarray) -> float:
    """The definition for one layer, item by item: S[i, i] strictly above every other entry of row i
    and of column i."""
    n = len(x)
    S = [[float(np.dot(x[i], pivot[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(pivot[j]))) for j in range(n)]
         for i in range(n)]
    aligned = 0
    for i in range(n):
        row = all(S[i][i] > S[i][j] for j in range(n) if j != i)
        col = all(S[i][i] > S[j][i] for j in range(n) if j != i)
        aligned += row and col
    return aligned / n


def test_mexa_matches_the_definition_with_ties():
    rng = np.random.default_rng(0)
    n, layers, h = 9, 4, 5
    pivot = rng.integers(-3, 4, size=(n, layers, h)).astype(float)
    x = pivot + rng.integers(-1, 2, size=(n, layers, h))     # mostly aligned, some not
    # Exact ties: items 0 and 1 identical in x and in the pivot at layer 2 (integer vectors, so every
    # cosine of equal vectors is computed from equal numbers), and item 3's x duplicated from item 4.
    x[1, 2], pivot[1, 2] = x[0, 2], pivot[0, 2]
    x[3, 1] = x[4, 1]
    got = mexa.mexa_per_layer(x, pivot)
    want = [mexa_by_loop(x[:, layer], pivot[:, layer]) for layer in range(layers)]
    assert got.tolist() == pytest.approx(want)
    # a perfect copy is fully aligned; a tie anywhere in a row or column is not aligned
    # the tied items 0 and 1 are not aligned at layer 2 (a >= rule would count them)
    assert got[2] <= (n - 2) / n
    distinct = rng.normal(size=(n, 2, h))
    assert mexa.mexa_per_layer(distinct, distinct).tolist() == [1.0, 1.0]
    tied = np.ones((3, 1, 2))
    assert mexa.mexa_per_layer(tied, tied).tolist() == [0.0]


def test_mexa_random_layers_against_loop():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 3, 8))
    x = base + rng.normal(size=(20, 3, 8)) * np.array([0.1, 1.0, 3.0])[None, :, None]
    got = mexa.mexa_per_layer(x, base)
    assert got.tolist() == pytest.approx([mexa_by_loop(x[:, l], base[:, l]) for l in range(3)])
    assert got[0] > got[2]                                       # more noise, less aligned
    pooled = mexa.pooled(got)
    assert pooled == {"mean": pytest.approx(got[1:].mean()), "max": pytest.approx(got[1:].max())}


def test_correlation_and_ci_against_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=12)
    y = 0.6 * x + rng.normal(size=12) * 0.8
    got = mexa.correlation(x, y, n_boot=20000, seed=0)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert got["pearson_p"] == pytest.approx(stats.pearsonr(x, y).pvalue)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert got["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue)
    for name, fn in (("pearson", lambda a, b: stats.pearsonr(a, b).statistic),
                     ("spearman", lambda a, b: stats.spearmanr(a, b).statistic)):
        ref = stats.bootstrap((x, y), fn, paired=True, vectorized=False, n_resamples=20000, method="percentile",
                              random_state=np.random.default_rng(5))
        lo, hi = got[f"{name}_ci"]
        # two independent Monte Carlo estimates of the same percentile interval
        assert lo == pytest.approx(ref.confidence_interval.low, abs=0.04)
        assert hi == pytest.approx(ref.confidence_interval.high, abs=0.04)
        assert lo <= got[name] <= hi
    flat = mexa.correlation([1, 2, 3], [4, 4, 4])
    assert np.isnan(flat["pearson"]) and flat["n_langs"] == 3


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_geometry_writes_mexa_per_model_and_the_difference(tmp_path):
    task_path, _ = write_tiny_task(tmp_path, "tinymexa", ["en", "zh", "sw"])
    rng = np.random.default_rng(3)
    langs, n = ["en", "zh", "sw"], 12
    common = rng.normal(size=(n, 3, 6))
    states = {label: {lang: (common + noise * rng.normal(size=common.shape)).astype(np.float32) for lang in langs}
              for label, noise in (("base", 2.0), ("qalign", 0.3))}
    specs = [ModelSpec("base", "m"), ModelSpec("qalign", "m", "adapter")]
    info = {s.label: {"label": s.label, "layers": 2, "hidden": 6} for s in specs}
    cfg = geometry.GeometryConfig(task=task_path, langs="en,zh,sw", output=str(tmp_path / "geo"), layers="1")
    summary = geometry.write_geometry_outputs(cfg, load_task(task_path), langs, specs, states, "en", info, [], n, time.time())
    m = summary["mexa"]
    assert m["pivot"] == "en" and m["center"] == "lang"
    for label in ("base", "qalign"):
        c = geometry.center(states[label], "lang")
        for lang in ("zh", "sw"):
            want = [mexa_by_loop(c[lang][:, l], c["en"][:, l]) for l in range(3)]
            assert m["models"][label][lang]["per_layer"] == pytest.approx(want)
            assert m["models"][label][lang]["mean"] == pytest.approx(np.mean(want[1:]))
    d = m["delta"]["qalign-minus-base"]["zh"]["mean"]
    assert d == pytest.approx(m["models"]["qalign"]["zh"]["mean"] - m["models"]["base"]["zh"]["mean"])
    rows = read_csv(tmp_path / "geo" / "mexa.csv")
    assert len(rows) == 2 * 2 * 3 and {r["lang"] for r in rows} == {"zh", "sw"}
    assert json.loads((tmp_path / "geo" / "summary.json").read_text("utf-8"))["mexa"]["delta"]


def test_geometry_without_the_pivot_says_so_in_one_line(tmp_path, tiny_llama_path, capsys):
    from polyalign import cli
    task_path, data = write_tiny_task(tmp_path, "tinynopivot", ["zh", "sw"])
    assert cli.main(["geometry", "--model", tiny_llama_path, "--task", task_path, "--data", data, "--langs", "zh,sw",
                     "--dtype", "fp32", "--device", "cpu", "--no-progress", "--output", str(tmp_path / "g")]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if "MEXA" in x]
    assert len(err) == 1 and "--pivot" in err[0] and "English" in err[0]
    assert json.loads((tmp_path / "g" / "summary.json").read_text("utf-8"))["mexa"] is None
