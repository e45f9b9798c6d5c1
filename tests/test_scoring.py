"""Batched, prefix-cached scores must equal a naive per-item fp32 forward, for every rule."""
import pytest

from polyalign.models import load_model
from polyalign.scoring import RULES, Scorer, naive_scores
from polyalign.tasks import load_task
from testdevice import DEVICE


def score_all(scorer, group) -> dict[int, list[float]]:
    """Item index -> scores, through the scorer's own batches."""
    return {i: r["scores"] for b in scorer.batches(group) for i, r in zip(b, scorer.score(group, b))}


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
    got = score_all(scorer, group)
    assert sorted(got) == list(range(len(items)))
    for i, p in enumerate(group.items):
        ref = naive_scores(lm.model, lm.tokenizer, group.plan, p.text, rule)
        assert got[i] == pytest.approx(ref, abs=1e-4)
        assert len(set(ref)) > 1  # the check would be void if every label scored the same


def test_batched_equals_naive_with_an_unmerged_adapter(tiny_llama_path):
    """A PEFT LoRA on q/v (as `--adapter` loads it, unmerged) goes through the packed runner and
    the prepacked bf16 weights and still equals the naive forward of the same wrapped model."""
    import torch
    from peft import LoraConfig, get_peft_model

    for dtype, tol in (("fp32", 1e-4), ("bf16", None)):
        lm = load_model(tiny_llama_path, dtype=dtype, device="cpu")
        torch.manual_seed(0)
        model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
        model.eval()
        task = load_task("amazon_polarity")
        items = [{"id": str(i), "review": t, "label": "positive"} for i, t in
                 enumerate(["Great kettle, boils fast.", "Broke after two days.", "Fine, I guess, for the price."])]
        scorer = Scorer(model, lm.tokenizer, "paper", token_budget=64)
        assert scorer.runner.packed
        group = scorer.prepare(task, "en", "english", items)
        got = score_all(scorer, group)
        if tol:                                   # fp32: against the naive forward of the wrapped model
            for i, p in enumerate(group.items):
                assert got[i] == pytest.approx(naive_scores(model, lm.tokenizer, group.plan, p.text, "paper"),
                                               abs=tol)
            with model.disable_adapter():         # the adapter matters, so the check above is not void
                base = naive_scores(model, lm.tokenizer, group.plan, group.items[0].text, "paper")
            assert base != pytest.approx(got[0], abs=1e-3)
        else:                                     # bf16: prepacked base weights change no bit
            assert scorer.runner.linears.packed
            scorer.runner.linears.packed = {}
            plain = score_all(scorer, group)
            assert got == plain
