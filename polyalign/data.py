"""Evaluation data: bundled sets, local JSON/JSONL/CSV, Hugging Face datasets, and the paper's release.

Every loader returns, per language, a list of items: dicts with `id`, the task's fields, and
`label`, a canonical class name. Languages stay parallel by index.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from polyalign.errors import PolyalignError
from polyalign.tasks import Task


@dataclass
class LoadedData:
    items: dict[str, list[dict]]          # lang -> items (parallel by index)
    source: str
    issues: list[str] = field(default_factory=list)   # importer findings, one readable line each


# ----------------------------------------------------------------------------- raw readers
def read_records(path: str | Path) -> list[dict]:
    """A list of dicts from .json (list, or {"data": [...]}) / .jsonl / .csv, with precise errors."""
    p = Path(path)
    if not p.is_file():
        raise PolyalignError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    try:
        return _read_records(p, suffix)
    except UnicodeDecodeError as e:
        raise PolyalignError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_records(p: Path, suffix: str) -> list[dict]:
    if suffix == ".jsonl":
        out = []
        with p.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PolyalignError(f"{p}:{n}: malformed JSON line ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise PolyalignError(f"{p}:{n}: expected a JSON object")
                out.append(rec)
        return out
    if suffix == ".json":
        text = p.read_text("utf-8-sig")
        if not text.strip():
            return []  # an empty file is an empty dataset (reported as such by load_data)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolyalignError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(raw, dict) and isinstance(raw.get("data"), list):
            raw = raw["data"]
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise PolyalignError(f"{p}: expected a list of JSON objects")
        return raw
    if suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise PolyalignError(f"{p}: unsupported data format {suffix!r} (use .json, .jsonl, .csv or .tsv)")


def _class_of(task: Task, lang: str, value, where: str) -> str:
    """Map a gold value (class name, label word in any mode, or class index) to its canonical class."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        i = int(value)
        if 0 <= i < len(task.classes):
            return task.classes[i]
    value = str(value)
    if value in task.classes:
        return value
    for mode in ("english", "native", "agnostic"):
        try:
            words = task.label_words(lang, mode)
        except PolyalignError:
            continue
        for cls, word in words.items():
            if word.casefold() == value.casefold():
                return cls
    for alias, cls in ((task.extra.get("release") or {}).get("aliases") or {}).items():
        if str(alias) == value:
            return cls
    raise PolyalignError(f"{where}: gold label {value!r} is not in the label set {task.classes}")


def _line_of(path: Path, index: int) -> int | None:
    """The line on which record `index` of a file read by read_records starts (None if unknown)."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                nonblank = (n for n, line in enumerate(f, 1) if line.strip())
                return next(n for k, n in enumerate(nonblank) if k == index)
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
                for k, _ in enumerate(reader):
                    if k == index + 1:          # row 0 is the header
                        return reader.line_num
            return None
        if suffix == ".json":
            text, dec = path.read_text("utf-8-sig"), json.JSONDecoder()
            pos = text.index("[") + 1 if text.lstrip().startswith("[") else None
            for k in range(index + 1):
                if pos is None:
                    return None
                while text[pos] in " \t\r\n,":
                    pos += 1
                if k == index:
                    return text.count("\n", 0, pos) + 1
                _, pos = dec.raw_decode(text, pos)
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return None


def _place(where: str, index: int, path: Path | None) -> str:
    line = _line_of(path, index) if path is not None else None
    return f"{where}:{line}" if line else f"{where}: item {index}"


_KINDS = {type(None): "null", bool: "a boolean", dict: "a JSON object", list: "a list"}


def _text(value, name: str, where: str, index: int, path: Path | None) -> str:
    """A field value as text. Text and numbers are; null, booleans, objects and lists are refused,
    since str() would score them as the strings "None", "True" or "{'a': 1}"."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    kind = _KINDS.get(type(value), type(value).__name__)
    raise PolyalignError(f"{_place(where, index, path)}: field {name!r} is {kind}, not text")


