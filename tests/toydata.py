"""A small self-contained task (YAML + parallel JSONL data) for evaluator tests.

The bundled tasks and data are still being filled in by other work, so the evaluator's own tests
write their task and data into tmp_path and pass them with --tasks PATH --data PATTERN.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

CLASSES = ["positive", "negative"]
DEMOS = {
    "en": ("Review: {review}\nAnswer: \"", {"positive": "positive", "negative": "negative"},
           ["I love it.", "It broke at once."]),
    "de": ("Rezension: {review}\nAntwort: \"", {"positive": "positiv", "negative": "negativ"},
           ["Ich liebe es.", "Es ging sofort kaputt."]),
    "zh": ("评论：{review}\n答案：\"", {"positive": "积极", "negative": "消极"},
           ["我很喜欢。", "马上就坏了。"]),
}
REVIEWS = {
    "en": ["Great kettle, boils fast.", "Broke after two days.", "Lovely book, I read it twice.",
           "Awful smell, returned it.", "Works as described.", "Never again.",
           "The battery lasts all week and the screen is sharp.", "Too small and badly stitched.",
           "Fine.", "It stopped working after one wash, and support never answered my emails.",
           "My kids adore this game.", "Cheap plastic."],
    "de": ["Toller Kessel, kocht schnell.", "Nach zwei Tagen kaputt.", "Schönes Buch, zweimal gelesen.",
           "Furchtbarer Geruch, zurückgeschickt.", "Funktioniert wie beschrieben.", "Nie wieder.",
           "Der Akku hält die ganze Woche und der Bildschirm ist scharf.", "Zu klein und schlecht genäht.",
           "Gut.", "Nach einer Wäsche ging es kaputt, und der Support hat nie geantwortet.",
           "Meine Kinder lieben dieses Spiel.", "Billiges Plastik."],
    "zh": ["好水壶，烧水很快。", "两天后就坏了。", "好书，我读了两遍。", "气味难闻，退货了。", "和描述一样好用。",
           "再也不买了。", "电池能用一周，屏幕很清晰。", "太小，缝得很差。", "还行。",
           "洗了一次就坏了，客服从不回邮件。", "孩子们很喜欢这个游戏。", "廉价的塑料。"],
}
GOLD = ["positive", "negative"] * 6


def task_dict(name: str = "toy_polarity", langs=("en", "de")) -> dict:
    languages = {}
    for lang in langs:
        template, native, demos = DEMOS[lang]
        languages[lang] = {"template": template, "native": native,
                           "demos": [{"label": c, "review": r} for c, r in zip(CLASSES, demos)]}
    return {"name": name, "shots": 2, "fields": ["review"], "classes": CLASSES,
            "labels": {"english": {"positive": "positive", "negative": "negative"},
                       "agnostic": {"positive": "ox", "negative": "horse"}},
            "languages": languages}


def write_task(folder: Path, name: str = "toy_polarity", langs=("en", "de"), **changes) -> str:
    raw = task_dict(name, langs)
    raw.update(changes)
    path = folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), "utf-8")
    return str(path)


def records(lang: str, n: int | None = None) -> list[dict]:
    rows = [{"id": f"r{i:02d}", "review": text, "label": GOLD[i]} for i, text in enumerate(REVIEWS[lang])]
    return rows[:n] if n else rows


def write_data(folder: Path, langs=("en", "de"), n: int | None = None) -> str:
    """One JSONL file per language; returns the --data pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        (folder / f"{lang}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(lang, n)), "utf-8")
    return str(folder / "{lang}.jsonl")


def toy(tmp_path: Path, langs=("en", "de"), name: str = "toy_polarity", n: int | None = None) -> tuple[str, str]:
    """(task path, data pattern) for a fresh toy task under tmp_path."""
    return write_task(tmp_path / "task", name, langs), write_data(tmp_path / "data", langs, n)


def expected_prompt(lang: str, review: str, mode: str = "english") -> str:
    """The prompt written out by hand (independently of polyalign.tasks)."""
    template, native, demos = DEMOS[lang]
    words = native if mode == "native" else {"positive": "positive", "negative": "negative"}
    text = "".join(template.format(review=d) + words[c] + '"' + "\n" for c, d in zip(CLASSES, demos))
    return text + template.format(review=review)
