"""Label words -> token sets, the paper's constrained-decoding rule.

A label's `paper` token set holds every vocabulary entry that spells a prefix of the label word,
with or without the tokenizer's word-start marker (SentencePiece `▁`, byte-level `Ġ`), plus the
byte-fallback token of the word's first UTF-8 byte, plus the first token the tokenizer itself
produces for each prefix (the release's Qwen rule, harmless elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte map, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass
class _VocabFacts:
    """What the label rules read from a tokenizer's vocabulary, built once per tokenizer: `get_vocab()`
    of a 262k-entry vocabulary takes ~0.4 s, and every label word of every language needs it."""
    size: int
    vocab: dict[str, int]
    byte_level: bool
    decoded: dict[str, list[int]]


def _vocab_facts(tokenizer) -> _VocabFacts:
    """Cached on the tokenizer (keyed by its length, so that added tokens rebuild it)."""
    cached = getattr(tokenizer, "_polyalign_vocab_facts", None)
    if cached is not None and cached.size == len(tokenizer):
        return cached
    vocab = tokenizer.get_vocab()
    byte_level = sum(1 for k in vocab if k.startswith("Ġ")) > 0.01 * len(vocab)
    dec = _byte_decoder()
    decoded: dict[str, list[int]] = {}
    for tok, idx in vocab.items():
        if byte_level:
            try:
                s = bytes(dec[c] for c in tok).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        else:
            s = tok.replace("▁", " ")
        decoded.setdefault(s, []).append(idx)
    facts = _VocabFacts(len(tokenizer), vocab, byte_level, decoded)
    tokenizer._polyalign_vocab_facts = facts
    return facts


def decoded_vocab(tokenizer) -> dict[str, list[int]]:
    """Surface string of every token (marker turned into a space) -> token ids."""
    return _vocab_facts(tokenizer).decoded


def byte_fallback_id(tokenizer, char: str) -> int | None:
    b = char.encode("utf-8")[0]
    vocab = _vocab_facts(tokenizer).vocab
    for name in (f"<0x{b:02X}>", f"<0x{b:02x}>"):
        if name in vocab:
            return vocab[name]
    return None


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (word-start marker as a space; byte-fallback and byte-level decoded)."""
    tok = tokenizer.convert_ids_to_tokens(token_id)
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        return bytes([int(tok[3:5], 16)])
    dec = _byte_decoder()
    if _vocab_facts(tokenizer).byte_level and all(c in dec for c in tok):
        return bytes(dec[c] for c in tok)
    return tok.replace("▁", " ").encode("utf-8")


def paper_token_set(tokenizer, word: str) -> list[int]:
    """The release's token set for `word` (sorted ids)."""
    if not word:
        return []
    dv = decoded_vocab(tokenizer)
    wbytes = word.encode("utf-8")
    ids: set[int] = set()
    for i in range(1, len(word) + 1):
        p = word[:i]
        ids.update(dv.get(p, ()))
        ids.update(dv.get(" " + p, ()))
        # The release's Qwen rule: the tokenizer's own first token for the prefix. Kept only when it
        # spells a non-empty byte prefix of the word (a bare word-start marker would match every label).
        first = tokenizer(p, add_special_tokens=False)["input_ids"]
        if first:
            b = token_bytes(tokenizer, first[0])
            b = b[1:] if b.startswith(b" ") else b
            if b and wbytes.startswith(b):
                ids.add(first[0])
    fb = byte_fallback_id(tokenizer, word[0])
    if fb is not None:
        ids.add(fb)
    return sorted(ids)


def encode_label(tokenizer, word: str) -> list[int]:
    """The label's own tokens as they follow the answer cue (which ends in an opening quote)."""
    return tokenizer(word, add_special_tokens=False)["input_ids"]


@dataclass
class LabelPlan:
    """How the classes of one (task, language, label mode) are scored.

    `common` is the token prefix that every label's tokenization shares (Thai เชิงบวก / เชิงลบ both
    start with เชิง): it is appended to the prompt and the labels are told apart at the first
    differing position, where `sets` and `first` apply. `cont` is each label's full tokenization,
    for the sequence rule. `overlaps` lists token ids that two classes' sets share."""
    classes: list[str]
    words: list[str]
    common: list[int]
    sets: list[list[int]]
    first: list[int]
    cont: list[list[int]]
    overlaps: list[tuple[str, str, list[int]]] = field(default_factory=list)

    def describe_overlaps(self, tokenizer) -> list[str]:
        out = []
        if self.common:
            out.append(f"all labels start with {tokenizer.decode(self.common)!r}; scored from the next token")
        for a, b, ids in self.overlaps:
            toks = tokenizer.convert_ids_to_tokens(ids)
            out.append(f"{a}/{b} share {len(ids)} token(s) {toks[:5]}")
        return out


def label_plan(tokenizer, classes: list[str], words: list[str]) -> LabelPlan:
    if any(not w for w in words):
        raise ValueError("empty label word")
    cont = [encode_label(tokenizer, w) for w in words]
    common: list[int] = []
    for column in zip(*cont):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if any(len(c) == len(common) for c in cont):  # one label is a whole prefix of another: keep it scorable
        common = common[: min(len(c) for c in cont) - 1]
    shared_text = tokenizer.decode(common) if common else ""
    rests = []
    for w, c in zip(words, cont):
        # The surface text after the shared tokens; fall back to decoding the remaining tokens.
        rests.append(w[len(shared_text):] if w.startswith(shared_text) else tokenizer.decode(c[len(common):]))
    sets = [paper_token_set(tokenizer, r) for r in rests]
    first = [c[len(common)] for c in cont]
    overlaps = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            both = sorted(set(sets[i]) & set(sets[j]))
            if both:
                overlaps.append((classes[i], classes[j], both))
    return LabelPlan(list(classes), list(words), common, sets, first, cont, overlaps)