def _gold(value, key: str, where: str, index: int, path: Path | None):
    """A gold label is text or a class index; a boolean (true/false) would silently read as 1/0."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    kind = _KINDS.get(type(value), type(value).__name__)
    raise PolyalignError(f"{_place(where, index, path)}: gold label {key!r} is {kind} ({json.dumps(value)}); "
                         f"give the class name, a label word or the class index")


def _to_items(task: Task, lang: str, records: list[dict], where: str, fields_map: dict | None = None,
              label_key: str | None = None, path: Path | None = None) -> list[dict]:
    fields_map = fields_map or {f: f for f in task.fields}
    items = []
    for i, rec in enumerate(records):
        missing = [src for src in fields_map.values() if src not in rec]
        if missing:
            raise PolyalignError(f"{where}: item {i} lacks field(s) {missing} (has {sorted(rec)})")
        key = label_key or next((k for k in ("label", "answer", "gold") if k in rec), None)
        if key is None:
            raise PolyalignError(f"{where}: item {i} has no label/answer field")
        item = {"id": _text(rec["id"], "id", where, i, path) if "id" in rec else str(i)}
        item.update({f: _text(rec[src], src, where, i, path) for f, src in fields_map.items()})
        item["label"] = _class_of(task, lang, _gold(rec[key], key, where, i, path), f"{where}: item {i}")
        items.append(item)
    return items


# ----------------------------------------------------------------------------- sources
def _bundled(task: Task, lang: str) -> list[dict]:
    res = files("polyalign").joinpath(f"resources/data/{task.name}/{lang}.jsonl")
    if not res.is_file():
        raise PolyalignError(f"no bundled data for task {task.name!r} in language {lang!r}; pass --data")
    return _to_items(task, lang, read_records(str(res)), f"bundled {task.name}/{lang}.jsonl", path=Path(str(res)))


def _pattern(task: Task, lang: str, pattern: str) -> list[dict]:
    path = pattern.format(lang=lang, task=task.name)
    if Path(path).is_dir():  # e.g. --data 'saved/{lang}', one `save_to_disk` folder per language
        return _hf(task, lang, path)
    return _to_items(task, lang, read_records(path), path, path=Path(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hf(task: Task, lang: str, spec: str, several: bool = False) -> list[dict]:
    """hf:NAME[@SPLIT] (NAME may hold {lang}), or a directory saved by `datasets.save_to_disk`.

    One folder may serve several languages: a DatasetDict keyed by language code, or a dataset with
    a `lang` (or `language`) column; otherwise each language needs its own folder ({lang} pattern)."""
    import datasets

    by_lang = False
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition("@")
        name = name.format(lang=lang, task=task.name)
        try:
            ds = datasets.load_dataset(name, split=split or "test")
        except Exception as e:  # hub errors come in many types
            raise PolyalignError(f"cannot load Hugging Face dataset {name!r}: {_first_line(e)}") from None
        where = name
    else:
        where = spec.format(lang=lang, task=task.name)
        try:
            ds = datasets.load_from_disk(where)
        except Exception as e:  # FileNotFoundError, or a folder that is not a saved dataset
            raise PolyalignError(f"cannot load the saved dataset at {where}: {_first_line(e)}") from None
        by_lang = isinstance(ds, datasets.DatasetDict) and lang in ds
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[lang] if by_lang else ds["test"] if "test" in ds else next(iter(ds.values()))
    records = [dict(r) for r in ds]
    column = next((c for c in ("lang", "language") if c in ds.column_names), None)
    if column:
        records = [r for r in records if r[column] == lang]
    elif several and "{lang}" not in spec and not by_lang:
        raise PolyalignError(f"{where} holds one dataset for all languages (no split per language code and no "
                             f"`lang` column); give one per language with a {{lang}} pattern")
    return _to_items(task, lang, records, where)


def _release(task: Task, langs: list[str], root: Path, trust_file_labels: bool) -> LoadedData:
    """The paper's release layout. Gold words are in the target language (or, with `answers: english`
    in the layout, in English in every file); the class of item i is read from the parallel English
    file, and each language's words are cross-checked."""
    spec = task.extra.get("release")
    if not spec:
        raise PolyalignError(f"task {task.name!r} has no `release` layout in its task file")
    def read(lang: str) -> list[dict]:
        path = root / spec["file"].format(lang=lang)
        records = read_records(path)
        for i, r in enumerate(records):
            _gold(r.get("answer", ""), "answer", str(path), i, path)
        return records

    english = read("en")
    en_classes = [_class_of(task, "en", r.get("answer"), f"{root}/{spec['file'].format(lang='en')}: item {i}")
                  for i, r in enumerate(english)]
    out, issues = {}, []
    for lang in langs:
        records = english if lang == "en" else read(lang)
        where = str(root / spec["file"].format(lang=lang))
        if len(records) != len(english):
            issues.append(f"{task.name}/{lang}: {len(records)} items, English has {len(english)}; "
                          f"using the first {min(len(records), len(english))}")
        n = min(len(records), len(english))
        # Which word does this file use for each class (by the parallel English label)?
        seen: dict[str, Counter] = defaultdict(Counter)
        for r, cls in zip(records[:n], en_classes[:n]):
            seen[cls][str(r.get("answer", ""))] += 1
        registry_cache: dict[str, str | None] = {}

        def registry_class(word: str) -> str | None:
            """The class the label registry reads `word` as (any label mode), or None."""
            if word not in registry_cache:
                try:
                    registry_cache[word] = _class_of(task, lang, word, where)
                except PolyalignError:
                    registry_cache[word] = None
            return registry_cache[word]

        english_words = task.labels.get("english", {})
        # `answers: english` in the layout: the release writes the English word in every language's
        # file (PAWS), so English is what each file must say, not a native word left untranslated.
        english_everywhere = spec.get("answers") == "english"
        native_words = task.languages[lang].native if lang in task.languages else {}
        word_to_class = {}
        for cls, words in seen.items():
            if len(words) > 1:
                issues.append(f"{task.name}/{lang}: class {cls} spelled {len(words)} ways: "
                              + ", ".join(f"{w!r}×{c}" for w, c in words.most_common()))
            for w, _ in words.most_common():
                word_to_class.setdefault(w, cls)
            top = words.most_common(1)[0][0]
            known = registry_class(top)
            native = native_words.get(cls)
            if known is None:
                issues.append(f"{task.name}/{lang}: file word {top!r} for {cls} matches no label word "
                              f"of the registry (native: {native or '?'!r})")
            elif known != cls:
                issues.append(f"{task.name}/{lang}: file word {top!r} sits on {cls} items but the registry "
                              f"reads it as {known}")
            elif english_everywhere:
                if top.casefold() != english_words.get(cls, "").casefold():
                    issues.append(f"{task.name}/{lang}: file word {top!r} for {cls} is not the English word "
                                  f"{english_words.get(cls)!r} that this release uses in every language")
            elif (lang != "en" and native and top.casefold() != native.casefold()
                  and top.casefold() == english_words.get(cls, "").casefold()):
                issues.append(f"{task.name}/{lang}: file word {top!r} for {cls} is left in English "
                              f"(native: {native!r})")
        items, changed = [], 0
        for i, (r, cls) in enumerate(zip(records[:n], en_classes[:n])):
            if trust_file_labels:
                # The file's own word decides: as the registry reads it, else as the parallel English
                # items that carry it mostly read (a word the registry does not know).
                word = str(r.get("answer", ""))
                own = registry_class(word) or word_to_class.get(word, cls)
                changed += own != cls
                cls = own
            item = {"id": str(i)}
            for f, src in spec["fields"].items():
                if src not in r:
                    raise PolyalignError(f"{where}: item {i} lacks field {src!r}")
                item[f] = _text(r[src], src, where, i, Path(where))
            item["label"] = cls
            items.append(item)
        if changed:
            issues.append(f"{task.name}/{lang}: --trust-file-labels moved {changed} of {n} items to the class "
                          f"of their own gold word")
        out[lang] = items
    return LoadedData(out, f"paper-release:{root}", issues)


