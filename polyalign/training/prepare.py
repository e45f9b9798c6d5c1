"""`polyalign prepare`: question-alignment training pairs (the paper's method: questions only, no answers).

For a setting such as "zh/de => en", every parallel question i gives one pair per source language:
    input  = task.query(src, item_src) + "\\nTranslate the input from {Source} to {Target}:\\n"
    output = task.query(tgt, item_tgt)
where task.query is the evaluator's query (translated field names, dangling answer cue). No demos and
no gold answers ever appear. Pairs are deduplicated, mixed at random with a seed, and 5% are held out
for validation, by question (all languages of one question land on the same side of the split).

Where the parallel questions come from (`--data`):
- absent: the bundled pool, polyalign/resources/questions/<task>/<lang>.jsonl;
- the paper's release folder (holds <task>/<task>_<lang>10k_train_question.json, whose `input` and
  `answer` already are the pair; English targets only);
- parallel files: a pattern with {lang} (`qs/{lang}.jsonl`), or a folder holding <task>/<lang>.jsonl;
- with `--translator hf-mt:MODEL` or `llm:MODEL`: English questions (a .json/.jsonl/.csv file,
  `hf:NAME[@SPLIT]`, or the bundled English pool) translated into every other language needed,
  through a content-keyed translation cache.

Outputs (built in a temporary folder, then renamed into place): train.jsonl, val.jsonl (records
{"id","source","target","input","output"}), manifest.json, and the LLaMA-Factory export
dataset_info.json + alpaca_train.json + alpaca_val.json.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from polyalign import config as C
from polyalign import languages
from polyalign.config import option
from polyalign.data import read_records
from polyalign.errors import PolyalignError
from polyalign.store import RunRecord, atomic_folder, claim_output, content_hash, safe_name, write_json, write_jsonl
from polyalign.tasks import Task, load_task

log = logging.getLogger(__name__)

INSTRUCTION = "\nTranslate the input from {source} to {target}:\n"


@dataclass
class PrepareConfig:
    """The options of `polyalign prepare` (the CLI, experiment files and Python read them from here)."""
    task: str = option("snli", help="task name (amazon_polarity, snli, paws) or a task YAML path")
    sources: str = option("zh,de", required=True, help="source languages, a comma list such as zh,de")
    target: str = option("en", help="target language")
    output: str = option("data/prepared", required=True, help="output folder (must be new, or hold the same run)")
    per_language: int | None = option(10000, help="parallel questions per source language (file order)")
    data: str | None = option(None, help="paper-release folder, parallel files with {lang} (qs/{lang}.jsonl), a "
                                         "folder with <task>/<lang>.jsonl, or with --translator the English "
                                         "questions (file or hf:NAME[@SPLIT]); default: the bundled question pool")
    translator: str | None = option(None, help="hf-mt:MODEL (NLLB, M2M100, mBART-50, Marian) or llm:MODEL")
    fields: str | None = option(None, help="map task fields to English source columns: review=content")
    translation_cache: str | None = option(None, help="translation cache JSONL (default: <polyalign cache>/"
                                                      "translations.jsonl)")
    val_size: float = option(0.05, help="validation share (<1) or number of pairs (>=1)")
    seed: int = option(42, help="seed of the split and the mix")
    batch_size: int = option(16, help="translator batch size")
    num_beams: int = option(1, help="beam size of the hf-mt translator")
    device: str = C.device_option("translator device")
    dtype: str = C.dtype_option("translator dtype")
    progress: bool = C.progress_option()


def summary_line(cfg: PrepareConfig, manifest: dict) -> str:
    """What `polyalign prepare` prints when it is done."""
    c = manifest["counts"]
    per = ", ".join(f"{s}: {v['pairs']}" for s, v in c["per_source"].items())
    return (f"prepared {c['train']} train + {c['val']} val pairs ({per}; "
            f"{sum(manifest['dropped_duplicates'].values())} duplicates dropped) in {cfg.output}")


# ----------------------------------------------------------------------------- sources of questions
def _check_items(task: Task, lang: str, items: list[dict], where: str) -> list[dict]:
    out = []
    for i, rec in enumerate(items):
        item = {"id": str(rec.get("id", i))}
        for f in task.fields:
            if f not in rec:
                raise PolyalignError(f"{where}: item {item['id']} lacks field {f!r} (has {sorted(rec)})")
            value = rec[f]
            if value is None or not str(value).strip():
                raise PolyalignError(f"{where}: item {item['id']} has an empty {f!r}")
            item[f] = str(value)
        out.append(item)
    return out


def _check_parallel(per_lang: dict[str, list[dict]], where: dict[str, str]) -> None:
    langs = list(per_lang)
    first = langs[0]
    for lang in langs[1:]:
        a, b = per_lang[first], per_lang[lang]
        if len(a) != len(b):
            raise PolyalignError(f"parallel files differ in length: {where[lang]} has {len(b)} questions, "
                                 f"{where[first]} has {len(a)}")
        for n, (x, y) in enumerate(zip(a, b), 1):
            if x["id"] != y["id"]:
                raise PolyalignError(f"parallel files disagree at question {n}: id {y['id']!r} in {where[lang]}, "
                                     f"{x['id']!r} in {where[first]}")


def _release_files(root: Path, task: str, lang: str) -> list[Path]:
    pats = [f"{task}_{lang}*_train_question.json"]
    found = []
    for base in (root / task, root):
        if base.is_dir():
            for pat in pats:
                found += sorted(base.glob(pat))
    return found


def _is_release(root: Path, task: str) -> bool:
    return root.is_dir() and any(_release_files(root, task, lang) for lang in languages.ALL)


def _release_pairs(task: Task, sources: list[str], target: str, root: Path, n: int | None):
    """The paper's question files: `input` already holds query + instruction, `answer` the English query."""
    if target != "en":
        raise PolyalignError(f"the paper release's question files hold English outputs only; for target "
                             f"{target!r} use parallel files (--data 'qs/{{lang}}.jsonl') or --translator")
    pairs, issues, counts, where = [], [], {}, {}
    for src in sources:
        found = _release_files(root, task.name, src)
        if not found:
            have = sorted({lang for lang in languages.ALL if _release_files(root, task.name, lang)})
            raise PolyalignError(f"{root} has no {task.name} question file for {src!r} "
                                 f"(has: {' '.join(have) or 'none'})")
        path = found[0]
        where[src] = str(path)
        records = read_records(path)
        expected = INSTRUCTION.format(source=languages.get(src).name, target="English")
        odd = 0
        taken = records[:n] if n else records
        for i, rec in enumerate(taken):
            for key in ("input", "answer"):
                if key not in rec:
                    raise PolyalignError(f"{path}: item {i} lacks field {key!r} (has {sorted(rec)})")
                if not str(rec[key]).strip():
                    raise PolyalignError(f"{path}: item {i} has an empty {key!r}")
            if not str(rec["input"]).endswith(expected):
                odd += 1
            pairs.append({"id": f"{src}-{i}", "group": str(i), "source": src, "target": "en",
                          "input": str(rec["input"]), "output": str(rec["answer"])})
        counts[src] = len(taken)
        if odd:
            issues.append(f"{path.name}: {odd} inputs do not end with {expected!r}")
    return pairs, counts, issues, {"kind": "paper-release", "files": where}


