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

from polyalign import languages
from polyalign.errors import PolyalignError

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
    cue: str = '"'        # every template ends with it: the model answers right after it
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


def _names(value, what: str) -> list[str]:
    """A non-empty list of distinct names (YAML may give numbers; they are names too)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                         and str(v) for v in value):
        raise ValueError(f"{what} must be a list of names, got {value!r}")
    names = [str(v) for v in value]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} lists a name twice: {names}")
    return names


def _words(value, classes: list[str], what: str) -> dict[str, str]:
    """class -> label word, one non-empty word for every class."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must map each class to its label word, got {value!r}")
    words = {str(k): v for k, v in value.items()}
    if set(words) != set(classes):
        raise ValueError(f"{what} covers {sorted(words)}, classes are {classes}")
    bad = [k for k, v in words.items() if not isinstance(v, (str, int)) or isinstance(v, bool) or not str(v)]
    if bad:
        raise ValueError(f"{what}: the word for {bad[0]} must be text, got {words[bad[0]]!r}")
    return {k: str(v) for k, v in words.items()}


def check_template(template, fields_: list[str], cue: str) -> None:
    """A template is text whose placeholders are exactly the task's fields, ending with the answer cue
    (the demos render as template + label word + close, and the query stops at the cue)."""
    if not isinstance(template, str):
        raise ValueError(f"the template must be text, got {template!r}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:  # "{review" and the like
        raise ValueError(f"template {template!r} is malformed ({e}); write a literal brace as {{{{ or }}}}") from None
    used = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in fields_:
            raise ValueError(f"placeholder {{{name}}} in template {template!r} names no field of the task "
                             f"(fields: {', '.join(fields_)})")
        if conversion or spec:
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} in template {template!r}: "
                             f"use a plain {{{name}}}")
        used.add(name)
    if used != set(fields_):
        raise ValueError(f"template {template!r} uses {sorted(used)}, task fields are {fields_}")
    tail = parts[-1] if parts else ("", None, None, None)
    if tail[1] is not None or not tail[0].endswith(cue):
        raise ValueError(f"template {template!r} does not end with the answer cue {cue!r} (the model "
                         f"answers right after it; set `cue:` if the task uses another)")


def _demos(value, fields_: list[str], classes: list[str]) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"demos must be a list of {{label, {', '.join(fields_)}}} mappings, got {value!r}")
    for i, d in enumerate(value, 1):
        if not isinstance(d, dict):
            raise ValueError(f"demo {i} must be a mapping {{label, {', '.join(fields_)}}}, got {d!r}")
        if d.get("label") not in classes:
            raise ValueError(f"demo {i} has label {d.get('label')!r}, not one of the classes {classes}")
        for f in fields_:
            if not isinstance(d.get(f), str):
                raise ValueError(f"demo {i} field {f!r} must be text, got {d.get(f)!r}")
    return list(value)


def _text(raw: dict, key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text, got {value!r}")
    return value


def _parse(raw: dict, path: str) -> Task:
    """The task file checked whole: every problem is one line naming the file and the problem."""
    where = f"task file {path}"
    missing = [k for k in ("name", "classes", "fields") if k not in raw]
    if missing:
        raise PolyalignError(f"{where}: missing key {missing[0]!r}")
    try:
        name = raw["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be text, got {name!r}")
        classes = _names(raw["classes"], "classes")
        if len(classes) < 2:
            raise ValueError(f"classes must name at least two classes, got {classes}")
        fields_ = _names(raw["fields"], "fields")
        shots = raw.get("shots", 0)
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise ValueError(f"shots must be a whole number, got {shots!r}")
        separator, close, cue = _text(raw, "separator", "\n"), _text(raw, "close", '"'), _text(raw, "cue", '"')
        if not isinstance(raw.get("labels") or {}, dict):
            raise ValueError(f"labels must map each label mode to its words, got {raw['labels']!r}")
        labels = {str(m): _words(words, classes, f"label mode {m}") for m, words in (raw.get("labels") or {}).items()}
        if not isinstance(raw.get("languages") or {}, dict):
            raise ValueError(f"languages must map each language code to its template, got {raw['languages']!r}")
        langs = {}
        for code, spec in (raw.get("languages") or {}).items():
            code = str(code)
            try:
                if not isinstance(spec, dict) or "template" not in spec:
                    raise ValueError(f"must be a mapping with a template, got {spec!r}")
                check_template(spec["template"], fields_, cue)
                native = _words(spec["native"], classes, "native labels") if spec.get("native") else {}
                langs[code] = LangSpec(spec["template"], native, _demos(spec.get("demos"), fields_, classes))
            except ValueError as e:
                raise ValueError(f"language {code}: {e}") from None
    except ValueError as e:
        raise PolyalignError(f"{where}: {e}") from None
    known = {"name", "shots", "fields", "classes", "labels", "languages", "separator", "close", "cue",
             "description"}
    return Task(name=name, shots=shots, fields=fields_, classes=classes, labels=labels, languages=langs,
                separator=separator, close=close, cue=cue, description=str(raw.get("description") or ""),
                path=path, extra={k: v for k, v in raw.items() if k not in known})


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
    tasks = [load_task(t.strip()) for t in spec.split(",") if t.strip()]
    if not tasks:
        raise PolyalignError(f"no task given: name one or more of {', '.join(bundled_task_names())}, "
                             "or task YAML paths, separated by commas")
    return tasks
