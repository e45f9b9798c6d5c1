"""Checks of the data bundled in polyalign/resources (see docs/data-format.md and DATA.md).

Generic over every bundled task and every language of the registry: a task that is missing a
language, a file, a demo or a label word fails here (it is not skipped). Only the stdlib, yaml and
polyalign's own loaders are used, so this runs in well under a second.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from polyalign import languages
from polyalign.tasks import bundled_task_names, load_task

RES = Path(str(files("polyalign").joinpath("resources")))
LANGS = list(languages.ALL)
TASKS = bundled_task_names()

# What the paper prescribes per task; a new bundled task must be added here (test_task_is_known).
DEMO_ORDER = {
    "amazon_polarity": ["positive", "negative"],
    "snli": ["entailment", "neutral", "contradiction"] * 2,
    "paws": ["same", "different", "same", "different"],
}
EVAL_FLOOR = {"amazon_polarity": 40, "snli": 30, "paws": 30}
AGNOSTIC = {
    "amazon_polarity": {"positive": "ox", "negative": "horse"},
    "snli": {"entailment": "ox", "neutral": "goat", "contradiction": "horse"},
    "paws": {"same": "ox", "different": "horse"},
}
# Question-alignment pools that must exist: task -> (languages, minimum size).
POOLS = {"amazon_polarity": (["en", "zh", "de", "es", "sw", "hi"], 300)}

# A translated field may equal the English one only if it is this short, or one of these names.
MAX_IDENTICAL_LEN = 3
ALLOWED_IDENTICAL = frozenset({"Bluetooth", "Wi-Fi", "iPhone", "YouTube"})


# ----- helpers ----------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    assert path.is_file(), f"missing file {path.relative_to(RES.parent)}"
    rows = []
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{n}: blank line"
        obj = json.loads(line)
        assert isinstance(obj, dict), f"{path.name}:{n}: not a JSON object"
        rows.append(obj)
    return rows


@lru_cache(maxsize=None)
def eval_rows(task: str, lang: str) -> tuple:
    return tuple(_jsonl(RES / "data" / task / f"{lang}.jsonl"))


@lru_cache(maxsize=None)
def pool_rows(task: str, lang: str) -> tuple:
    return tuple(_jsonl(RES / "questions" / task / f"{lang}.jsonl"))


def _in_script(ch: str, script: str) -> bool:
    name = unicodedata.name(ch, "")
    if script == "Han":
        return name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))
    if script == "Japanese":
        return name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA",
                                "KATAKANA", "HALFWIDTH KATAKANA"))
    return name.startswith(script.upper())  # CYRILLIC, THAI, DEVANAGARI, BENGALI, LATIN


def script_share(text: str, script: str) -> float:
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    return sum(_in_script(c, script) for c in letters) / len(letters) if letters else 1.0


def _has_kana(text: str) -> bool:
    return any(unicodedata.name(c, "").startswith(("HIRAGANA", "KATAKANA")) for c in text)


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


def _sentences(s: str) -> set[str]:
    parts = re.split(r"(?<=[.!?。！？])\s*|[\n;；]", s)
    return {_norm(p) for p in parts if len(_norm(p)) >= 25}


STOP = frozenset("a an the and or but of to in on at for with by from as is are was were be been it its "
                 "this that these those my our your his her their i we you he she they me us them not no "
                 "so too very all every one".split())


def _content(s: str) -> set[str]:
    """Content words of an English text, cut to five letters so that inflections match."""
    return {w[:5] for w in re.findall(r"[^\W\d_]+", s.casefold()) if w not in STOP}


def _texts(task: str, lang: str):
    """(kind, where, text) for every text in language `lang` of the task: the template's own words,
    the native label words, the demos' fields and the evaluation items' fields."""
    t = load_task(task)
    spec = t.languages[lang]
    yield "template", f"{task}/{lang} template", re.sub(r"\{[a-z_0-9]+\}", " ", spec.template)
    for cls, word in spec.native.items():
        yield "label", f"{task}/{lang} native[{cls}]", word
    for i, d in enumerate(spec.demos):
        for f in t.fields:
            yield "demo", f"{task}/{lang} demo {i} {f}", d[f]
    for row in eval_rows(task, lang):
        for f in t.fields:
            yield "item", f"{task}/{lang} {row['id']} {f}", row[f]


# ----- task files -------------------------------------------------------------------------------
def test_there_are_bundled_tasks():
    assert {"amazon_polarity", "snli", "paws"} <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_task_is_known(task):
    """Every bundled task has its demo order, eval floor and agnostic words recorded above."""
    assert task in DEMO_ORDER and task in EVAL_FLOOR and task in AGNOSTIC


@pytest.mark.parametrize("task", TASKS)
def test_task_file_parses_and_is_consistent(task):
    raw = yaml.safe_load((RES / "tasks" / f"{task}.yaml").read_text("utf-8"))
    assert all(isinstance(k, str) for k in raw["languages"]), "a language key is not a string (quote \"no\")"
    t = load_task(task)
    assert t.name == task
    assert t.shots == len(DEMO_ORDER[task])
    assert set(t.labels) >= {"english", "agnostic"}
    for mode, words in t.labels.items():
        assert set(words) == set(t.classes), mode
        assert all(w.strip() for w in words.values()), f"empty {mode} label word"
        assert len(set(words.values())) == len(t.classes), f"{mode} label words are not distinct"


@pytest.mark.parametrize("task", TASKS)
def test_agnostic_labels_are_the_documented_ones(task):
    assert load_task(task).labels["agnostic"] == AGNOSTIC[task]


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("task", TASKS)
def test_language_entry(task, lang):
    t = load_task(task)
    assert lang in t.languages, f"task {task} has no entry for {lang}"
    spec = t.languages[lang]
    assert spec.template.endswith(t.close), "template must end with the answer cue"
    assert set(spec.native) == set(t.classes), "native labels must cover every class"
    assert all(w.strip() for w in spec.native.values()), "empty native label word"
    assert len(set(spec.native.values())) == len(t.classes), "native label words are not distinct"
    assert [d["label"] for d in spec.demos] == DEMO_ORDER[task], "demos not in the paper's order"
    for d in spec.demos:
        for f in t.fields:
            assert isinstance(d[f], str) and d[f].strip(), f"empty demo field {f}"
    t.prompt(lang, {f: "x" for f in t.fields}, mode="native")  # the template formats


@pytest.mark.parametrize("task", TASKS)
def test_demos_are_parallel(task):
    t = load_task(task)
    en = t.languages["en"].demos
    for lang in LANGS:
        assert [d["label"] for d in t.languages[lang].demos] == [d["label"] for d in en], lang


# ----- evaluation sets --------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("task", TASKS)
def test_eval_file(task, lang):
    t = load_task(task)
    rows = eval_rows(task, lang)
    assert len(rows) >= EVAL_FLOOR[task], f"{task}/{lang}: {len(rows)} items < {EVAL_FLOOR[task]}"
    ids = [r.get("id") for r in rows]
    assert len(set(ids)) == len(ids), "duplicate ids"
    for r in rows:
        assert set(r) == {"id", "label", *t.fields}, f"{r.get('id')}: keys {sorted(r)}"
        assert r["label"] in t.classes, f"{r['id']}: label {r['label']!r} is not a class name"
        for f in t.fields:
            assert isinstance(r[f], str) and r[f].strip() and "\n" not in r[f], f"{r['id']}: bad {f}"


@pytest.mark.parametrize("task", TASKS)
def test_eval_sets_are_parallel(task):
    en = [(r["id"], r["label"]) for r in eval_rows(task, "en")]
    for lang in LANGS:
        other = [(r["id"], r["label"]) for r in eval_rows(task, lang)]
        assert other == en, f"{task}/{lang} is not parallel to en (ids/labels/order differ)"


@pytest.mark.parametrize("task", TASKS)
def test_eval_classes_balanced_and_alternating(task):
    t = load_task(task)
    labels = [r["label"] for r in eval_rows(task, "en")]
    counts = Counter(labels)
    assert set(counts) == set(t.classes), "a class has no items"
    assert max(counts.values()) - min(counts.values()) <= 1, f"unbalanced: {dict(counts)}"
    k = len(t.classes)
    assert labels == [t.classes[i % k] for i in range(len(labels))], "classes do not alternate"


# ----- text quality -----------------------------------------------------------------------------
SCRIPT_LANGS = [c for c in LANGS if languages.get(c).script != "Latin"]


@pytest.mark.parametrize("lang", SCRIPT_LANGS)
@pytest.mark.parametrize("task", TASKS)
def test_text_is_in_the_language_script(task, lang):
    script = languages.get(lang).script
    bad = [(where, text) for _, where, text in _texts(task, lang) if script_share(text, script) <= 0.5]
    assert not bad, f"{len(bad)} texts not mostly in {script}, e.g. {bad[:3]}"
    if lang == "ja":  # Japanese sentences carry kana; a long all-Han text is probably Chinese
        bad = [where for kind, where, text in _texts(task, lang) if kind in ("demo", "item")
               and sum(unicodedata.category(c).startswith("L") for c in text) >= 8 and not _has_kana(text)]
        assert not bad, f"Japanese text without kana (Chinese?): {bad[:3]}"
    if lang == "zh":
        bad = [where for _, where, text in _texts(task, lang) if _has_kana(text)]
        assert not bad, f"Chinese text with kana: {bad[:3]}"


@pytest.mark.parametrize("lang", [c for c in LANGS if c != "en"])
@pytest.mark.parametrize("task", TASKS)
def test_translations_differ_from_english(task, lang):
    t = load_task(task)

    def same(a: str, b: str) -> bool:
        return a.strip() == b.strip() and len(a.strip()) > MAX_IDENTICAL_LEN and a.strip() not in ALLOWED_IDENTICAL

    bad = []
    for i, (d, e) in enumerate(zip(t.languages[lang].demos, t.languages["en"].demos)):
        bad += [f"demo {i} {f}" for f in t.fields if same(d[f], e[f])]
    for r, e in zip(eval_rows(task, lang), eval_rows(task, "en")):
        bad += [f"{r['id']} {f}" for f in t.fields if same(r[f], e[f])]
    assert not bad, f"{task}/{lang}: left identical to English: {bad[:5]}"


# ----- question-alignment pools -----------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(POOLS))
def test_required_pool_exists(task):
    langs, floor = POOLS[task]
    for lang in langs:
        assert len(pool_rows(task, lang)) >= floor, f"questions/{task}/{lang}: fewer than {floor}"


def _pool_dirs():
    base = RES / "questions"
    found = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    return sorted(found | set(POOLS))


@pytest.mark.parametrize("task", _pool_dirs())
def test_pool_is_parallel_and_well_formed(task):
    assert task in TASKS, f"question pool for unknown task {task}"
    t = load_task(task)
    langs = POOLS.get(task, (sorted(p.stem for p in (RES / "questions" / task).glob("*.jsonl")), 0))[0]
    assert "en" in langs
    en_ids = [r.get("id") for r in pool_rows(task, "en")]
    assert len(set(en_ids)) == len(en_ids), "duplicate pool ids"
    for lang in langs:
        rows = pool_rows(task, lang)
        assert [r.get("id") for r in rows] == en_ids, f"questions/{task}/{lang} not parallel to en"
        for r in rows:
            assert set(r) == {"id", *t.fields}, f"{lang} {r.get('id')}: keys {sorted(r)} (no label)"
            assert all(isinstance(r[f], str) and r[f].strip() for f in t.fields), f"{lang} {r['id']}"
        if lang != "en":
            same = [r["id"] for r, e in zip(rows, pool_rows(task, "en"))
                    if any(r[f].strip() == e[f].strip() and len(r[f].strip()) > MAX_IDENTICAL_LEN
                           for f in t.fields)]
            assert not same, f"questions/{task}/{lang}: left identical to English: {same[:5]}"
        script = languages.get(lang).script
        if script != "Latin":
            bad = [r["id"] for r in rows if any(script_share(r[f], script) <= 0.5 for f in t.fields)]
            assert not bad, f"questions/{task}/{lang}: not mostly in {script}: {bad[:5]}"


@pytest.mark.parametrize("task", _pool_dirs())
def test_pool_shares_no_text_with_eval_set_or_demos(task):
    t = load_task(task)
    langs = [p.stem for p in sorted((RES / "questions" / task).glob("*.jsonl"))]
    for lang in langs:
        held = [r[f] for r in eval_rows(task, lang) for f in t.fields]
        held += [d[f] for d in t.languages[lang].demos for f in t.fields]
        held_full = {_norm(s) for s in held}
        held_sents = set().union(*map(_sentences, held))
        for r in pool_rows(task, lang):
            for f in t.fields:
                assert _norm(r[f]) not in held_full, f"questions/{task}/{lang} {r['id']} is an eval/demo text"
                shared = _sentences(r[f]) & held_sents
                assert not shared, f"questions/{task}/{lang} {r['id']} shares a sentence: {shared}"


@pytest.mark.parametrize("task", _pool_dirs())
def test_pool_has_no_near_copies_of_eval_items(task):
    """An English pool question must not paraphrase an evaluation item or demo: at most 60% of the
    shorter text's content words (first five letters) may recur in the other."""
    t = load_task(task)
    held = [(r["id"], r[f]) for r in eval_rows(task, "en") for f in t.fields]
    held += [(f"demo {i}", d[f]) for i, d in enumerate(t.languages["en"].demos) for f in t.fields]
    held = [(w, _content(s)) for w, s in held]
    close = []
    for r in pool_rows(task, "en"):
        for f in t.fields:
            c = _content(r[f])
            for where, h in held:
                n = min(len(c), len(h))
                if n >= 6 and len(c & h) / n >= 0.6:
                    close.append(f"{r['id']} ~ {where}")
    assert not close, f"questions/{task}/en paraphrases held-out items: {close}"


