"""Batched, prefix-cached scores must equal a naive per-item fp32 forward, for every rule."""
import pytest

from polyalign.models import load_model
from polyalign.scoring import RULES, Scorer, naive_scores
from polyalign.tasks import load_task
from testdevice import DEVICE


@pytest.mark.parametrize("rule", RULES)
def test_batched_cached_equals_naive(tiny_model_path, rule):
    lm = load_model(tiny_model_path, dtype="fp32", device=DEVICE)
    task = load_task("amazon_polarity")
    items = [{"id": str(i), "review": text, "label": "positive"} for i, text in enumerate([
        "Great kettle, boils fast.", "Broke after two days. Do not buy!",
        "The book was fine, a bit long in the middle but the ending made up for it.", "Meh."])]
    scorer = Scorer(lm.model, lm.tokenizer, rule, token_budget=64)  # small budget: several batches
    group = scorer.prepare(task, "en", "english", items)
    assert all(p.cached_len > 1 for p in group.items)
    got = {}
    for batch in scorer.batches(group):
        for i, res in zip(batch, scorer.score(group, batch)):
            got[i] = res["scores"]
    assert sorted(got) == list(range(len(items)))
    for i, p in enumerate(group.items):
        ref = naive_scores(lm.model, lm.tokenizer, group.plan, p.text, rule)
        assert got[i] == pytest.approx(ref, abs=1e-4)
        assert len(set(ref)) > 1  # the check would be void if every label scored the same
