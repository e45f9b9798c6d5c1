"""Opt-in (POLYALIGN_GEMMA_TESTS=1): `polyalign neurons` on the real Gemma-3-270M for two languages,
with a small token budget (well under a minute on a CPU)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import requires_gemma

from polyalign import cli

pytestmark = [pytest.mark.gemma, requires_gemma]

LANGS = ["en", "zh"]
LAYERS = 18                 # Gemma-3-270M's decoder layers


def test_neurons_on_gemma_two_languages(tmp_path, capsys):
    out = tmp_path / "neurons"
    assert cli.main(["neurons", "--model", "gemma-3-270m", "--langs", ",".join(LANGS), "--tokens-per-language",
                     "1500", "--dtype", "fp32", "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(lang in printed for lang in LANGS)

    # Counts per layer: every (language, layer) of the 18 layers, once.
    counts = list(csv.DictReader((out / "counts.csv").open(encoding="utf-8")))
    assert sorted((r["lang"], int(r["layer"])) for r in counts) == sorted(
        (lang, layer) for lang in LANGS for layer in range(LAYERS))
    assert {r["model"] for r in counts} == {"base"}

    # Probabilities: counts over tokens, in [0, 1], one per neuron of every layer and language.
    with np.load(out / "probabilities.npz") as z:
        probs, raw, tokens = z["base/probabilities"], z["base/counts"], z["tokens"]
    assert probs.shape[0] == LAYERS and probs.shape[2] == len(LANGS) and probs.shape[1] > 0
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(probs, raw / tokens)
    assert (tokens >= 150).all() and (tokens <= 1500).all()          # within the budget, over MIN_SHARE
    assert 0.01 < probs.mean() < 0.99                                # a real model: neither dead nor saturated

    # LAPE found language-specific neurons for each language; the lists match the counts.
    data = json.loads((out / "neurons.json").read_text("utf-8"))
    per_lang = {lang: sum(map(len, data["models"]["base"]["neurons"][lang].values())) for lang in LANGS}
    assert all(n > 0 for n in per_lang.values()), per_lang
    for r in counts:
        assert int(r["neurons"]) == len(data["models"]["base"]["neurons"][r["lang"]].get(r["layer"], []))
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    assert summary["models"]["base"]["per_language"] == per_lang

    # Jaccard overlaps in [0, 1] (an empty cell where both sets are empty); a language with itself is 1.
    overlap = list(csv.DictReader((out / "overlap.csv").open(encoding="utf-8")))
    assert {r["layer"] for r in overlap} == {*map(str, range(LAYERS)), "all"}
    for r in overlap:
        j = float(r["jaccard"]) if r["jaccard"] else math.nan
        assert math.isnan(j) or 0 <= j <= 1, r
        if r["lang_a"] == r["lang_b"] and r["layer"] == "all":
            assert j == 1
    assert (out / "neuron_counts_base.png").is_file() and (out / "neuron_overlap_base.png").is_file()