def _no_layout(task: Task, root: Path, release: str | None) -> str:
    """What a --data folder was searched for, so that a wrong layout says which ones would work."""
    tried = [f"{root / task.name}/<lang>.jsonl (polyalign's layout)",
             f"{root}/dataset_dict.json or dataset_info.json (a `save_to_disk` folder)"]
    if release:
        tried.append(f"{root / release.format(lang='en')} (the paper's release)")
    return (f"--data {root}: no {task.name} data in a known layout; looked for " + ", ".join(tried)
            + "; or pass a file pattern with {lang}, e.g. DIR/{lang}.jsonl")


def load_data(task: Task, langs: list[str], data: str | os.PathLike | None = None, limit: int | None = None,
              trust_file_labels: bool = False) -> LoadedData:
    """Load `langs` of `task` from `data` (None = bundled) and apply `limit` in parallel."""
    data = None if data is None else os.fspath(data)
    need = list(dict.fromkeys(["en", *langs])) if limit else list(langs)
    if data is None:
        loaded = LoadedData({lang: _bundled(task, lang) for lang in need}, "bundled")
    elif data.startswith("hf:"):
        loaded = LoadedData({lang: _hf(task, lang, data, len(need) > 1) for lang in need}, data)
    elif "{lang}" in data:
        loaded = LoadedData({lang: _pattern(task, lang, data) for lang in need}, data)
    else:
        root = Path(data)
        if not root.exists():
            raise PolyalignError(f"data path not found: {data}")
        if (root / task.name).is_dir() and any((root / task.name).glob("*.jsonl")):
            loaded = LoadedData({lang: _pattern(task, lang, str(root / task.name / "{lang}.jsonl"))
                                 for lang in need}, str(root))
        elif (root / "dataset_dict.json").exists() or (root / "dataset_info.json").exists():
            loaded = LoadedData({lang: _hf(task, lang, str(root), len(need) > 1) for lang in need}, str(root))
        else:
            release = (task.extra.get("release") or {}).get("file")
            if not (release and (root / release.format(lang="en")).is_file()):
                raise PolyalignError(_no_layout(task, root, release))
            loaded = _release(task, need, root, trust_file_labels)
    for lang, items in loaded.items.items():
        if not items:
            raise PolyalignError(f"{task.name}/{lang}: the dataset is empty ({loaded.source})")
    if limit:
        keep = limit_indices([it["label"] for it in loaded.items["en"]], task.classes, limit)
        loaded.items = {lang: [items[i] for i in keep if i < len(items)] for lang, items in loaded.items.items()}
    loaded.items = {lang: loaded.items[lang] for lang in langs}
    return loaded


def limit_indices(labels: list[str], classes: list[str], limit: int) -> list[int]:
    """The first limit/k items of each of the k classes, in file order (remainder to the first classes)."""
    quota = {c: limit // len(classes) + (1 if i < limit % len(classes) else 0) for i, c in enumerate(classes)}
    keep = []
    for i, lab in enumerate(labels):
        if quota.get(lab, 0) > 0:
            quota[lab] -= 1
            keep.append(i)
    return keep
