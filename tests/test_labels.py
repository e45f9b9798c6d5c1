"""The paper's label token sets, checked against a brute-force scan of the vocabulary."""
import pytest
from transformers import AutoTokenizer

from polyalign.labels import label_plan, paper_token_set, token_bytes
from polyalign.models import load_model
from polyalign.evaluation.scoring import Scorer, naive_scores
from polyalign.tasks import load_task
from testdevice import DEVICE

WORDS = ["positive", "negative", "积极", "消极", "เชิงบวก", "เชิงลบ", "ox", "Widerspruch"]


def brute_force_set(tok, word: str) -> set[int]:
    """Every token whose text (word-start marker or not) is a non-empty prefix of `word`, plus the
    byte token of the first byte: scanned over the whole vocabulary, no lookup tables."""
    w = word.encode("utf-8")
    out = set()
    for idx in range(len(tok)):
        b = token_bytes(tok, idx)
        if tok.convert_ids_to_tokens(idx) in tok.all_special_tokens:
            continue
        stripped = b[1:] if b.startswith(b" ") else b
        if not stripped or not w.startswith(stripped):
            continue
        is_char_prefix = any(stripped == word[:i].encode("utf-8") for i in range(1, len(word) + 1))
        is_first_byte = len(tok.convert_ids_to_tokens(idx)) == 6 and stripped == w[:1]
        if is_char_prefix or is_first_byte:
            out.add(idx)
    return out


@pytest.mark.parametrize("word", WORDS)
def test_token_set_matches_brute_force(tiny_model_path, word):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    got = set(paper_token_set(tok, word))
    ref = brute_force_set(tok, word)
    # Byte-level vocabularies may add the tokenizer's own first token for a prefix (the release's Qwen
    # rule): a byte prefix of the word's first character. Every extra must be such a byte prefix.
    for extra in got - ref:
        b = token_bytes(tok, extra).lstrip(b" ")
        assert b and word.encode("utf-8").startswith(b) and len(b) < len(word[0].encode("utf-8")), word
    assert ref <= got
    assert got, word


def test_token_sets_follow_tokens_added_after_the_first_lookup(tiny_model_path):
    """The vocabulary is read once per tokenizer and kept on it; adding tokens must not leave a stale set."""
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    before = set(paper_token_set(tok, "Widerspruch"))
    # A word-start token, found through the vocabulary only (the text itself never tokenizes to it).
    marker = "Ġ" if any(t.startswith("Ġ") for t in tok.get_vocab()) else "▁"
    tok.add_tokens([marker + "Widersp"])
    after = set(paper_token_set(tok, "Widerspruch"))
    assert brute_force_set(tok, "Widerspruch") <= after
    new_id = tok.convert_tokens_to_ids(marker + "Widersp")
    assert new_id not in before and new_id in after


def test_no_bare_word_start_marker(tiny_tokenizer):
    marker = [i for t, i in tiny_tokenizer.get_vocab().items() if t == "▁"]
    for w in WORDS:
        assert not set(marker) & set(paper_token_set(tiny_tokenizer, w))


def test_shared_label_beginning_is_scored_after_it(tiny_llama_path):
    """Thai เชิงบวก / เชิงลบ: the shared tokens are appended and classes differ at the next position;
    the batched scores still equal a naive forward on prompt + shared tokens."""
    lm = load_model(tiny_llama_path, dtype="fp32", device=DEVICE)
    plan = label_plan(lm.tokenizer, ["positive", "negative"], ["เชิงบวก", "เชิงลบ"])
    if not plan.common:
        pytest.skip("the tiny tokenizer splits the Thai labels differently at the first token")
    assert plan.sets[0] != plan.sets[1]
    task = load_task("amazon_polarity")
    items = [{"id": "0", "review": "ดีมาก", "label": "positive"}, {"id": "1", "review": "แย่", "label": "negative"}]
    scorer = Scorer(lm.model, lm.tokenizer, "paper")
    group = scorer.prepare(task, "th", "native", items)
    assert group.plan.common == plan.common
    for batch in scorer.batches(group):
        for i, res in zip(batch, scorer.score(group, batch)):
            ref = naive_scores(lm.model, lm.tokenizer, group.plan, group.items[i].text, "paper")
            assert res["scores"] == pytest.approx(ref, abs=1e-5)
