"""Opt-in (POLYALIGN_GEMMA_TESTS=1): the real Gemma-3-270M on the paper's Amazon data."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import requires_gemma

from polyalign import cli

pytestmark = [pytest.mark.gemma, requires_gemma]

TH = {"positive": "เชิงบวก", "negative": "เชิงลบ"}  # the paper's Thai labels, sharing the prefix เชิง

TASK = {
    "name": "amazon_gemma_check",
    "shots": 2,
    "fields": ["review"],
    "classes": ["positive", "negative"],
    "labels": {"english": {"positive": "positive", "negative": "negative"}},
    "release": {"file": "ap_emotion/emotion_{lang}500_test.json", "fields": {"review": "input"}},
    "languages": {
        "en": {"template": "{review}\nEmotion: \"", "native": {"positive": "positive", "negative": "negative"},
               "demos": [{"label": "positive", "review": "This blender is great, it crushes ice in seconds."},
                         {"label": "negative", "review": "The zipper broke in the first week. Waste of money."}]},
        "th": {"template": "{review}\nอารมณ์: \"", "native": TH,
               "demos": [{"label": "positive", "review": "เครื่องปั่นนี้ดีมาก ปั่นน้ำแข็งได้ในไม่กี่วินาที"},
                         {"label": "negative", "review": "ซิปพังตั้งแต่สัปดาห์แรก เสียเงินเปล่า"}]},
    },
}


@pytest.fixture(scope="module")
def gemma():
    from polyalign.models import load_model
    return load_model("gemma-3-270m", dtype="fp32", device="cpu")


def test_thai_labels_sharing_a_prefix_are_told_apart(gemma):
    from polyalign.labels import label_plan
    plan = label_plan(gemma.tokenizer, ["positive", "negative"], [TH["positive"], TH["negative"]])
    assert plan.common, "the Gemma tokenizer should split off the shared เชิง"
    assert gemma.tokenizer.decode(plan.common) == "เชิง"
    assert plan.sets[0] and plan.sets[1] and set(plan.sets[0]) != set(plan.sets[1])
    assert plan.first[0] != plan.first[1]
    # After เชิง the two rests share only what the paper's rule adds to every Thai word: the byte-fallback
    # token of the first UTF-8 byte (0xE0), which adds the same mass to both classes; it is reported.
    shared = {tok for _, _, ids in plan.overlaps for tok in gemma.tokenizer.convert_ids_to_tokens(ids)}
    assert shared <= {"<0xE0>"}, shared


def test_gemma_on_paper_amazon_data(tmp_path, shared_data, gemma):
    from polyalign.labels import label_plan
    from polyalign.evaluation.scoring import naive_scores

    task = tmp_path / "amazon_gemma_check.yaml"
    task.write_text(yaml.safe_dump(TASK, allow_unicode=True), "utf-8")
    out = tmp_path / "run"
    assert cli.main(["evaluate", "--model", "gemma-3-270m", "--tasks", str(task), "--data", str(shared_data),
                     "--langs", "en,th", "--labels", "native", "--limit", "10", "--dtype", "fp32",
                     "--device", "cpu", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert [(r["lang"], r["labels"], r["n"]) for r in results["rows"]] == [("en", "native", 10), ("th", "native", 10)]
    assert any("th" in x and "เชิง" in x for x in results["label_overlaps"])
    en_rows = [r for r in results["rows"] if r["lang"] == "en"]
    assert all(r["acc"] >= 0.5 for r in en_rows), en_rows  # the real model beats chance on English

    samples = [json.loads(x) for x in (out / "samples/amazon_gemma_check/native/th.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples].count("positive") == 5
    assert all(s["choices"] == [TH["positive"], TH["negative"]] for s in samples)
    plan = label_plan(gemma.tokenizer, ["positive", "negative"], [TH["positive"], TH["negative"]])
    for s in samples[:3]:
        assert s["prompt"].endswith('\nอารมณ์: "')
        ref = naive_scores(gemma.model, gemma.tokenizer, plan, s["prompt"], "paper")
        assert s["scores"] == pytest.approx(ref, abs=1e-4, rel=1e-3)
        assert len(set(s["scores"])) == 2


def test_gemma_bf16_scores_are_the_naive_loops_to_the_bit(shared_data):
    """bf16 on a CPU, the bundled amazon_polarity task on the paper's data: every item's scores
    from the packed, prefix-cached scorer equal the naive batch-1 loop's exactly (demos under ~100
    tokens; see docs/benchmarks.md for the longer ones)."""
    from polyalign.data import load_data
    from polyalign.models import load_model
    from polyalign.evaluation.scoring import Scorer, naive_scores
    from polyalign.tasks import load_task
    from test_scoring import score_all

    lm = load_model("gemma-3-270m", dtype="bf16", device="cpu")
    task = load_task("amazon_polarity")
    data = load_data(task, ["en", "de"], shared_data, 12)
    scorer = Scorer(lm.model, lm.tokenizer, "paper")
    for lang in ("en", "de"):
        group = scorer.prepare(task, lang, "english", data.items[lang])
        got = score_all(scorer, group)
        for i, p in enumerate(group.items):
            assert got[i] == naive_scores(lm.model, lm.tokenizer, group.plan, p.text, "paper"), (lang, i)


# Label sets whose words begin alike in the language itself; their shared tokens are reported in
# `label_overlaps`. Anything else sharing a token beyond the byte-fallback ones is a defect.
KNOWN_SHARED = {("snli", "sl", "native"): "posledica / protislovje both begin with p"}


def test_bundled_label_words_are_told_apart_by_gemma():
    """Under Gemma-3's tokenizer every bundled label set (task x language x mode) differs at its first
    scored token, and two classes' paper token sets share only byte-fallback tokens (the first UTF-8
    byte every word of a script shares), outside KNOWN_SHARED. The sw snli words hitimisho/haijulikani
    used to share their h tokens."""
    from transformers import AutoTokenizer

    from polyalign.labels import label_plan
    from polyalign.models import embedded_gemma_path
    from polyalign.tasks import bundled_task_names, load_task

    tok = AutoTokenizer.from_pretrained(embedded_gemma_path())
    byte_ids = {i for t, i in tok.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
    bad, seen = [], set()
    for name in bundled_task_names():
        task = load_task(name)
        for lang in task.languages:
            for mode in ("english", "native", "agnostic"):
                words = tuple(task.label_words(lang, mode)[c] for c in task.classes)
                if words in seen:  # english and agnostic words recur in every language
                    continue
                seen.add(words)
                plan = label_plan(tok, task.classes, list(words))
                if len(set(plan.first)) < len(plan.first):
                    bad.append(f"{name}/{lang}/{mode}: two classes start with the same token")
                shared = [(a, b, set(ids) - byte_ids) for a, b, ids in plan.overlaps if set(ids) - byte_ids]
                if shared and (name, lang, mode) not in KNOWN_SHARED:
                    bad.append(f"{name}/{lang}/{mode}: {shared[0][0]}/{shared[0][1]} share "
                               f"{tok.convert_ids_to_tokens(sorted(shared[0][2]))}")
    assert not bad, bad
