"""Batched, prefix-cached scores must equal a naive per-item fp32 forward, for every rule."""
import pytest

from polyalign.models import load_model
from polyalign.evaluation.scoring import RULES, Scorer, naive_scores
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


def _random_lora(path, dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    lm = load_model(path, dtype=dtype, device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.eval()
    items = [{"id": str(i), "review": t, "label": "positive"} for i, t in
             enumerate(["Great kettle, boils fast.", "Broke after two days.", "Fine, I guess, for the price."])]
    scorer = Scorer(model, lm.tokenizer, "paper", token_budget=64)
    assert scorer.runner.packed
    return model, lm.tokenizer, scorer, scorer.prepare(load_task("amazon_polarity"), "en", "english", items)


def test_batched_equals_naive_with_an_unmerged_adapter(tiny_llama_path):
    """A PEFT LoRA on q/v (as `--adapter` loads it, unmerged) goes through the packed runner and
    still equals the naive forward of the same wrapped model (fp32, every CPU)."""
    model, tok, scorer, group = _random_lora(tiny_llama_path, "fp32")
    got = score_all(scorer, group)
    for i, p in enumerate(group.items):
        assert got[i] == pytest.approx(naive_scores(model, tok, group.plan, p.text, "paper"), abs=1e-4)
    with model.disable_adapter():         # the adapter matters, so the check above is not void
        base = naive_scores(model, tok, group.plan, group.items[0].text, "paper")
    assert base != pytest.approx(got[0], abs=1e-3)


def test_bf16_adapter_scores_and_prepacked_weights(tiny_llama_path):
    """bf16 with an unmerged LoRA. Everywhere: the packed runner's scores are the naive bf16 forward's
    (bitwise on a CPU: item-by-item attention). Where bf16 is native (avx512_bf16 / AMX), the decoder's
    weights must be oneDNN-prepacked, and prepacking must change no bit."""
    from polyalign import hardware

    model, tok, scorer, group = _random_lora(tiny_llama_path, "bf16")
    got = score_all(scorer, group)
    for i, p in enumerate(group.items):
        assert got[i] == naive_scores(model, tok, group.plan, p.text, "paper")
    if not hardware.native_bf16():
        assert not scorer.runner.linears.packed    # emulated bf16: never prepacked
        pytest.skip(f"oneDNN bf16 prepacking needs avx512_bf16 or AMX; this CPU: {hardware.cpu_class()}")
    assert scorer.runner.linears.packed
    scorer.runner.linears.packed = {}
    assert score_all(scorer, group) == got