def _pool_path(task: Task, lang: str) -> Path:
    return Path(str(files("polyalign").joinpath(f"resources/questions/{task.name}/{lang}.jsonl")))


def _parallel_items(task: Task, langs: list[str], data: str | None) -> tuple[dict, dict, str]:
    """lang -> checked items, parallel by index, from the bundled pool or parallel files."""
    where = {}
    for lang in langs:
        if data is None:
            path = _pool_path(task, lang)
            if not path.is_file():
                have = sorted(p.stem for p in path.parent.glob("*.jsonl")) if path.parent.is_dir() else []
                raise PolyalignError(f"the bundled question pool has no {task.name}/{lang}.jsonl "
                                     f"(has: {' '.join(have) or 'none'}); pass --data or --translator")
        elif "{lang}" in data:
            path = Path(data.replace("{task}", task.name).replace("{lang}", lang))
        else:
            root = Path(data)
            path = next((p for p in (root / task.name / f"{lang}.jsonl", root / f"{lang}.jsonl") if p.is_file()),
                        root / task.name / f"{lang}.jsonl")
        if not path.is_file():
            raise PolyalignError(f"question file not found: {path}")
        where[lang] = str(path)
    per_lang = {lang: _check_items(task, lang, read_records(where[lang]), where[lang]) for lang in langs}
    _check_parallel(per_lang, where)
    kind = "bundled-pool" if data is None else "parallel-files"
    return per_lang, where, kind


