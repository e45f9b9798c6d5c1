"""Tasks as data: one YAML file per task (resources/tasks/*.yaml), or any path a user passes.

A task file holds, per language, the query template (translated field names, ending with the
answer cue), the translated few-shot demos, and the native label words. The prompt is
    demo_1 + sep + ... + demo_k + sep + query
where a demo is the template filled in, then its label word, then `close` (the closing quote).
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import yaml

from . import languages
from .errors import PolyalignError

LABEL_MODES = ("english", "native", "agnostic")


@dataclass
class LangSpec:
    template: str
    native: dict[str, str]
    demos: list[dict]


@dataclass
class Task:
    name: str
    shots: int
    fields: list[str]
    classes: list[str]
    labels: dict[str, dict[str, str]]  # mode -> class -> word, for language-independent modes
    languages: dict[str, LangSpec]
    separator: str = "\n"
    close: str = '"'
    description: str = ""
    path: str = ""
    extra: dict = field(default_factory=dict)

    # ----- lookups -------------------------------------------------------------
    def lang(self, code: str) -> LangSpec:
        languages.get(code)
        if code not in self.languages:
            raise PolyalignError(
                f"task {self.name!r} has no prompt data for language {code!r} yet "
                f"(has: {' '.join(self.languages) or 'none'})")
        return self.languages[code]

    def label_words(self, lang: str, mode: str = "english") -> dict[str, str]:
        """class -> label word in the given mode; `native` words come from the language entry."""
        if mode == "native":
            native = self.lang(lang).native
            if not native:
                raise PolyalignError(f"task {self.name!r} has no native label words for language {lang!r}; "
                                     f"use --labels english or agnostic")
            return dict(native)
        if mode not in self.labels:
            raise PolyalignError(
                f"task {self.name!r} has no label mode {mode!r}; it has: "
                f"{', '.join(sorted(set(self.labels) | {'native'}))}")
        return dict(self.labels[mode])

    # ----- prompt building -----------------------------------------------------
    def query(self, lang: str, item: dict) -> str:
        """The item formatted as the test query, ending with the answer cue (no demos)."""
        return self.lang(lang).template.format(**{f: item[f] for f in self.fields})

    def demo_prefix(self, lang: str, mode: str = "english") -> str:
        """All demos with their labels, each followed by the separator: the cacheable shared prefix."""
        spec, words = self.lang(lang), self.label_words(lang, mode)
        return "".join(spec.template.format(**{f: d[f] for f in self.fields}) + words[d["label"]]
                       + self.close + self.separator for d in spec.demos)

    def prompt(self, lang: str, item: dict, mode: str = "english") -> str:
        return self.demo_prefix(lang, mode) + self.query(lang, item)


def _parse(raw: dict, path: str) -> Task:
    where = f"task file {path}"
    try:
        name, classes, fields_ = raw["name"], list(raw["classes"]), list(raw["fields"])
        langs = {}
        for code, spec in (raw.get("languages") or {}).items():
            code = str(code)
            tmpl = spec["template"]
            used = {f for _, f, _, _ in string.Formatter().parse(tmpl) if f}
            if used != set(fields_):
                raise PolyalignError(f"{where}: {code} template uses {sorted(used)}, task fields are {fields_}")
            native = {str(k): str(v) for k, v in (spec.get("native") or {}).items()}
            if native and set(native) != set(classes):
                raise PolyalignError(f"{where}: {code} native labels {sorted(native)} != classes {classes}")
            demos = list(spec.get("demos") or [])
            for d in demos:
                if d.get("label") not in classes or any(f not in d for f in fields_):
                    raise PolyalignError(f"{where}: {code} has a demo without {fields_} or a valid label: {d}")
            langs[code] = LangSpec(tmpl, native, demos)
        labels = {str(m): {str(k): str(v) for k, v in words.items()} for m, words in (raw.get("labels") or {}).items()}
        for mode, words in labels.items():
            if set(words) != set(classes):
                raise PolyalignError(f"{where}: label mode {mode} covers {sorted(words)}, classes are {classes}")
        known = {"name", "shots", "fields", "classes", "labels", "languages", "separator", "close", "description"}
        return Task(name=name, shots=int(raw.get("shots", 0)), fields=fields_, classes=classes, labels=labels,
                    languages=langs, separator=raw.get("separator", "\n"), close=raw.get("close", '"'),
                    description=raw.get("description", ""), path=path,
                    extra={k: v for k, v in raw.items() if k not in known})
    except KeyError as e:
        raise PolyalignError(f"{where}: missing key {e.args[0]!r}") from None


def bundled_task_names() -> list[str]:
    return sorted(p.name[:-5] for p in files("polyalign").joinpath("resources/tasks").iterdir()
                  if p.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def load_task(name_or_path: str) -> Task:
    """A bundled task by name (amazon_polarity, snli, paws) or a path to a task YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        p = Path(name_or_path)
        if not p.exists():
            raise PolyalignError(f"task file not found: {name_or_path}")
        text, path = p.read_text("utf-8"), str(p)
    else:
        res = files("polyalign").joinpath(f"resources/tasks/{name_or_path}.yaml")
        if not res.is_file():
            raise PolyalignError(
                f"unknown task {name_or_path!r}; bundled: {', '.join(bundled_task_names())} (or pass a .yaml path)")
        text, path = res.read_text("utf-8"), str(res)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolyalignError(f"task file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise PolyalignError(f"task file {path} must hold a mapping")
    return _parse(raw, path)


def parse_tasks(spec: str) -> list[Task]:
    return [load_task(t.strip()) for t in spec.split(",") if t.strip()]