# ----- template punctuation, the data card's tables, the bilingual review -------------------------
# A template line is a bare placeholder or "<field name>: " and then a placeholder or the answer cue.
TEMPLATE_LINE = re.compile(r'\{[a-z_0-9]+\}|[^:：{}"]+: (\{[a-z_0-9]+\}|")')


@pytest.mark.parametrize("task", TASKS)
def test_templates_use_one_colon_convention(task):
    """Field names take an ASCII colon and a space in every language and task (zh/ja included), so a
    language's prompts do not switch punctuation from one task to the next (DATA.md says why ASCII)."""
    t = load_task(task)
    bad = [(lang, line) for lang, spec in t.languages.items() for line in spec.template.split("\n")
           if not TEMPLATE_LINE.fullmatch(line)]
    assert not bad, f"{task}: template lines off the `Name: ` convention: {bad[:4]}"


def _card_tables() -> dict[str, dict[str, list[str]]]:
    """DATA.md's native-word tables: task -> lang -> [field names..., label words in class order]."""
    text = (RES.parents[1] / "DATA.md").read_text("utf-8")
    out, task = {}, None
    for line in text.splitlines():
        m = re.match(r"\*\*(\w+)\*\* \(template", line)
        if m:
            task = m.group(1)
            out[task] = {}
        elif task and line.startswith("| ") and not line.startswith(("| lang", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[task][cells[0]] = [*cells[1].split(" / "), *cells[2:]]
        elif task and line.startswith("#"):
            task = None
    return out


def test_data_card_tables_match_the_task_files():
    """DATA.md's field names and native label words are the task files' (the files are the authority)."""
    tables = _card_tables()
    assert set(tables) == set(TASKS)
    for task in TASKS:
        t = load_task(task)
        assert set(tables[task]) == set(LANGS), task
        for lang in LANGS:
            spec = t.languages[lang]
            names = [line.split(": ")[0].strip() for line in spec.template.split("\n") if ": " in line]
            assert tables[task][lang] == names + [spec.native[c] for c in t.classes], f"DATA.md {task}/{lang}"


# What the bilingual review of issue 14 flagged: (task, lang, where, wording that must not come back).
# `where` is an item id, "template", "native" or "demo".
REVIEWED = [
    ("amazon_polarity", "ms", "ap-0021", "tembaga dan"),
    ("amazon_polarity", "ms", "ap-0032", "Tanjakan"),
    ("snli", "ms", "snli-0027", "tanjakan"),
    ("snli", "ms", "snli-0023", "mendahului"),
    ("amazon_polarity", "is", "ap-0001", "leitarsjónaukinn var"),
    ("amazon_polarity", "is", "ap-0025", "Frábær hnífabrýni"),
    ("amazon_polarity", "is", "ap-0041", "byrjendasett"),
    ("amazon_polarity", "is", "ap-0048", "röngum megin"),
    ("amazon_polarity", "sl", "ap-0014", "diši"),
    ("amazon_polarity", "sl", "demo", "končajo v kadi"),
    ("amazon_polarity", "sw", "ap-0004", "bahati nasibu"),
    ("amazon_polarity", "sw", "ap-0010", "haunenepi"),
    ("amazon_polarity", "sw", "ap-0016", "moja ya vijiti vyake lilivunjika"),
    ("amazon_polarity", "zh", "ap-0020", "第一次用铰链"),
    ("amazon_polarity", "hi", "ap-0034", "पियानो के सुरलिपि"),
    ("snli", "ja", "snli-0012", "ソフトクリームのコーン"),
    ("snli", "zh", "demo", "一位老人"),
    ("snli", "bn", "template", "অনুমান"),
    ("snli", "bn", "native", "অনুসিদ্ধান্ত"),
    ("snli", "bn", "native", "বিরোধ"),
    ("snli", "ru", "native", "нейтрально"),    # an adverb among nouns
    ("snli", "sw", "native", "haijulikani"),   # a clause among nouns
]


@pytest.mark.parametrize("task,lang,where,wording", REVIEWED)
def test_reviewed_wording_stays_fixed(task, lang, where, wording):
    t = load_task(task)
    spec = t.languages[lang]
    if where == "template":
        texts = [spec.template]
    elif where == "native":
        texts = list(spec.native.values())
    elif where == "demo":
        texts = [d[f] for d in spec.demos for f in t.fields]
    else:
        texts = [r[f] for r in eval_rows(task, lang) if r["id"] == where for f in t.fields]
        assert texts, f"{task}/{lang}: no item {where}"
    hits = [s for s in texts if (s == wording if where == "native" else wording in s)]
    assert not hits, f"{task}/{lang} {where}: the review's {wording!r} is back: {hits[0]}"