def _english_items(task: Task, data: str | None, fields: str | None, n: int | None) -> tuple[list[dict], str]:
    mapping = {f: f for f in task.fields}
    if fields:
        for part in fields.split(","):
            key, sep, col = part.partition("=")
            if not sep or key.strip() not in task.fields:
                raise PolyalignError(f"--fields {fields!r}: use TASKFIELD=COLUMN with task fields {task.fields}")
            mapping[key.strip()] = col.strip()
    if data is None:
        path = _pool_path(task, "en")
        if not path.is_file():
            raise PolyalignError(f"the bundled question pool has no English {task.name} questions; pass --data")
        records, where = read_records(path), str(path)
    elif data.startswith("hf:"):
        import datasets
        name, _, split = data[3:].partition("@")
        split = split or "train"
        if n:
            split = f"{split}[:{n}]"
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # the hub raises many types
            raise PolyalignError(f"cannot load Hugging Face dataset {name!r}: {str(e).strip().splitlines()[0]}") from None
        records, where = [dict(r) for r in ds], data
    else:
        p = Path(data)
        if p.is_dir():
            cands = [p / task.name / "en.jsonl", p / "en.jsonl", *sorted((p / task.name).glob(f"{task.name}_en*train*.json"))]
            p = next((c for c in cands if c.is_file()), None)
            if p is None:
                raise PolyalignError(f"{data}: no English {task.name} questions found (en.jsonl or "
                                     f"{task.name}_en*train*.json)")
        records, where = read_records(p), str(p)
    records = records[:n] if n else records
    renamed = []
    for i, rec in enumerate(records):
        item = {"id": str(rec.get("id", i))}
        for f, col in mapping.items():
            if col not in rec:
                raise PolyalignError(f"{where}: item {i} lacks column {col!r} for field {f!r} "
                                     f"(has {sorted(rec)}; map it with --fields {f}=COLUMN)")
            item[f] = rec[col]
        renamed.append(item)
    return _check_items(task, "en", renamed, where), where


def _translated_items(task: Task, langs: list[str], cfg: PrepareConfig) -> tuple[dict, dict]:
    from polyalign.models import cache_dir
    from polyalign.training.translate import TranslationCache, make_translator

    english, where = _english_items(task, cfg.data, cfg.fields, cfg.per_language)
    cache = TranslationCache(cfg.translation_cache or cache_dir() / "translations.jsonl")
    examples = {}
    if task.fields:   # parallel few-shot examples for the llm backend: the task's own demos
        for lang in set(langs) | {"en"}:
            if lang in task.languages and task.languages[lang].demos:
                examples[lang] = [d[task.fields[0]] for d in task.languages[lang].demos[:2]]
    tr = make_translator(cfg.translator, cache, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                         num_beams=cfg.num_beams, examples=examples, progress=cfg.progress)
    out = {"en": english}
    for lang in langs:
        if lang == "en":
            continue
        columns = {f: tr.translate([it[f] for it in english], "en", lang) for f in task.fields}
        items = []
        for i, it in enumerate(english):
            item = {"id": it["id"], **{f: columns[f][i] for f in task.fields}}
            for f in task.fields:
                if not item[f].strip():
                    raise PolyalignError(f"translator {cfg.translator} returned an empty {f!r} for item "
                                         f"{it['id']} ({lang}); try another model")
            items.append(item)
        out[lang] = items
    return out, {"kind": "translated", "english": where, "translator": cfg.translator,
                 "cache": str(cache.path), "model_batches": tr.calls}


