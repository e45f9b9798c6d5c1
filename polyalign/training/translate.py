"""Translator backends for building parallel questions from English ones, with an on-disk cache.

Two backends, chosen by a spec string:
- ``hf-mt:MODEL``: any transformers seq2seq MT model (NLLB-200, M2M100, mBART-50, MarianMT), batched
  by length. The family is recognised from the tokenizer's vocabulary, and polyalign's language codes
  are mapped to that family's codes (``zh`` -> ``zho_Hans`` for NLLB, ``__zh__`` for M2M100, ...).
  MarianMT models are one per pair: put ``{src}`` and ``{tgt}`` in the name
  (``hf-mt:Helsinki-NLP/opus-mt-{src}-{tgt}``); multi-target Marian models get their ``>>xxx<<`` prefix.
- ``llm:MODEL``: self-translation with a causal LM (any name `polyalign.models.load_model` takes) and a
  few-shot translation prompt, built from parallel examples (the task's demos when it has them).

The cache is a JSONL file keyed by the content (backend spec, source, target, text): every batch is
appended as soon as it is translated, so a rerun, or a run after a crash, never translates a text twice.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from polyalign import languages
from polyalign.errors import PolyalignError
from polyalign.store import append_lines, read_jsonl

# polyalign code -> each family's code. None: the family lacks the language.
NLLB = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "sv": "swe_Latn", "zh": "zho_Hans",
        "es": "spa_Latn", "ru": "rus_Cyrl", "nl": "nld_Latn", "it": "ita_Latn", "ja": "jpn_Jpan",
        "sl": "slv_Latn", "pl": "pol_Latn", "bg": "bul_Cyrl", "no": "nob_Latn", "ms": "zsm_Latn",
        "is": "isl_Latn", "hi": "hin_Deva", "th": "tha_Thai", "sw": "swh_Latn", "bn": "ben_Beng"}
M2M100 = {c: f"__{c}__" for c in NLLB}
MBART50 = {"en": "en_XX", "de": "de_DE", "fr": "fr_XX", "sv": "sv_SE", "zh": "zh_CN", "es": "es_XX",
           "ru": "ru_RU", "nl": "nl_XX", "it": "it_IT", "ja": "ja_XX", "sl": "sl_SI", "pl": "pl_PL",
           "hi": "hi_IN", "th": "th_TH", "sw": "sw_KE", "bn": "bn_IN"}
# Target-language prefixes of multi-target Marian (OPUS-MT) models: ISO 639-3 (and a few variants).
MARIAN = {"en": ["eng"], "de": ["deu"], "fr": ["fra"], "sv": ["swe"], "zh": ["cmn_Hans", "zho_Hans", "zho", "cmn"],
          "es": ["spa"], "ru": ["rus"], "nl": ["nld"], "it": ["ita"], "ja": ["jpn"], "sl": ["slv"],
          "pl": ["pol"], "bg": ["bul"], "no": ["nob", "nor"], "ms": ["zsm_Latn", "zsm", "msa"], "is": ["isl"],
          "hi": ["hin"], "th": ["tha"], "sw": ["swa", "swh"], "bn": ["ben"]}
FAMILIES = {"nllb": NLLB, "m2m100": M2M100, "mbart50": MBART50}


def cache_key(backend: str, src: str, tgt: str, text: str) -> str:
    return hashlib.sha256(json.dumps([backend, src, tgt, text], ensure_ascii=False).encode()).hexdigest()[:32]


class TranslationCache:
    """Content-keyed translations in a JSONL file, appended batch by batch (crash-safe)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, str] = {}
        for rec in read_jsonl(self.path, repair=True):
            if "key" in rec and "translation" in rec:
                self.entries[rec["key"]] = rec["translation"]

    def get(self, backend: str, src: str, tgt: str, text: str) -> str | None:
        return self.entries.get(cache_key(backend, src, tgt, text))

    def put_many(self, backend: str, src: str, tgt: str, pairs: list[tuple[str, str]]) -> None:
        records = []
        for text, out in pairs:
            key = cache_key(backend, src, tgt, text)
            if key not in self.entries:
                self.entries[key] = out
                records.append({"key": key, "backend": backend, "src": src, "tgt": tgt, "text": text,
                                "translation": out})
        append_lines(self.path, records)


class Translator:
    """Base class: translate(texts, src, tgt) -> list of translations, through the cache."""

    spec = ""

    def __init__(self, cache: TranslationCache | None = None, batch_size: int = 16, progress: bool = False):
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.calls = 0          # model batches actually run (tests check that the cache avoids them)

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        languages.get(src), languages.get(tgt)
        if src == tgt:
            return list(texts)
        out: dict[str, str] = {}
        todo = []
        for t in dict.fromkeys(texts):
            hit = self.cache.get(self.spec, src, tgt, t) if self.cache else None
            if hit is not None:
                out[t] = hit
            elif not t.strip():
                out[t] = t
            else:
                todo.append(t)
        # Longest first, so that each batch pads little and memory peaks early.
        todo.sort(key=len, reverse=True)
        from tqdm.auto import tqdm
        with tqdm(total=len(todo), desc=f"translate {src}->{tgt}", unit="text",
                  disable=not self.progress or not todo, dynamic_ncols=True) as bar:
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                self.calls += 1
                result = self._translate_batch(chunk, src, tgt)
                out.update(zip(chunk, result))
                if self.cache:
                    self.cache.put_many(self.spec, src, tgt, list(zip(chunk, result)))
                bar.update(len(chunk))
        return [out[t] for t in texts]

    def _translate_batch(self, texts: list[str], src: str, tgt: str) -> list[str]:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------- hf-mt
