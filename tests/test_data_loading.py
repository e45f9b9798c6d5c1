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


# --------------------------------------------------------------------------- bad field values
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("key, value, words", [
    ("review", None, ["'review'", "null"]),
    ("review", {"a": 1}, ["'review'", "JSON object"]),
    ("review", ["a", "b"], ["'review'", "list"]),
    ("review", True, ["'review'", "boolean"]),
    ("label", True, ["'label'", "boolean", "true"]),
    ("label", False, ["'label'", "boolean", "false"]),
    ("label", None, ["'label'", "null"]),
])
def test_bad_field_values_are_refused_with_file_and_line(tmp_path, task, fmt, key, value, words):
    """Before: a null review was scored as the text "None", {"a": 1} as "{'a': 1}", true/false as classes 1/0."""
    rows = _rows("en")
    rows[4][key] = value
    path = tmp_path / f"en.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        line = 5
    else:   # one object per line after the opening bracket, as `json.dumps(indent=...)` does not
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", "utf-8")
        line = 6
    with pytest.raises(PolyalignError) as e:
        load_data(task, ["en"], str(tmp_path / f"{{lang}}.{fmt}"))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{path}:{line}: ")
    for w in words:
        assert w in msg


def test_a_short_csv_row_is_refused_with_its_line(tmp_path, task):
    rows = _rows("en")
    text = "id,review,label\n" + "".join(f'{r["id"]},"{r["review"]}",{r["label"]}\n' for r in rows[:3])
    (tmp_path / "en.csv").write_text(text + "x3\n", "utf-8")      # review and label missing: None, not text
    with pytest.raises(PolyalignError, match=r"en\.csv:5: field 'review' is null"):
        load_data(task, ["en"], str(tmp_path / "{lang}.csv"))


def test_bad_values_in_the_paper_release_layout_are_refused(tmp_path):
    paws = load_task("paws")
    root = tmp_path / "release"
    _write_paws(root, ["en", "de"])
    recs = json.loads((root / "paws" / "paws_de500_test.json").read_text("utf-8"))
    recs[2]["sentence2"] = None
    (root / "paws" / "paws_de500_test.json").write_text(json.dumps(recs, indent=1), "utf-8")
    with pytest.raises(PolyalignError, match=r"paws_de500_test\.json:\d+: field 'sentence2' is null"):
        load_data(paws, ["en", "de"], root)
    recs[2]["sentence2"], recs[3]["answer"] = "x", True
    (root / "paws" / "paws_de500_test.json").write_text(json.dumps(recs, indent=1), "utf-8")
    with pytest.raises(PolyalignError, match=r"paws_de500_test\.json:\d+: gold label 'answer' is a boolean"):
        load_data(paws, ["en", "de"], root)


# --------------------------------------------------------------------------- the PAWS release layout
PAWS_GOLD = ["same", "different"] * 10


def _write_paws(root, langs, answers=None):
    """Files in the release's PAWS layout: paws/paws_{lang}500_test.json, a JSON list of
    {"sentence1", "sentence2", "answer"}, the answer the English word in every language, parallel by index."""
    (root / "paws").mkdir(parents=True, exist_ok=True)
    for lang in langs:
        words = (answers or {}).get(lang, PAWS_GOLD)
        recs = [{"sentence1": f"{lang} first sentence {i}", "sentence2": f"{lang} second sentence {i}",
                 "answer": w} for i, w in enumerate(words)]
        (root / "paws" / f"paws_{lang}500_test.json").write_text(json.dumps(recs, ensure_ascii=False, indent=1),
                                                                  "utf-8")


def test_paws_release_layout_with_english_gold_words_in_every_file(tmp_path):
    paws = load_task("paws")
    langs = ["en", "de", "zh", "sw", "th"]
    _write_paws(tmp_path, langs)
    loaded = load_data(paws, langs, tmp_path)
    assert loaded.source == f"paper-release:{tmp_path}"
    assert loaded.issues == []      # English gold words are what this release writes: nothing to report
    for lang in langs:
        items = loaded.items[lang]
        assert [it["label"] for it in items] == PAWS_GOLD
        assert [it["id"] for it in items] == [str(i) for i in range(20)]
        assert items[3]["sentence1"] == f"{lang} first sentence 3" and items[3]["sentence2"] == f"{lang} second sentence 3"
    limited = load_data(paws, ["de"], tmp_path, limit=4)
    assert [it["id"] for it in limited.items["de"]] == ["0", "1", "2", "3"]


def test_paws_release_layout_reports_a_wrong_word(tmp_path):
    paws = load_task("paws")
    flipped = list(PAWS_GOLD)
    flipped[0] = "different"                                   # one "same" item marked different
    _write_paws(tmp_path, ["en", "de", "fr", "sw", "zh"], answers={
        "de": flipped,
        "fr": ["yes" if w == "same" else w for w in PAWS_GOLD],     # the train set's yes/no
        "sw": ["sawa" if w == "same" else w for w in PAWS_GOLD],    # a native word where English is expected
    })
    loaded = load_data(paws, ["en", "de", "fr", "sw", "zh"], tmp_path)
    by_lang = {lang: [x for x in loaded.issues if x.startswith(f"paws/{lang}:")] for lang in ("en", "de", "fr", "sw", "zh")}
    assert by_lang["en"] == [] and by_lang["zh"] == []
    assert any("same spelled 2 ways" in x and "'different'×1" in x for x in by_lang["de"])
    assert any("'yes'" in x and "matches no label word" in x for x in by_lang["fr"])
    assert any("'sawa'" in x and "not the English word 'same'" in x for x in by_lang["sw"])
    assert len(loaded.issues) == 3
    # The class still comes from the parallel English file.
    assert [it["label"] for it in loaded.items["de"]] == PAWS_GOLD
    trusted = load_data(paws, ["en", "de"], tmp_path, trust_file_labels=True)
    assert trusted.items["de"][0]["label"] == "different"
