"""Pooled hidden states equal a per-item uncached forward; PCA, Pearson and retrieval equal direct
numpy; the states cache makes a redraw recompute nothing; base vs adapter outputs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from polyalign import cli
from polyalign.analysis import geometry
from polyalign.errors import PolyalignError
from polyalign.analysis.geometry import (GeometryConfig, alignment_metrics, center, collect_states, parse_layers,
                                pca_scores, pearson_pairs, run_geometry)
from polyalign.analysis.lens import prepare_prompts
from polyalign.models import load_model
from polyalign.engine.runner import PrefixRunner
from polyalign.tasks import load_task
from testdevice import DEVICE
from tinytask import GOLD, REVIEWS, write_tiny_task


@pytest.fixture(scope="session")
def geo_task(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_task(tmp_path_factory.mktemp("geo_task"), "tinygeo", ["en", "zh", "sw"])


def test_states_equal_uncached_forward(tiny_model_path, geo_task):
    task_path, _ = geo_task
    lm = load_model(tiny_model_path, "fp32", "cpu")
    task = load_task(task_path)
    items = [{"id": str(i), "review": t, "label": g} for i, (t, g) in enumerate(zip(REVIEWS["zh"], GOLD))]
    ps = prepare_prompts(lm.tokenizer, task, "zh", "english", items, 4096)
    assert all(p.cached_len > 1 and p.query_start >= p.cached_len for p in ps.prompts)
    runner = PrefixRunner(lm.model, lm.tokenizer, token_budget=48)   # several batches
    got = {pooling: collect_states(runner, ps, pooling) for pooling in geometry.POOLINGS}
    for p in ps.prompts:
        ids = lm.tokenizer(p.text, add_special_tokens=True)["input_ids"]
        assert ids == p.ids
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        query = lm.tokenizer(task.query("zh", p.item), add_special_tokens=False)["input_ids"]
        for layer, h in enumerate(hs):
            h = h[0].double().numpy()
            refs = {"mean": h.mean(0), "last": h[-1], "query-mean": h[p.query_start:].mean(0)}
            for pooling, ref in refs.items():
                np.testing.assert_allclose(got[pooling][p.index, layer], ref, atol=1e-5, rtol=1e-5,
                                           err_msg=f"{pooling} item {p.index} layer {layer}")
        # the query span is the test item (the tokenizer may merge one token across the boundary)
        assert abs((len(ids) - p.query_start) - len(query)) <= 1


def test_pca_pearson_retrieval_match_numpy():
    rng = np.random.default_rng(0)
    n, h = 40, 12
    base = rng.normal(size=(n, h))
    by_lang = {"en": base + 0.1 * rng.normal(size=(n, h)), "de": base + 0.5 * rng.normal(size=(n, h)) + 3,
               "sw": rng.normal(size=(n, h))}
    scores, ratio = pca_scores(by_lang)
    x = np.concatenate(list(by_lang.values()))
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    got = np.concatenate(list(scores.values()))
    for k in range(2):  # components are defined up to sign
        sign = np.sign(got[:, k] @ ref[:, k])
        np.testing.assert_allclose(got[:, k], sign * ref[:, k], atol=1e-8)
    np.testing.assert_allclose(ratio, (s[:2] ** 2) / (s ** 2).sum(), atol=1e-10)
    pairs = pearson_pairs({lang: v[:, 0] for lang, v in scores.items()})
    assert [(a, b) for a, b, _ in pairs] == [("en", "de"), ("en", "sw"), ("de", "sw")]
    for a, b, r in pairs:
        xa, xb = scores[a][:, 0], scores[b][:, 0]
        ref_r = ((xa - xa.mean()) @ (xb - xb.mean())) / np.sqrt(((xa - xa.mean()) ** 2).sum() * ((xb - xb.mean()) ** 2).sum())
        assert r == pytest.approx(ref_r, abs=1e-12)
    assert abs(dict(((a, b), r) for a, b, r in pairs)[("en", "de")]) > 0.8  # parallel items correlate

    c = center(by_lang, "lang")
    for lang in ("de", "sw"):
        par, non, acc = alignment_metrics(c[lang], c["en"])
        cos = np.array([[c[lang][i] @ c["en"][j] / np.linalg.norm(c[lang][i]) / np.linalg.norm(c["en"][j])
                         for j in range(n)] for i in range(n)])
        assert par == pytest.approx(np.mean([cos[i, i] for i in range(n)]))
        assert non == pytest.approx(np.mean([cos[i, j] for i in range(n) for j in range(n) if i != j]))
        assert acc == pytest.approx(np.mean([int(np.argmax(cos[i])) == i for i in range(n)]))
    assert alignment_metrics(c["de"], c["en"])[2] > 0.9 and alignment_metrics(c["sw"], c["en"])[2] < 0.3
    joint = center(by_lang, "joint")
    np.testing.assert_allclose(np.concatenate(list(joint.values())).mean(0), 0, atol=1e-12)


def test_parse_layers():
    assert parse_layers(None, 18) == [9, 17]
    assert parse_layers("0,-1,5", 18) == [0, 5, 18]
    with pytest.raises(PolyalignError, match="outside"):
        parse_layers("19", 18)
    with pytest.raises(PolyalignError, match="not a layer"):
        parse_layers("mid", 18)


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_geometry_base_vs_adapter_and_cache(tiny_llama_path, geo_task, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    task_path, data = geo_task
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "qa-sw"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "geo"
    args = ["geometry", "--model", tiny_llama_path, "--compare-adapter", str(adapter), "--task", task_path,
            "--langs", "en,zh,sw", "--data", data, "--output", str(out), "--dtype", "fp32", "--device", DEVICE,
            "--no-progress"]
    assert cli.main(args) == 0
    for name in ("pearson.csv", "alignment.csv", "alignment_delta.csv", "alignment.png", "summary.json",
                 "pca_layer1.png", "pca_layer2.png", "pearson_layer1.png", "pearson_layer2.png",
                 "states/base/en.npz", "states/qa-sw/sw.npz"):
        assert (out / name).exists(), name
    pearson = read_csv(out / "pearson.csv")
    assert {r["model"] for r in pearson} == {"base", "qa-sw"}
    assert len(pearson) == 2 * 4 * 3          # models x layers (0..3) x pairs
    align = read_csv(out / "alignment.csv")
    assert {(r["lang"]) for r in align} == {"zh", "sw"} and len(align) == 2 * 4 * 2
    delta = read_csv(out / "alignment_delta.csv")
    a = {(r["model"], r["layer"], r["lang"]): float(r["retrieval_acc"]) for r in align}
    for r in delta:
        assert float(r["d_retrieval_acc"]) == pytest.approx(a["qa-sw", r["layer"], r["lang"]] - a["base", r["layer"], r["lang"]], abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == [1, 2] and "qa-sw-minus-base" in summary["per_layer"]["1"]
    capsys.readouterr()

    # A redraw with other layers and centering recomputes nothing: the model is never loaded.
    def no_load(*a, **k):
        raise AssertionError("the cached states should have been used")
    monkeypatch.setattr("polyalign.models.load_model", no_load)
    assert cli.main(args + ["--layers", "0,-1", "--center", "none"]) == 0
    assert (out / "pca_layer0.png").exists() and (out / "pearson_layer3.png").exists()
    assert read_csv(out / "pearson.csv") == pearson        # PCA does not depend on the centering
    # Another pooling is another set of states: it must recompute.
    with pytest.raises(AssertionError, match="cached states"):
        cli.main(args + ["--pooling", "last"])


def test_geometry_bad_input(geo_task, tmp_path, capsys):
    task_path, data = geo_task
    base = ["geometry", "--model", "unused", "--task", task_path, "--data", data, "--output", str(tmp_path)]
    assert cli.main(base + ["--langs", "en"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert cli.main(base + ["--langs", "en,zh", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err


def test_outputs_without_pivot(geo_task, tmp_path, capsys):
    """Without the pivot language in --langs: PCA and Pearson only, no alignment files."""
    import time
    from polyalign.analysis.common import AnalysedModel
    rng = np.random.default_rng(1)
    langs = ["zh", "sw"]
    states = {"base": {lang: rng.normal(size=(5, 3, 4)).astype(np.float32) for lang in langs}}
    cfg = GeometryConfig(task=geo_task[0], langs="zh,sw", output=str(tmp_path), pivot="en", layers="1")
    info = {"base": {"label": "base", "layers": 2, "hidden": 4}}
    summary = geometry.write_geometry_outputs(cfg, load_task(geo_task[0]), langs, [AnalysedModel("base", "m")],
                                              states, None, info, [], 5, time.time())
    assert summary["layers"] == [1] and "alignment" not in summary["per_layer"]["1"]["base"]
    assert not (tmp_path / "alignment.csv").exists()
    assert len(read_csv(tmp_path / "pearson.csv")) == 3
    assert (tmp_path / "pca_layer1.png").exists() and (tmp_path / "alignment.png").exists()


# ----------------------------------------------------------------------------- issue 15: states from the evaluator
def _shared(geo: GeometryConfig, label: str = "base") -> dict:
    return {"label": label, "geometry": {k: getattr(geo, k) for k in geometry.SHARED_OPTIONS}}


def _eval_cfg(model, task_path, data, out, **over):
    from polyalign.evaluation.evaluate import EvalConfig
    return EvalConfig(**{"model": model, "tasks": task_path, "langs": "en,zh", "labels": "english,native",
                         "data": data, "output": None if out is None else str(out), "dtype": "fp32", "device": DEVICE, "batch_tokens": 48,
                         "progress": False, **over})


@pytest.mark.parametrize("pooling, rule", [("mean", "paper"), ("query-mean", "sequence"), ("last", "first-token")])
def test_evaluation_pools_the_states_geometry_computes(tiny_model_path, geo_task, tmp_path, monkeypatch, pooling,
                                                       rule):
    """The states an evaluation writes for geometry equal collect_states' own forwards (other batches,
    no label tokens after the prompt), run_geometry then runs no forward for them, and the evaluation's
    scores are those of an evaluation that shares nothing."""
    from polyalign.evaluation.evaluate import evaluate
    task_path, data = geo_task
    geo = GeometryConfig(model=tiny_model_path, task=task_path, langs="en,zh,sw", data=data, pooling=pooling,
                         output=str(tmp_path / "geo"), dtype="fp32", device=DEVICE, progress=False)
    shared = evaluate(_eval_cfg(tiny_model_path, task_path, data, tmp_path / "ev", scoring=rule,
                                geometry_states=_shared(geo)))
    plain = evaluate(_eval_cfg(tiny_model_path, task_path, data, None, scoring=rule))
    assert [s["scores"] for s in shared.samples] == [s["scores"] for s in plain.samples]
    states = tmp_path / "geo" / "states" / "base"
    assert sorted(p.name for p in states.iterdir()) == ["en.npz", "zh.npz"]      # sw is not evaluated

    lm = load_model(tiny_model_path, "fp32", DEVICE)
    task = load_task(task_path)
    runner = PrefixRunner(lm.model, lm.tokenizer)        # one batch per language: not the evaluation's batches
    for lang in ("en", "zh"):
        items = geometry.parallel_items(task, ["en", "zh", "sw"], geo)[0][lang]
        ref = collect_states(runner, prepare_prompts(lm.tokenizer, task, lang, "english", items, 4096), pooling)
        with np.load(states / f"{lang}.npz") as z:
            got = z[pooling.replace("-", "_")]
            assert list(z["ids"]) == [it["id"] for it in items]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    # run_geometry computes only what the evaluation did not score (sw), and finds the same as alone.
    computed = []
    real = geometry.collect_states

    def counted(runner, ps, pooling, bar=None):
        computed.append(ps.lang)
        return real(runner, ps, pooling, bar)
    monkeypatch.setattr(geometry, "collect_states", counted)
    together = run_geometry(geo)
    assert computed == ["sw"]
    computed.clear()
    alone = run_geometry(GeometryConfig(**{**geo.__dict__, "output": str(tmp_path / "alone")}))
    assert computed == ["en", "zh", "sw"]
    for table in ("pearson", "alignment"):
        a, b = getattr(together, table), getattr(alone, table)
        assert [{k: v for k, v in r.items() if isinstance(v, str) or k == "layer"} for r in a] == \
               [{k: v for k, v in r.items() if isinstance(v, str) or k == "layer"} for r in b]
        np.testing.assert_allclose([[v for k, v in r.items() if isinstance(v, float)] for r in a],
                                   [[v for k, v in r.items() if isinstance(v, float)] for r in b], atol=1e-4)


def test_no_states_where_the_prompts_differ(tiny_llama_path, geo_task, tmp_path, monkeypatch):
    """Another label mode, items the evaluation does not score, another dtype, a killed and resumed
    language: nothing is written, and geometry computes those states itself."""
    from polyalign.evaluation.evaluate import evaluate
    task_path, data = geo_task
    geo = GeometryConfig(model=tiny_llama_path, task=task_path, langs="en,zh", data=data, output=str(tmp_path / "geo"),
                         dtype="fp32", device=DEVICE, progress=False)
    cases = {"labels": (dict(labels="english"), dict(labels="native")),
             "items": (dict(limit=4), dict()),                  # geometry wants all 6, the evaluation scores 4
             "dtype": (dict(), dict(dtype="bf16"))}
    for name, (ev_over, geo_over) in cases.items():
        g = GeometryConfig(**{**geo.__dict__, **geo_over})
        evaluate(_eval_cfg(tiny_llama_path, task_path, data, tmp_path / name, **ev_over,
                           geometry_states=_shared(g)))
        assert not (tmp_path / "geo" / "states").exists(), name

    # Killed after the first batch of a language: the resumed evaluation skips that batch, so that
    # language's states are incomplete and left to geometry; the next language is complete.
    from polyalign.evaluation.scoring import Scorer
    real_score = Scorer.score
    calls = []

    def killed(self, group, batch, states=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(self, group, batch, states)
    monkeypatch.setattr(Scorer, "score", killed)
    cfg = _eval_cfg(tiny_llama_path, task_path, data, tmp_path / "killed", labels="english",
                    geometry_states=_shared(geo))
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    monkeypatch.setattr(Scorer, "score", real_score)
    evaluate(cfg)
    assert sorted(p.name for p in (tmp_path / "geo" / "states" / "base").iterdir()) == ["zh.npz"]