def build_pairs(task: Task, per_lang: dict[str, list[dict]], sources: list[str], target: str,
                n: int | None) -> tuple[list[dict], dict]:
    tname = languages.get(target).name
    pairs, counts = [], {}
    for src in sources:
        items = per_lang[src][:n] if n else per_lang[src]
        tgt_items = per_lang[target]
        instruction = INSTRUCTION.format(source=languages.get(src).name, target=tname)
        for item, titem in zip(items, tgt_items):
            pairs.append({"id": f"{src}-{item['id']}", "group": item["id"], "source": src, "target": target,
                          "input": task.query(src, item) + instruction, "output": task.query(target, titem)})
        counts[src] = len(items)
    return pairs, counts


def split_pairs(pairs: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole questions (all their languages) for validation; shuffle both sides with the seed."""
    rng = random.Random(seed)
    n_val = 0
    if val_size > 0 and len(pairs) >= 2:
        n_val = int(val_size) if val_size >= 1 else max(1, round(val_size * len(pairs)))
        n_val = min(n_val, len(pairs) - 1)
    groups = list(dict.fromkeys(p["group"] for p in pairs))
    rng.shuffle(groups)
    size = {}
    for p in pairs:
        size[p["group"]] = size.get(p["group"], 0) + 1
    held, count = set(), 0
    for g in groups:
        if count >= n_val:
            break
        held.add(g)
        count += size[g]
    train = [p for p in pairs if p["group"] not in held]
    val = [p for p in pairs if p["group"] in held]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _record(p: dict) -> dict:
    return {k: p[k] for k in ("id", "source", "target", "input", "output")}


def _dataset_name(output: Path) -> str:
    return safe_name(output.resolve().name, fallback="polyalign")


# A prepared folder holds its settings in manifest.json; any other non-empty folder is refused.
PREPARED_SET = RunRecord("manifest.json", clash="already holds a different prepared set",
                         damaged="choose another --output", foreign="prepared set; choose another folder",
                         settings_of=lambda manifest: manifest.get("settings", {}), all_keys=True)


def prepare(cfg: PrepareConfig) -> dict:
    started = time.time()
    task = load_task(cfg.task)
    sources = [s.strip() for s in (cfg.sources or "").split(",") if s.strip()]
    if not sources:
        raise PolyalignError("--sources is empty; give languages such as zh,de")
    for code in [*sources, cfg.target]:
        languages.get(code)
    if cfg.target in sources:
        raise PolyalignError(f"source language {cfg.target!r} equals the target; a pair must cross languages")
    if len(set(sources)) != len(sources):
        raise PolyalignError(f"--sources {cfg.sources!r} repeats a language")
    if cfg.per_language is not None and cfg.per_language <= 0:
        raise PolyalignError("--per-language must be a positive number")
    if cfg.val_size < 0 or (cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size)):
        raise PolyalignError("--val-size must be a fraction in [0, 1) or a whole number of pairs")
    out = Path(cfg.output)
    settings = {"task": task.name, "task_file": content_hash(Path(task.path).read_text("utf-8")),
                "sources": sources, "target": cfg.target, "per_language": cfg.per_language, "data": cfg.data,
                "translator": cfg.translator, "fields": cfg.fields, "val_size": cfg.val_size, "seed": cfg.seed}
    existing = claim_output(out, PREPARED_SET, settings)

    issues: list[str] = []
    if cfg.translator:
        per_lang, origin = _translated_items(task, [*sources, cfg.target], cfg)
        pairs, counts = build_pairs(task, per_lang, sources, cfg.target, cfg.per_language)
    elif cfg.data and not cfg.data.startswith("hf:") and "{lang}" not in cfg.data and _is_release(Path(cfg.data), task.name):
        pairs, counts, issues, origin = _release_pairs(task, sources, cfg.target, Path(cfg.data), cfg.per_language)
    elif cfg.data and cfg.data.startswith("hf:"):
        raise PolyalignError("hf: datasets hold English questions; pass --translator to translate them")
    else:
        per_lang, where, kind = _parallel_items(task, [*sources, cfg.target], cfg.data)
        pairs, counts = build_pairs(task, per_lang, sources, cfg.target, cfg.per_language)
        origin = {"kind": kind, "files": where}
    if cfg.per_language:
        for src, c in counts.items():
            if c < cfg.per_language:
                issues.append(f"{src}: only {c} questions available (asked for {cfg.per_language})")
    for line in issues:
        log.warning("prepare: %s", line)

    # Drop duplicate pairs (the first occurrence stays), then split and mix with the seed.
    seen, kept, dropped = set(), [], {s: 0 for s in sources}
    for p in pairs:
        key = (p["input"], p["output"])
        if key in seen:
            dropped[p["source"]] += 1
            continue
        seen.add(key)
        kept.append(p)
    if not kept:
        raise PolyalignError("no question pairs were built; check --data and --sources")
    train, val = split_pairs(kept, cfg.val_size, cfg.seed)
    data_hash = content_hash([[_record(p) for p in train], [_record(p) for p in val]])
    if existing is not None:
        if existing.get("data_hash") != data_hash:
            raise PolyalignError(f"{out} holds a set built from other source data (the files changed since); "
                                 f"choose another --output")
        log.warning("prepare: %s already holds this set; nothing to do", out)
        return existing

    per_source = {}
    for s in sources:
        per_source[s] = {"questions": counts.get(s, 0), "pairs": sum(p["source"] == s for p in kept),
                         "train": sum(p["source"] == s for p in train), "val": sum(p["source"] == s for p in val)}
    name = _dataset_name(out)
    manifest = {
        "settings": settings,
        "counts": {"train": len(train), "val": len(val), "pairs": len(kept), "per_source": per_source},
        "dropped_duplicates": dropped,
        "seed": cfg.seed,
        "origin": origin,
        "issues": issues,
        "data_hash": data_hash,
        "format": {"input": "task.query(source) + " + json.dumps(INSTRUCTION),
                   "output": "task.query(target)", "records": ["id", "source", "target", "input", "output"]},
        "llamafactory": {"dataset_info": "dataset_info.json", "train": f"{name}_train", "val": f"{name}_val"},
        "seconds": round(time.time() - started, 3),
    }
    info = {f"{name}_{split}": {"file_name": f"alpaca_{split}.json", "formatting": "alpaca",
                                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
            for split in ("train", "val")}

    # Build everything in a temporary sibling folder, then rename it into place (claim_output allowed
    # only an empty folder there).
    with atomic_folder(out) as tmp:
        write_jsonl(tmp / "train.jsonl", [_record(p) for p in train])
        write_jsonl(tmp / "val.jsonl", [_record(p) for p in val])
        for split, recs in (("train", train), ("val", val)):
            write_json(tmp / f"alpaca_{split}.json",
                       [{"instruction": p["input"], "input": "", "output": p["output"]} for p in recs])
        write_json(tmp / "dataset_info.json", info)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_prepared(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """(train, val) records of a prepared folder."""
    from polyalign.store import read_jsonl
    folder = Path(folder)
    return read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "val.jsonl")


__all__ = ["PrepareConfig", "prepare", "build_pairs", "split_pairs", "load_prepared", "INSTRUCTION"]