def detect_family(tokenizer, model_type: str = "") -> str:
    vocab = tokenizer.get_vocab()
    if "eng_Latn" in vocab:
        return "nllb"
    if "__en__" in vocab:
        return "m2m100"
    if "en_XX" in vocab:
        return "mbart50"
    if model_type == "marian":
        return "marian"
    raise PolyalignError("cannot tell the language codes of this MT model; polyalign knows NLLB-200, "
                         "M2M100, mBART-50 and MarianMT (hf-mt:Helsinki-NLP/opus-mt-{src}-{tgt})")


class HFMTTranslator(Translator):
    def __init__(self, model: str, cache: TranslationCache | None = None, batch_size: int = 16,
                 device: str = "auto", dtype: str = "auto", num_beams: int = 1, max_new_tokens: int = 256,
                 progress: bool = False):
        super().__init__(cache, batch_size, progress)
        self.name, self.spec = model, f"hf-mt:{model}"
        self.device_name, self.dtype_name = device, dtype
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self._loaded: dict[str, tuple] = {}

    def _load(self, src: str, tgt: str):
        name = self.name.format(src=src, tgt=tgt)
        if name not in self._loaded:
            import torch
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            from polyalign.models import resolve_device, resolve_dtype
            dev = resolve_device(self.device_name)
            dtype = resolve_dtype(self.dtype_name, dev)
            if dtype == torch.float16 and dev.type == "cpu":
                dtype = torch.float32
            try:
                tok = AutoTokenizer.from_pretrained(name)
                model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=dtype).to(dev).eval()
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PolyalignError(f"cannot load MT model {name!r}: {first}") from e
            self._loaded = {name: (tok, model, detect_family(tok, model.config.model_type), dev)}
        return self._loaded[name]

    def lang_token(self, tok, family: str, code: str) -> int:
        table = FAMILIES[family]
        if table.get(code) is None:
            raise PolyalignError(f"{family} models have no code for language {code!r}")
        tid = tok.convert_tokens_to_ids(table[code])
        if tid is None or tid == tok.unk_token_id:
            raise PolyalignError(f"MT model {self.name!r} lacks the language token {table[code]!r}")
        return tid

    def _translate_batch(self, texts, src, tgt):
        import torch

        tok, model, family, dev = self._load(src, tgt)
        gen = {"num_beams": self.num_beams, "do_sample": False}
        if family == "marian":
            vocab = tok.get_vocab()
            prefix = next((f">>{c}<< " for c in [tgt, *MARIAN.get(tgt, [])] if f">>{c}<<" in vocab), "")
            if not prefix and any(t.startswith(">>") and t.endswith("<<") for t in vocab):
                raise PolyalignError(f"multi-target Marian model {self.name!r} has no prefix for {tgt!r}")
            rows = [tok(prefix + t)["input_ids"] for t in texts]
        else:
            # [src_lang] tokens [eos], as NLLB (non-legacy), M2M100 and mBART-50 encode a source.
            first = self.lang_token(tok, family, src)
            rows = [[first] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
            gen["forced_bos_token_id"] = self.lang_token(tok, family, tgt)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
        limit = min(self.max_new_tokens, 2 * width + 16)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, **gen)
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


# ----------------------------------------------------------------------------- llm
class LLMTranslator(Translator):
    """Few-shot self-translation with a causal LM; stops at the end of the line."""

    def __init__(self, model: str, cache: TranslationCache | None = None, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
                 examples: dict[str, list[str]] | None = None, progress: bool = False):
        super().__init__(cache, batch_size, progress)
        self.name, self.spec = model, f"llm:{model}"
        self.device_name, self.dtype_name, self.max_new_tokens = device, dtype, max_new_tokens
        self.examples = examples or {}    # lang -> parallel example texts (same index = same text)
        self._lm = None

    def prompt(self, text: str, src: str, tgt: str) -> str:
        s, t = languages.get(src).name, languages.get(tgt).name
        lines = [f"Translate the following text from {s} to {t}.", ""]
        for a, b in zip(self.examples.get(src, []), self.examples.get(tgt, [])):
            lines += [f"{s}: {a}", f"{t}: {b}", ""]
        lines += [f"{s}: {' '.join(text.split(chr(10)))}", f"{t}:"]
        return "\n".join(lines)

    def _translate_batch(self, texts, src, tgt):
        import torch

        from polyalign.models import load_model
        if self._lm is None:
            self._lm = load_model(self.name, self.dtype_name, self.device_name)
        model, tok = self._lm.model, self._lm.tokenizer
        rows = [tok(self.prompt(t, src, tgt))["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._lm.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self._lm.device)
        stop = [tok.eos_token_id]
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1:
            stop.append(newline[0])
        limit = min(self.max_new_tokens, 3 * max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) + 16)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                                 eos_token_id=stop, pad_token_id=pad)
        decoded = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        return [d.split("\n")[0].strip() for d in decoded]


def make_translator(spec: str, cache: TranslationCache | None = None, **kw) -> Translator:
    """`hf-mt:MODEL` or `llm:MODEL` -> a Translator."""
    kind, sep, model = spec.partition(":")
    if not sep or not model:
        raise PolyalignError(f"translator {spec!r}: use hf-mt:MODEL or llm:MODEL")
    if kind == "hf-mt":
        kw.pop("examples", None)
        return HFMTTranslator(model, cache, **kw)
    if kind == "llm":
        kw.pop("num_beams", None)
        return LLMTranslator(model, cache, **kw)
    raise PolyalignError(f"unknown translator backend {kind!r}; use hf-mt:MODEL or llm:MODEL")
