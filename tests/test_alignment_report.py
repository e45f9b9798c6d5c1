"""The report's "Alignment or calibration?" section on artefacts made by the real producers: two
calibrated `polyalign evaluate` runs (a second random model stands in for the trained one) and
geometry's MEXA outputs; every number is recomputed here from the samples and checked."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from toydata import toy

from conftest import make_model
from polyalign import cli
from polyalign.analysis import geometry
from polyalign.analysis.common import AnalysedModel as ModelSpec
from polyalign.reporting.alignment import verdict
from polyalign.reporting.report import build_report
from polyalign.stats import paired_bootstrap_delta
from polyalign.tasks import load_task
from testdevice import DEVICE

LANGS = ["en", "de", "zh"]


def _eval(folder: Path, model: str, task: str, data: str) -> None:
    assert cli.main(["evaluate", "--model", model, "--tasks", task, "--data", data, "--langs", ",".join(LANGS),
                     "--dtype", "fp32", "--device", DEVICE, "--no-progress", "--calibration", "contextual",
                     "--output", str(folder)]) == 0
    (folder / "done.json").write_text("{}", "utf-8")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_llama_path, tiny_tokenizer):
    root = tmp_path_factory.mktemp("alignrun")
    task, data = toy(root / "inputs", langs=LANGS)
    other = str(make_model("llama", root / "other-model", tiny_tokenizer, seed=7))
    steps = []

    def step(kind, setting, d):
        steps.append({"kind": kind, "label": f"{kind} {setting or 'base'}", "model": "tiny", "setting": setting,
                      "task": "toy_polarity", "key": d, "dir": d, "status": "done", "seconds": 1.0})
        return root / d

    _eval(step("eval", None, "steps/eval-base"), tiny_llama_path, task, data)
    _eval(step("eval", "de-en", "steps/eval-de"), other, task, data)
    # geometry's own writer on states of 12 parallel items: the "trained" model's zh is better aligned
    rng = np.random.default_rng(0)
    common = rng.normal(size=(12, 3, 8))
    noise = {("base", "de"): 1.0, ("base", "zh"): 3.0, ("de-en", "de"): 1.0, ("de-en", "zh"): 0.5}
    states = {m: {lang: (common + noise.get((m, lang), 0.0) * rng.normal(size=common.shape)).astype(np.float32)
                  for lang in LANGS} for m in ("base", "de-en")}
    geo = step("geometry", "de-en", "steps/geometry")
    cfg = geometry.GeometryConfig(task=task, langs=",".join(LANGS), output=str(geo), layers="1")
    geometry.write_geometry_outputs(cfg, load_task(task), LANGS, [ModelSpec("base", "m"), ModelSpec("de-en", "m", "a")],
                           states, "en", {m: {"label": m, "layers": 2, "hidden": 8} for m in states}, [], 12,
                           time.time())
    (geo / "done.json").write_text("{}", "utf-8")
    manifest = {"name": "align", "models": [{"name": "tiny", "label": "tiny"}],
                "settings": [{"name": "de-en", "label": "de ⇒ en", "sources": ["de"], "target": "en",
                              "task": "toy_polarity", "seen": ["de", "en"]}],
                "eval": {"tasks": ["toy_polarity"], "langs": LANGS, "labels": ["english"], "scoring": "paper"},
                "report": {"bootstrap": 2000, "seed": 0}, "steps": steps}
    (root / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    build_report(root)
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines()]


def _outcomes(root: Path, step: str, lang: str, scoring: str) -> list[bool]:
    rows = _lines(root / "steps" / step / "samples/toy_polarity/english" / f"{lang}.jsonl")
    return [s["correct"] if scoring == "raw" else s["pred_calibrated"][scoring] == s["gold"] for s in rows]


def _csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_deltas_under_each_calibration_match_the_samples(run_folder):
    rows = {r["scoring"]: r for r in _csv(run_folder / "report" / "calibration_toy_polarity_english_de-en.csv")}
    assert set(rows) == {"raw", "contextual", "pmi"}
    for scoring, r in rows.items():
        base = [_outcomes(run_folder, "eval-base", lang, scoring) for lang in LANGS]
        other = [_outcomes(run_folder, "eval-de", lang, scoring) for lang in LANGS]
        d, lo, hi = paired_bootstrap_delta(base, other, n_boot=2000, seed=0, clustered=True)
        assert float(r["all_delta"]) == pytest.approx(d, abs=1e-4)
        assert (float(r["all_ci_low"]), float(r["all_ci_high"])) == pytest.approx((lo, hi), abs=1e-4)


def test_bias_mexa_and_correlation_columns(run_folder):
    rows = {r["lang"]: r for r in _csv(run_folder / "report" / "bias_toy_polarity_english_de-en.csv")}
    summary = json.loads((run_folder / "steps/geometry/summary.json").read_text("utf-8"))
    d_mexa = summary["mexa"]["delta"]["de-en-minus-base"]
    for lang in LANGS:
        base = _lines(run_folder / "steps/eval-base/samples/toy_polarity/english" / f"{lang}.jsonl")
        other = _lines(run_folder / "steps/eval-de/samples/toy_polarity/english" / f"{lang}.jsonl")
        preds = [s["pred"] for s in base]
        majority = max(dict.fromkeys([s["gold"] for s in base]), key=preds.count)
        r = rows[lang]
        assert r["base_majority_class"] == majority
        assert float(r["base_majority_share"]) == pytest.approx(preds.count(majority) / len(preds))
        assert float(r["setting_share"]) == pytest.approx([s["pred"] for s in other].count(majority) / len(other))
        if lang == "en":
            assert r["d_mexa"] == ""
        else:
            assert float(r["d_mexa"]) == pytest.approx(d_mexa[lang]["mean"])
    # two languages beside the pivot: too few for a correlation, so none is claimed
    assert not (run_folder / "report" / "mexa_corr_toy_polarity_english_de-en.csv").exists()


def test_the_sentence_follows_from_the_table(run_folder):
    md = (run_folder / "report.md").read_text("utf-8")
    assert "## Alignment or calibration?" in md
    rows = {r["scoring"]: r for r in _csv(run_folder / "report" / "calibration_toy_polarity_english_de-en.csv")}
    ci = {s: (float(r["unseen_delta"]), float(r["unseen_ci_low"]), float(r["unseen_ci_high"]))
          for s, r in rows.items()}
    want = verdict(ci["raw"], ci["contextual"], "contextual", "on the unseen languages")
    assert f"**{want}" in md
    assert (run_folder / "report/figures/calibration_toy_polarity_english_de-en.png").exists()


@pytest.mark.parametrize("raw, cal, words", [
    ((0.10, 0.05, 0.15), (0.09, 0.04, 0.14), "survives calibration"),
    ((0.10, 0.05, 0.15), (0.03, 0.01, 0.05), "less than half"),
    ((0.10, 0.05, 0.15), (0.01, -0.02, 0.04), "most of the raw gain is a shift of the label prior"),
    ((0.10, 0.05, 0.15), (-0.05, -0.08, -0.02), "the raw gain is a shift of the label prior"),
    ((0.01, -0.02, 0.04), (0.06, 0.02, 0.10), "reveals a gain"),
    ((0.01, -0.02, 0.04), (0.00, -0.03, 0.03), "neither"),
    ((-0.06, -0.10, -0.02), (-0.05, -0.09, -0.01), "loss survives"),
])
def test_verdict_rules(raw, cal, words):
    s = verdict(raw, cal, "contextual", "on the unseen languages")
    assert words in s and s.count(".") >= 1 and "[" in s


def test_correlation_sentence_uses_the_ci():
    from polyalign.analysis.mexa import correlation
    from polyalign.reporting.alignment import mexa_sentence
    x = np.arange(10.0)
    c = correlation(x, x + np.sin(x) * 0.1, n_boot=500)
    assert c["spearman"] == pytest.approx(stats.spearmanr(x, x + np.sin(x) * 0.1).statistic)
    assert "gained more" in mexa_sentence(c)
    c = correlation(x, np.cos(3 * x), n_boot=500)
    assert ("does not clearly" in mexa_sentence(c)) == (c["spearman_ci"][0] <= 0 <= c["spearman_ci"][1])
