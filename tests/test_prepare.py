"""`polyalign prepare`: the pair format, sources of parallel questions, translators, exports, bad input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from polyalign import cli, languages
from polyalign.errors import PolyalignError
from polyalign.training.prepare import INSTRUCTION, PrepareConfig, prepare, split_pairs
from polyalign.store import read_jsonl
from polyalign.tasks import load_task

SNLI = load_task("snli")


pytestmark = pytest.mark.usefixtures("one_thread")


def _items(lang: str, n: int, prefix: str = "q") -> list[dict]:
    return [{"id": f"{prefix}{i}", "premise": f"{lang} premise number {i}", "hypothesis": f"{lang} hypothesis {i % 5}"}
            for i in range(n)]


@pytest.fixture
def parallel(tmp_path) -> str:
    for lang in ("en", "de", "zh", "sw"):
        write_jsonl(tmp_path / "qs" / f"{lang}.jsonl", _items(lang, 40))
    return str(tmp_path / "qs" / "{lang}.jsonl")


def _cfg(tmp_path, **kw) -> PrepareConfig:
    base = dict(task="snli", sources="de,zh", target="en", output=str(tmp_path / "out"), per_language=40,
                progress=False)
    base.update(kw)
    return PrepareConfig(**base)


def test_pair_format_split_and_mixing(tmp_path, parallel):
    m = prepare(_cfg(tmp_path, data=parallel))
    out = tmp_path / "out"
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert m["counts"]["train"] == len(train) and m["counts"]["val"] == len(val)
    assert len(train) + len(val) == 80 and len(val) == 4               # 5% held out
    en = {it["id"]: it for it in _items("en", 40)}
    src_items = {lang: {it["id"]: it for it in _items(lang, 40)} for lang in ("de", "zh")}
    for r in train + val:
        assert set(r) == {"id", "source", "target", "input", "output"}
        lang, qid = r["id"].split("-", 1)
        assert r["source"] == lang and r["target"] == "en"
        name = languages.get(lang).name
        assert r["input"] == SNLI.query(lang, src_items[lang][qid]) + f"\nTranslate the input from {name} to English:\n"
        assert r["output"] == SNLI.query("en", en[qid])
        assert r["output"].endswith('Answer: "')                      # the dangling cue, no answer
        for word in ("entailment", "neutral", "contradiction"):
            assert word not in r["input"] + r["output"]                # no gold answers, no demos
    # Whole questions are held out: no question has one language in train and another in val.
    val_q = {r["id"].split("-", 1)[1] for r in val}
    assert not val_q & {r["id"].split("-", 1)[1] for r in train}
    # Languages are mixed, and the mix is reproducible from the seed.
    assert [r["source"] for r in train[:20]] != sorted(r["source"] for r in train[:20])
    again = prepare(_cfg(tmp_path, data=parallel, output=str(tmp_path / "again")))
    assert read_jsonl(tmp_path / "again" / "train.jsonl") == train and again["data_hash"] == m["data_hash"]
    other = prepare(_cfg(tmp_path, data=parallel, output=str(tmp_path / "seed7"), seed=7))
    assert read_jsonl(tmp_path / "seed7" / "train.jsonl") != train and other["seed"] == 7
    # A rerun into the same folder is a no-op.
    assert prepare(_cfg(tmp_path, data=parallel))["data_hash"] == m["data_hash"]


def test_duplicates_dropped_and_any_target(tmp_path):
    items = {lang: _items(lang, 12) for lang in ("en", "de", "zh")}
    items["de"][5] = dict(items["de"][3], id="q5")        # de question 5 repeats question 3...
    items["zh"][5] = dict(items["zh"][3], id="q5")        # ...and so does its target
    for lang, its in items.items():
        write_jsonl(tmp_path / "p" / f"{lang}.jsonl", its)
    m = prepare(_cfg(tmp_path, sources="en,de", target="zh", data=str(tmp_path / "p" / "{lang}.jsonl"),
                     val_size=0))
    assert m["dropped_duplicates"] == {"en": 0, "de": 1}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert len(train) == 23 and not read_jsonl(tmp_path / "out" / "val.jsonl")
    r = next(r for r in train if r["id"] == "en-q2")
    assert r["input"].endswith("\nTranslate the input from English to Chinese:\n")
    assert r["output"] == SNLI.query("zh", items["zh"][2]) and r["target"] == "zh"


def test_split_counts():
    pairs = [{"group": str(i // 2), "i": i} for i in range(40)]
    train, val = split_pairs(pairs, 0.05, 1)
    assert len(val) == 2 and len(train) == 38
    train, val = split_pairs(pairs, 6, 1)
    assert len(val) == 6
    assert split_pairs(pairs[:1], 0.05, 1) == (pairs[:1], [])


def test_bundled_pool_is_the_default(tmp_path):
    task = load_task("amazon_polarity")
    m = prepare(_cfg(tmp_path, task="amazon_polarity", sources="zh", per_language=10, val_size=0))
    assert m["origin"]["kind"] == "bundled-pool"
    pool = {lang: read_jsonl(Path(m["origin"]["files"][lang])) for lang in ("zh", "en")}
    rec = read_jsonl(tmp_path / "out" / "train.jsonl")[0]
    qid = rec["id"].split("-", 1)[1]
    zh = next(it for it in pool["zh"] if it["id"] == qid)
    en = next(it for it in pool["en"] if it["id"] == qid)
    assert rec["input"] == task.query("zh", zh) + INSTRUCTION.format(source="Chinese", target="English")
    assert rec["output"] == task.query("en", en)


def test_paper_release(tmp_path, shared_data):
    m = prepare(_cfg(tmp_path, sources="zh,de", per_language=50, data=str(shared_data)))
    assert m["origin"]["kind"] == "paper-release" and m["counts"]["pairs"] == 100 and not m["issues"]
    release = json.loads((shared_data / "snli" / "snli_de10k_train_question.json").read_text("utf-8"))
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "val.jsonl")}
    assert recs["de-7"]["input"] == release[7]["input"] and recs["de-7"]["output"] == release[7]["answer"]
    with pytest.raises(PolyalignError, match="English outputs only"):
        prepare(_cfg(tmp_path, sources="de", target="zh", data=str(shared_data), output=str(tmp_path / "x")))
    with pytest.raises(PolyalignError, match="no snli question file for 'fr'"):
        prepare(_cfg(tmp_path, sources="fr", data=str(shared_data), output=str(tmp_path / "y")))


def test_llamafactory_export_loads_back(tmp_path, parallel):
    prepare(_cfg(tmp_path, data=parallel))
    out = tmp_path / "out"
    info = json.loads((out / "dataset_info.json").read_text("utf-8"))
    assert set(info) == {"out_train", "out_val"}
    for split in ("train", "val"):
        spec = info[f"out_{split}"]
        assert spec["formatting"] == "alpaca"
        rows = json.loads((out / spec["file_name"]).read_text("utf-8"))
        ours = read_jsonl(out / f"{split}.jsonl")
        cols = spec["columns"]
        assert [(r[cols["prompt"]], r[cols["query"]], r[cols["response"]]) for r in rows] == \
               [(r["input"], "", r["output"]) for r in ours]
    import datasets
    ds = datasets.load_dataset("json", data_files=str(out / "alpaca_train.json"), split="train")
    assert len(ds) == len(read_jsonl(out / "train.jsonl")) and set(ds.column_names) == {"instruction", "input", "output"}


# ----------------------------------------------------------------------------- bad input
def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", ["length", "ids", "empty", "language", "same", "no-pool", "per-language"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    for lang in ("en", "de"):
        write_jsonl(tmp_path / "p" / f"{lang}.jsonl", _items(lang, 6))
    args = ["prepare", "--task", "snli", "--sources", "de", "--output", str(tmp_path / "out"),
            "--data", str(tmp_path / "p" / "{lang}.jsonl"), "--no-progress"]
    if case == "length":
        write_jsonl(tmp_path / "p" / "de.jsonl", _items("de", 5))
        expect = "differ in length"
    elif case == "ids":
        write_jsonl(tmp_path / "p" / "de.jsonl", _items("de", 6, prefix="x"))
        expect = "disagree at question 1"
    elif case == "empty":
        bad = _items("de", 6)
        bad[2]["hypothesis"] = "  "
        write_jsonl(tmp_path / "p" / "de.jsonl", bad)
        expect = "item q2 has an empty 'hypothesis'"
    elif case == "language":
        args[4] = "de,xx"
        expect = "unknown language 'xx'"
    elif case == "same":
        args[4] = "de,en"
        expect = "equals the target"
    elif case == "no-pool":
        args = args[:-3] + ["--no-progress"]
        expect = "bundled question pool has no snli"
    else:
        args += ["--per-language", "0"]
        expect = "--per-language must be a positive number"
    rc, err = _run(args, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp*"))


def test_output_holding_another_run_is_left_alone(tmp_path, capsys, parallel):
    argv = ["prepare", "--task", "snli", "--sources", "de", "--per-language", "20", "--data", parallel,
            "--output", str(tmp_path / "out"), "--no-progress"]
    assert _run(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    rc, err = _run(argv[:4] + ["zh"] + argv[5:], capsys)
    assert rc == 2 and "already holds a different prepared set (sources" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    rc, err = _run(argv[:-3] + ["--output", str(tmp_path / "junk"), "--no-progress"], capsys)
    assert rc == 2 and "not empty" in err and (tmp_path / "junk" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- translators
@pytest.fixture(scope="module")
def tiny_mt(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny random M2M100-style seq2seq model whose tokenizer has __en__/__de__/__zh__ codes."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    folder = tmp_path_factory.mktemp("mt")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["__en__", "__de__", "__zh__"]})
    config = M2M100Config(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_hf_mt_translator_and_cache(tmp_path, tiny_mt):
    from polyalign.training.translate import HFMTTranslator, TranslationCache, detect_family

    cache_path = tmp_path / "cache.jsonl"
    tr = HFMTTranslator(tiny_mt, TranslationCache(cache_path), batch_size=3, device="cpu", dtype="fp32",
                        max_new_tokens=8)
    texts = ["A dog runs.", "A cat sleeps.", "A dog runs.", "Two men talk.", "It rains.", "Sun."]
    out = tr.translate(texts, "en", "de")
    assert len(out) == 6 and out[0] == out[2] and all(isinstance(t, str) for t in out)
    assert tr.calls == 2                                   # 5 distinct texts in batches of 3
    assert detect_family(tr._load("en", "de")[0]) == "m2m100"
    rows = read_jsonl(cache_path)
    assert len(rows) == 5 and {r["tgt"] for r in rows} == {"de"}
    # A new translator (a rerun) finds everything in the cache and never runs the model.
    again = HFMTTranslator(tiny_mt, TranslationCache(cache_path), device="cpu", dtype="fp32", max_new_tokens=8)
    assert again.translate(texts, "en", "de") == out and again.calls == 0
    with pytest.raises(PolyalignError, match="no code for language 'bg'"):
        HFMTTranslator(tiny_mt, None, device="cpu", dtype="fp32").lang_token(tr._load("en", "de")[0], "mbart50", "bg")


def test_cache_survives_a_crash(tmp_path, tiny_mt):
    from polyalign.training.translate import HFMTTranslator, TranslationCache

    cache_path = tmp_path / "cache.jsonl"
    tr = HFMTTranslator(tiny_mt, TranslationCache(cache_path), batch_size=2, device="cpu", dtype="fp32",
                        max_new_tokens=4)
    real, calls = tr._translate_batch, []

    def flaky(texts, src, tgt):
        calls.append(texts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(texts, src, tgt)

    tr._translate_batch = flaky
    texts = ["one two", "three four five", "six", "seven eight"]
    with pytest.raises(KeyboardInterrupt):
        tr.translate(texts, "en", "zh")
    with open(cache_path, "ab") as f:
        f.write(b'{"key": "torn')                           # a torn tail from the kill
    done = {r["text"] for r in read_jsonl(cache_path)}
    assert done == set(calls[0])
    again = HFMTTranslator(tiny_mt, TranslationCache(cache_path), batch_size=2, device="cpu", dtype="fp32",
                           max_new_tokens=4)
    again.translate(texts, "en", "zh")
    assert again.calls == 1 and len(read_jsonl(cache_path)) == 4


def test_prepare_with_translator(tmp_path, tiny_mt):
    english = tmp_path / "en.json"
    english.write_text(json.dumps([{"premise": f"A person walks {i}.", "hypothesis": f"Someone moves {i}."}
                                   for i in range(8)]), "utf-8")
    cache = tmp_path / "tr.jsonl"
    cfg = _cfg(tmp_path, sources="de", target="en", per_language=6, data=str(english), val_size=0,
               translator=f"hf-mt:{tiny_mt}", translation_cache=str(cache), device="cpu", dtype="fp32")
    m = prepare(cfg)
    assert m["origin"]["kind"] == "translated" and m["counts"]["train"] <= 6
    recs = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert all(r["input"].startswith("Prämisse: ") and r["output"].startswith("Premise: A person walks") for r in recs)
    assert len(read_jsonl(cache)) == 12                     # 6 premises + 6 hypotheses, translated once
    m2 = prepare(PrepareConfig(**{**cfg.__dict__, "output": str(tmp_path / "o2")}))
    assert m2["origin"]["model_batches"] == 0 and m2["data_hash"] == m["data_hash"]
    with pytest.raises(PolyalignError, match="lacks column 'text'"):
        prepare(PrepareConfig(**{**cfg.__dict__, "output": str(tmp_path / "o3"), "fields": "premise=text"}))
    with pytest.raises(PolyalignError, match="use hf-mt:MODEL or llm:MODEL"):
        prepare(PrepareConfig(**{**cfg.__dict__, "output": str(tmp_path / "o4"), "translator": "google"}))


def test_llm_translator(tmp_path, tiny_llama_path):
    from polyalign.training.translate import LLMTranslator, TranslationCache

    tr = LLMTranslator(tiny_llama_path, TranslationCache(tmp_path / "c.jsonl"), batch_size=2, device="cpu",
                       dtype="fp32", max_new_tokens=6, examples={"en": ["A man reads."], "de": ["Ein Mann liest."]})
    prompt = tr.prompt("A dog runs.", "en", "de")
    assert prompt.endswith("English: A dog runs.\nGerman:") and "English: A man reads.\nGerman: Ein Mann liest." in prompt
    out = tr.translate(["A dog runs.", "Birds sing.", "A dog runs."], "en", "de")
    assert len(out) == 3 and all("\n" not in t for t in out) and tr.calls == 1
