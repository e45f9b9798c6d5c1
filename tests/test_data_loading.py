"""Data loading: local JSON / JSONL / CSV, saved Hugging Face datasets, --limit, the paper-release importer."""
from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from toydata import GOLD, REVIEWS, write_task

from polyalign.data import limit_indices, load_data, read_records
from polyalign.errors import PolyalignError
from polyalign.tasks import load_task


@pytest.fixture
def task(tmp_path):
    return load_task(write_task(tmp_path / "task"))


def _rows(lang):
    # Gold given three ways: class names, the language's own label words, class indices (as text).
    native = {"positive": "positiv", "negative": "negativ"} if lang == "de" else {"positive": "positive",
                                                                                  "negative": "negative"}
    out = []
    for i, (text, gold) in enumerate(zip(REVIEWS[lang], GOLD)):
        label = [gold, native[gold], str(["positive", "negative"].index(gold))][i % 3]
        out.append({"id": f"x{i}", "review": text, "label": label})
    return out


def _hf(rows):
    """A Hugging Face dataset as the hub ships them: integer ClassLabel gold."""
    import datasets
    features = datasets.Features({"id": datasets.Value("string"), "review": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"]),
                                  **({"lang": datasets.Value("string")} if "lang" in rows[0] else {})})
    as_int = [{**r, "label": 0 if r["label"] in ("positive", "positiv", "0") else 1} for r in rows]
    return datasets.Dataset.from_list(as_int, features=features)


def _check(loaded, langs=("en", "de")):
    assert list(loaded.items) == list(langs)
    for lang in langs:
        items = loaded.items[lang]
        assert [it["id"] for it in items] == [f"x{i}" for i in range(12)]
        assert [it["label"] for it in items] == GOLD
        assert [it["review"] for it in items] == REVIEWS[lang]


