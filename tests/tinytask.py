"""A tiny parallel sentiment task in five languages (task YAML + one JSONL file per language),
shared by the lens and geometry tests; each takes the languages it needs."""
from __future__ import annotations

from pathlib import Path

import yaml

from conftest import write_jsonl

LANGUAGES = {   # template, native labels (positive, negative), demos (positive, negative)
    "en": ("{review}\nEmotion: \"", ("positive", "negative"),
           ("I love this kettle, it boils water fast and looks great.",
            "The handle broke after two days and support never answered.")),
    "zh": ("{review}\n情感: \"", ("积极", "消极"), ("我很喜欢这个水壶，烧水很快，看起来也很好。", "把手两天后就坏了，客服从不回复。")),
    "de": ("{review}\nEmotion: \"", ("positiv", "negativ"),
           ("Ich liebe diesen Wasserkocher, er kocht schnell.", "Der Griff brach nach zwei Tagen ab.")),
    "ms": ("{review}\nEmosi: \"", ("chanya", "negatif"),
           ("Saya suka cerek ini, ia mendidih dengan cepat.", "Pemegangnya patah selepas dua hari.")),
    "sw": ("{review}\nHisia: \"", ("chanya", "hasi"),
           ("Ninapenda birika hili, linachemsha maji haraka.", "Mpini ulivunjika baada ya siku mbili.")),
}
REVIEWS = {
    "en": ["Great book, I read it twice.", "Terrible sound, returned it.", "Works as described, happy.",
           "Stopped working after a week. Avoid!", "Lovely colours and very soft.", "Too small and it smells."],
    "zh": ["好书，我读了两遍。", "声音很糟糕，退货了。", "和描述的一样，很满意。", "一周后就坏了。别买！",
           "颜色很漂亮，非常柔软。", "太小了，而且有味道。"],
    "de": ["Tolles Buch, zweimal gelesen.", "Schrecklicher Klang, zurückgeschickt.", "Funktioniert wie beschrieben.",
           "Nach einer Woche kaputt. Finger weg!", "Schöne Farben und sehr weich.", "Zu klein und es riecht."],
    "ms": ["Buku hebat, saya baca dua kali.", "Bunyi teruk, saya pulangkan.", "Berfungsi seperti diterangkan.",
           "Rosak selepas seminggu. Elakkan!", "Warna cantik dan sangat lembut.", "Terlalu kecil dan berbau."],
    "sw": ["Kitabu kizuri, nimekisoma mara mbili.", "Sauti mbaya, nimeirudisha.", "Inafanya kazi kama ilivyoelezwa.",
           "Iliacha kufanya kazi baada ya wiki. Epuka!", "Rangi nzuri na laini sana.", "Ndogo mno na inanuka."],
}
GOLD = ["positive", "negative"] * 3


def write_tiny_task(root: Path, name: str, langs) -> tuple[str, str]:
    """Writes NAME.yaml and {lang}.jsonl under root; returns (task path, data pattern)."""
    languages = {}
    for lang in langs:
        template, native, demos = LANGUAGES[lang]
        languages[lang] = {"template": template, "native": dict(zip(("positive", "negative"), native)),
                           "demos": [{"label": c, "review": r} for c, r in zip(("positive", "negative"), demos)]}
    task = {"name": name, "shots": 2, "fields": ["review"], "classes": ["positive", "negative"],
            "labels": {"english": {"positive": "positive", "negative": "negative"}}, "languages": languages}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True, sort_keys=False), "utf-8")
    for lang in langs:
        write_jsonl(root / f"{lang}.jsonl",
                    [{"id": str(i), "review": t, "label": g} for i, (t, g) in enumerate(zip(REVIEWS[lang], GOLD))])
    return str(root / f"{name}.yaml"), str(root / "{lang}.jsonl")