@pytest.mark.parametrize("fmt", ["json", "json-data", "jsonl", "csv"])
def test_local_formats(tmp_path, task, fmt):
    for lang in ("en", "de"):
        rows = _rows(lang)
        if fmt == "json":
            (tmp_path / f"{lang}.json").write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
        elif fmt == "json-data":
            (tmp_path / f"{lang}.json").write_text(json.dumps({"data": rows}, ensure_ascii=False, indent=1), "utf-8")
        elif fmt == "jsonl":
            (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows), "utf-8")
        else:
            with open(tmp_path / f"{lang}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, ["id", "review", "label"])
                w.writeheader()
                w.writerows(rows)
    if fmt in ("jsonl", "csv"):  # files saved by Windows tools start with a byte-order mark
        bom = tmp_path / f"de.{fmt}"
        bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    ext = {"json-data": "json"}.get(fmt, fmt)
    _check(load_data(task, ["en", "de"], str(tmp_path / f"{{lang}}.{ext}")))


def test_saved_hf_dataset_per_language_folder(tmp_path, task):
    for lang in ("en", "de"):
        _hf(_rows(lang)).save_to_disk(str(tmp_path / "hf" / lang))
    _check(load_data(task, ["en", "de"], str(tmp_path / "hf" / "{lang}")))


def test_saved_hf_dataset_dict_keyed_by_language(tmp_path, task):
    import datasets
    dd = datasets.DatasetDict({lang: _hf(_rows(lang)) for lang in ("en", "de")})
    dd.save_to_disk(str(tmp_path / "dd"))
    _check(load_data(task, ["en", "de"], str(tmp_path / "dd")))


def test_saved_hf_dataset_with_lang_column(tmp_path, task):
    rows = [{**r, "lang": lang} for lang in ("de", "en") for r in _rows(lang)]
    _hf(rows).save_to_disk(str(tmp_path / "one"))
    _check(load_data(task, ["en", "de"], str(tmp_path / "one")))


def test_one_saved_dataset_for_several_languages_is_refused(tmp_path, task):
    _hf(_rows("en")).save_to_disk(str(tmp_path / "one"))
    assert len(load_data(task, ["en"], str(tmp_path / "one")).items["en"]) == 12  # one language: fine
    with pytest.raises(PolyalignError, match="one dataset for all languages"):
        load_data(task, ["en", "de"], str(tmp_path / "one"))


def test_hf_load_dataset_by_name(tmp_path, task, monkeypatch):
    """hf:NAME[@SPLIT] goes through datasets.load_dataset; a local data folder stands in for a hub name."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for lang in ("en", "de"):
        (tmp_path / "hub" / lang).mkdir(parents=True)
        (tmp_path / "hub" / lang / "validation.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(lang)), "utf-8")
    _check(load_data(task, ["en", "de"], f"hf:{tmp_path}/hub/{{lang}}@validation"))
    with pytest.raises(PolyalignError, match="cannot load Hugging Face dataset"):
        load_data(task, ["en"], f"hf:{tmp_path}/nowhere/{{lang}}")


def test_unreadable_inputs_are_user_errors(tmp_path, task):
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "1", "review": "caf\xe9", "label": "positive"}\n')
    with pytest.raises(PolyalignError, match="UTF-8"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(PolyalignError, match="unsupported"):
        read_records(tmp_path / "x.parquet")
    (tmp_path / "saved" / "en").mkdir(parents=True)  # a folder, but not a saved dataset
    with pytest.raises(PolyalignError, match="cannot load the saved dataset"):
        load_data(task, ["en"], str(tmp_path / "saved" / "{lang}"))
    (tmp_path / "en.jsonl").write_text('{"id": "1", "label": "positive"}\n')
    with pytest.raises(PolyalignError, match="lacks field"):
        load_data(task, ["en"], str(tmp_path / "{lang}.jsonl"))


# --------------------------------------------------------------------------- --limit
def test_limit_indices_first_per_class_in_file_order():
    labels = ["positive", "positive", "positive", "negative", "positive", "negative", "negative"]
    assert limit_indices(labels, ["positive", "negative"], 4) == [0, 1, 3, 5]
    assert limit_indices(labels, ["positive", "negative"], 3) == [0, 1, 3]
    assert limit_indices(labels, ["positive", "negative"], 100) == list(range(7))


def test_limit_follows_english_and_keeps_languages_parallel(tmp_path, task):
    en_labels = ["positive", "positive", "positive", "negative", "positive", "negative",
                 "negative", "negative", "positive", "negative", "positive", "negative"]
    for lang in ("en", "de"):
        # The German file's own gold is shuffled: the choice must still follow the English file.
        labels = en_labels if lang == "en" else en_labels[::-1]
        (tmp_path / f"{lang}.jsonl").write_text("".join(
            json.dumps({"id": f"x{i}", "review": t, "label": lab}, ensure_ascii=False) + "\n"
            for i, (t, lab) in enumerate(zip(REVIEWS[lang], labels))), "utf-8")
    pattern = str(tmp_path / "{lang}.jsonl")
    both = load_data(task, ["en", "de"], pattern, limit=4)
    assert [it["id"] for it in both.items["en"]] == ["x0", "x1", "x3", "x5"]
    assert [it["id"] for it in both.items["de"]] == ["x0", "x1", "x3", "x5"]
    assert Counter(it["label"] for it in both.items["en"]) == {"positive": 2, "negative": 2}
    german_only = load_data(task, ["de"], pattern, limit=4)  # English is read for the choice only
    assert list(german_only.items) == ["de"]
    assert [it["id"] for it in german_only.items["de"]] == ["x0", "x1", "x3", "x5"]


# --------------------------------------------------------------------------- paper release
def _issues(loaded, lang):
    return [line for line in loaded.issues if line.startswith(f"snli/{lang}:")]


def test_release_importer_reports_the_known_quirks(shared_data):
    snli = load_task("snli")
    langs = ["en", "ms", "no", "ja", "bn"]
    plain = load_data(snli, langs, str(shared_data))
    assert plain.source.startswith("paper-release")
    for lang in langs:
        assert len(plain.items[lang]) == 600
        assert Counter(it["label"] for it in plain.items[lang]) == {c: 200 for c in snli.classes}
        # Parallel: item i has the English item's class in every language.
        assert [it["label"] for it in plain.items[lang]] == [it["label"] for it in plain.items["en"]]
    assert not _issues(plain, "en")
    assert any("'entailment'" in x and "English" in x for x in _issues(plain, "ms"))
    no = _issues(plain, "no")
    assert any("'entailment'" in x and "English" in x for x in no)
    assert any("'motsigelse'" in x and "neutral items" in x and "contradiction" in x for x in no)
    assert any("'nøytral'" in x and "contradiction items" in x for x in no)
    assert any("中性" in x and "neutral" in x and "matches no label word" in x for x in _issues(plain, "ja"))
    assert any("ধারণ করে" in x and "entailment" in x for x in _issues(plain, "bn"))

    trusted = load_data(snli, langs, str(shared_data), trust_file_labels=True)
    en = [it["label"] for it in trusted.items["en"]]
    no_labels = [it["label"] for it in trusted.items["no"]]
    swap = {"neutral": "contradiction", "contradiction": "neutral", "entailment": "entailment"}
    assert no_labels == [swap[c] for c in en]  # the no file's words sit on the other classes
    assert any("moved 400 of 600" in x for x in _issues(trusted, "no"))
    # Words the registry does not know keep the class of the items they sit on.
    for lang in ("en", "ms", "ja", "bn"):
        assert [it["label"] for it in trusted.items[lang]] == en, lang


def test_release_importer_reports_counts_and_spellings(tmp_path, shared_data):
    root = tmp_path / "release"
    (root / "snli").mkdir(parents=True)
    en = json.loads((shared_data / "snli" / "snli_en600_test.json").read_text("utf-8"))
    ms = json.loads((shared_data / "snli" / "snli_ms600_test.json").read_text("utf-8"))
    first_entailment = next(i for i, r in enumerate(en) if r["answer"] == "entailment")
    ms[first_entailment]["answer"] = "implikasi"  # the class now spelled two ways
    (root / "snli" / "snli_en600_test.json").write_text(json.dumps(en, ensure_ascii=False), "utf-8")
    (root / "snli" / "snli_ms600_test.json").write_text(json.dumps(ms[:590], ensure_ascii=False), "utf-8")

    snli = load_task("snli")
    loaded = load_data(snli, ["en", "ms"], str(root))
    assert any("590 items" in x and "600" in x for x in _issues(loaded, "ms"))
    assert any("entailment spelled 2 ways" in x for x in _issues(loaded, "ms"))
    assert len(loaded.items["ms"]) == 590 and len(loaded.items["en"]) == 600

    limited = load_data(snli, ["en", "ms"], str(root), limit=6)
    assert [it["id"] for it in limited.items["ms"]] == [it["id"] for it in limited.items["en"]]
    assert Counter(it["label"] for it in limited.items["en"]) == {c: 2 for c in snli.classes}
    expected = limit_indices([r["answer"] for r in en], snli.classes, 6)
    assert [it["id"] for it in limited.items["en"]] == [str(i) for i in expected]
