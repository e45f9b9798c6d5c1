"""`polyalign run EXPERIMENT.yaml`: one file describes a whole experiment; polyalign runs it end to end.

The runner turns the file into a plan of steps:

    eval (base) -> per setting: prepare -> train -> eval (adapter) -> lens, geometry -> report

Every step writes into `<run>/steps/<kind>-<hash>/`, where the hash covers the step's inputs and
the keys of the steps it depends on. `done.json` is written last, so a folder without it is an
unfinished step: a rerun skips finished steps, resumes unfinished ones (the step commands resume
themselves), and a changed setting changes only the hashes of the steps that depend on it.
`<run>/manifest.json` maps the plan to its folders; `polyalign report` reads it.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import errno
import gc
import importlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Callable

import yaml

from polyalign import languages
from polyalign.errors import PolyalignError
from polyalign.store import atomic_folder, content_hash, safe_name, write_atomic, write_json

SCHEMA_VERSION = 1
DEMO = "demo"

# ----------------------------------------------------------------------------- the file format
# Every key the format knows, with its default. A dict value is a section with its own keys; the
# sections `prepare`, `train` and `options` hold free keys that the step's own command validates
# (training overrides, extra CLI options).
DEFAULTS: dict = {
    "name": None,                   # default: the file's stem; the run folder is runs/<name>
    "description": "",
    "hardware": "",                 # free text: what the experiment expects (shown in the report)
    "output": None,                 # run folder (default runs/<name>)
    "model": None,                  # one model, or:
    "models": None,                 # a list of names or {name, label, dtype, train}
    "dtype": "auto",
    "device": "auto",
    "seed": 0,
    "settings": [],
    "prepare": {},                  # extra `polyalign prepare` options for every setting
    "train": {},                    # overrides of the training defaults for every setting (key=value)
    "eval": {
        "tasks": ["amazon_polarity"],
        "langs": "all",
        "labels": ["english"],
        "scoring": "paper",
        "limit": None,
        "data": None,
        "batch_tokens": None,
        "max_length": None,
        "trust_file_labels": False,
    },
    "analyses": {"lens": None, "geometry": None},
    "report": {"title": None, "bootstrap": 10000, "seed": 0, "alpha": 0.05},
}
SETTING_DEFAULTS: dict = {
    "name": None,                   # default: sources + "-" + target, e.g. zhde-en
    "sources": None,                # required: languages whose questions are translated
    "target": "en",
    "task": None,                   # whose questions (default: the first eval task)
    "data": None,                   # question source for `polyalign prepare` (default: bundled pool)
    "per_language": None,           # items per source language (default: prepare's)
    "seed": None,                   # default: the experiment's seed
    "prepare": {},                  # extra `polyalign prepare` options for this setting
    "train": {},                    # training overrides for this setting
}
LENS_DEFAULTS: dict = {
    "task": None, "langs": ["zh", "ja", "ru"], "labels": "native", "limit": None, "data": None,
    "settings": None,               # which settings to compare with the base (default: all)
    "options": {},                  # extra `polyalign lens` options
}
GEOMETRY_DEFAULTS: dict = {
    "task": None, "langs": ["en", "de", "fr", "hi", "th", "sw", "ms"], "limit": None, "data": None,
    "settings": None, "options": {},
}
MODEL_DEFAULTS: dict = {"name": None, "label": None, "dtype": None, "train": {}}
# TrainConfig fields that are not training hyper-parameters (the runner sets them itself).
TRAIN_META = {"data", "output", "config", "overrides", "resume", "merge", "progress"}


def _nearest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(map(str, valid)))}"


def _check_keys(raw: dict, defaults: dict, where: str) -> dict:
    """Unknown keys -> PolyalignError naming the key and the nearest valid one; returns defaults + raw."""
    if not isinstance(raw, dict):
        raise PolyalignError(f"{where} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in defaults:
            raise PolyalignError(f"unknown key {where + '.' if where else ''}{key}{_nearest(key, defaults)}")
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(raw))
    return out


# ----------------------------------------------------------------------------- overrides
def _parse_value(text: str):
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)   # YAML 1.1 reads 1e-4 as a string
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` (YAML value) into a copy of the raw file; list items by index or by setting name."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise PolyalignError(f"override {item!r} is not key=value (e.g. eval.limit=20)")
        dotted, _, text = item.partition("=")
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise PolyalignError(f"override {item!r} has an empty key")
        node, path = raw, []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            path.append(part)
            if isinstance(node, list):
                index = _list_index(node, part, ".".join(path))
                if last:
                    node[index] = _parse_value(text)
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise PolyalignError(f"override {dotted}: {'.'.join(path[:-1])} is not a section")
            if last:
                node[part] = _parse_value(text)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise PolyalignError(f"override {where}: index out of range (the list has {len(node)} items)")
    names = [s.get("name") or _setting_name(s) if isinstance(s, dict) else None for s in node]
    if part in names:
        return names.index(part)
    raise PolyalignError(f"override {where}: no item named {part!r}{_nearest(part, [n for n in names if n])}")


# ----------------------------------------------------------------------------- the validated experiment
@dataclass
class ModelSpec:
    name: str
    label: str
    dtype: str
    train: dict
    slug: str


@dataclass
class Setting:
    name: str
    sources: list[str]
    target: str
    task: str
    data: str | None
    per_language: int | None
    seed: int
    prepare: dict
    train: dict

    @property
    def label(self) -> str:
        return f"{'/'.join(self.sources)} ⇒ {self.target}"

    @property
    def seen(self) -> list[str]:
        """Languages whose questions the model saw in training: the sources and the target."""
        return list(dict.fromkeys([*self.sources, self.target]))


@dataclass
class Experiment:
    name: str
    description: str
    hardware: str
    output: str
    models: list[ModelSpec]
    dtype: str
    device: str
    seed: int
    settings: list[Setting]
    prepare: dict
    train: dict
    eval: dict
    lens: dict | None
    geometry: dict | None
    report: dict
    source: str = ""
    raw: dict = field(default_factory=dict)

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)


def _setting_name(raw: dict) -> str:
    src = raw.get("sources") or []
    if isinstance(src, str):
        src = [s.strip() for s in src.replace("/", ",").split(",") if s.strip()]
    return "".join(map(str, src)) + "-" + str(raw.get("target") or "en")


def _lang_list(value, where: str) -> list[str]:
    if value is None:
        raise PolyalignError(f"{where}: no languages given")
    if isinstance(value, str):
        if value in ("all", "high", "low"):
            return languages.parse_langs(value)
        value = [v.strip() for v in value.replace("/", ",").split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise PolyalignError(f"{where}: expected a list of language codes")
    out = []
    for code in value:
        code = str(code) if code is not False else "no"   # YAML reads bare `no` as false
        if code not in languages.ALL:
            raise PolyalignError(f"{where}: unknown language {code!r}{_nearest(code, languages.ALL)}")
        out.append(code)
    if len(set(out)) != len(out):
        raise PolyalignError(f"{where}: a language is listed twice: {out}")
    return out


def _str_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return list(value)
    raise PolyalignError(f"{where}: expected a name or a list of names")


def _opt_int(value, where: str, positive: bool = True) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        raise PolyalignError(f"{where}: expected a positive whole number, got {value!r}")
    return value


def _opt_str(value, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise PolyalignError(f"{where}: expected a string, got {value!r}")
    return str(value)


def _slug(text: str) -> str:
    return safe_name(text.rstrip("/").split("/")[-1], "-", strip=True, fallback="model")


def load_experiment(path: str | None = None, overrides: list[str] | None = None, demo: bool = False,
                    check_data: bool = True) -> Experiment:
    """Read, override and validate an experiment file (or the embedded demo) before any work starts."""
    if demo:
        text = files("polyalign").joinpath(f"resources/experiments/{DEMO}.yaml").read_text("utf-8")
        source, stem = f"(embedded) {DEMO}.yaml", DEMO
    else:
        if not path:
            raise PolyalignError("give an experiment file (polyalign run EXPERIMENT.yaml) or --demo")
        p = Path(path)
        if not p.is_file():
            raise PolyalignError(f"experiment file not found: {path}")
        text, source, stem = p.read_text("utf-8"), str(p), p.stem
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PolyalignError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise PolyalignError(f"{source} must hold a mapping of keys (name, model, settings, eval, ...)")
    raw = apply_overrides(raw, overrides or [])
    exp = validate(raw, default_name=stem, check_data=check_data)
    exp.source = source
    return exp


def validate(raw: dict, default_name: str = "experiment", check_data: bool = True) -> Experiment:
    """The whole file checked: keys, types, languages each task has, data files, analyses."""
    from polyalign.tasks import LABEL_MODES, load_task

    top = _check_keys(raw, DEFAULTS, "")
    name = _opt_str(top["name"], "name") or default_name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PolyalignError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it names the run folder)")
    for key in ("dtype", "device"):
        top[key] = _opt_str(top[key], key)
    seed = _opt_int(top["seed"], "seed", positive=False) or 0
    for key in ("prepare", "train"):
        if not isinstance(top[key] or {}, dict):
            raise PolyalignError(f"{key} must be a mapping of option: value")
        top[key] = dict(top[key] or {})

    # ---- models
    if top["model"] is not None and top["models"] is not None:
        raise PolyalignError("give either `model` or `models`, not both")
    entries = top["models"] if top["models"] is not None else ([top["model"]] if top["model"] is not None else [])
    if not isinstance(entries, list) or not entries:
        raise PolyalignError("no model: set `model: NAME` or `models: [NAME, ...]`")
    models: list[ModelSpec] = []
    for i, entry in enumerate(entries):
        where = f"models.{i}" if top["models"] is not None else "model"
        spec = _check_keys({"name": entry} if isinstance(entry, str) else entry, MODEL_DEFAULTS, where)
        mname = _opt_str(spec["name"], f"{where}.name")
        if not mname:
            raise PolyalignError(f"{where}: a model needs a name (HF id, local folder or gemma-3-270m)")
        if not isinstance(spec["train"] or {}, dict):
            raise PolyalignError(f"{where}.train must be a mapping")
        models.append(ModelSpec(mname, _opt_str(spec["label"], f"{where}.label") or mname.rstrip("/").split("/")[-1],
                                _opt_str(spec["dtype"], f"{where}.dtype") or top["dtype"],
                                dict(spec["train"] or {}), ""))
    slugs: dict[str, int] = {}
    for m in models:
        base = _slug(m.label)
        slugs[base] = slugs.get(base, 0) + 1
        m.slug = base if slugs[base] == 1 else f"{base}-{slugs[base]}"
    if len({m.label for m in models}) != len(models):
        raise PolyalignError("two models share a label; give each a distinct `label`")

    # ---- eval
    ev = _check_keys(top["eval"] or {}, DEFAULTS["eval"], "eval")
    ev["tasks"] = _str_list(ev["tasks"], "eval.tasks")
    ev["langs"] = _lang_list(ev["langs"], "eval.langs")
    ev["labels"] = _str_list(ev["labels"], "eval.labels")
    for mode in ev["labels"]:
        if mode not in LABEL_MODES:
            raise PolyalignError(f"eval.labels: unknown label mode {mode!r}{_nearest(mode, LABEL_MODES)}")
    from polyalign.evaluation.scoring import RULES
    if ev["scoring"] not in RULES:
        raise PolyalignError(f"eval.scoring: unknown rule {ev['scoring']!r}{_nearest(ev['scoring'], RULES)}")
    ev["limit"] = _opt_int(ev["limit"], "eval.limit")
    ev["batch_tokens"] = _opt_int(ev["batch_tokens"], "eval.batch_tokens")
    ev["max_length"] = _opt_int(ev["max_length"], "eval.max_length")
    ev["data"] = _opt_str(ev["data"], "eval.data")
    ev["trust_file_labels"] = bool(ev["trust_file_labels"])
    tasks = {}
    for tname in ev["tasks"]:
        tasks[tname] = load_task(tname)
        _check_task_langs(tasks[tname], ev["langs"], ev["labels"], "eval")
        if check_data:
            _check_eval_data(tasks[tname], ev["langs"], ev["data"], "eval")

    # ---- settings
    if not isinstance(top["settings"] or [], list):
        raise PolyalignError("settings must be a list of {sources, target, task, ...}")
    settings: list[Setting] = []
    for i, entry in enumerate(top["settings"] or []):
        where = f"settings.{i}"
        s = _check_keys(entry, SETTING_DEFAULTS, where)
        sname = _opt_str(s["name"], f"{where}.name") or _setting_name(s)
        where = f"setting {sname}"
        sources = _lang_list(s["sources"], f"{where}: sources")
        target = _lang_list([s["target"]] if not isinstance(s["target"], list) else s["target"],
                            f"{where}: target")
        if len(target) != 1:
            raise PolyalignError(f"{where}: target must be one language")
        target = target[0]
        if target in sources:
            raise PolyalignError(f"{where}: the target {target} is also a source; a language is not "
                                 "translated into itself")
        tname = _opt_str(s["task"], f"{where}.task") or ev["tasks"][0]
        task = tasks.get(tname) or load_task(tname)
        # Prepare formats every question with the task's template in its source and target language.
        _check_task_langs(task, [*sources, target], [], where)
        for key in ("prepare", "train"):
            if not isinstance(s[key] or {}, dict):
                raise PolyalignError(f"{where}.{key} must be a mapping")
        extra = {**top["prepare"], **(s["prepare"] or {})}
        # `prepare: {data: ...}` gives every setting the same question source.
        data = _opt_str(s["data"] if s["data"] is not None else extra.get("data"), f"{where}.data")
        per_language = _opt_int(s["per_language"], f"{where}.per_language")
        sseed = _opt_int(s["seed"], f"{where}.seed", positive=False)
        if check_data:
            _check_question_data(task, [*sources, target], data, extra, where)
        settings.append(Setting(sname, sources, target, task.name, data, per_language,
                                seed if sseed is None else sseed, dict(s["prepare"] or {}), dict(s["train"] or {})))
    names = [s.name for s in settings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PolyalignError(f"two settings are named {dupes[0]!r}; give each a distinct `name`")
    for sname in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", sname):
            raise PolyalignError(f"setting name {sname!r}: use letters, digits, '.', '_' or '-'")
    _check_train_keys(top["train"], "train")
    for m in models:
        _check_train_keys(m.train, f"model {m.label}: train")
    for s in settings:
        _check_train_keys(s.train, f"setting {s.name}: train")
    _check_train_values(top["train"], models, settings)

    # ---- analyses
    an = _check_keys(top["analyses"] or {}, DEFAULTS["analyses"], "analyses")
    lens = geometry = None
    if an["lens"] is not None:
        lens = _analysis(an["lens"], LENS_DEFAULTS, "analyses.lens", ev, names, tasks, check_data)
        lmode = _opt_str(lens["labels"], "analyses.lens.labels")
        if lmode not in LABEL_MODES:
            raise PolyalignError(f"analyses.lens.labels: unknown label mode {lmode!r}{_nearest(lmode, LABEL_MODES)}")
        _check_task_langs(load_task(lens["task"]), lens["langs"], [lmode], "analyses.lens")
    if an["geometry"] is not None:
        geometry = _analysis(an["geometry"], GEOMETRY_DEFAULTS, "analyses.geometry", ev, names, tasks,
                             check_data)
        if len(geometry["langs"]) < 2:
            raise PolyalignError("analyses.geometry.langs: give at least two languages to compare")

    rep = _check_keys(top["report"] or {}, DEFAULTS["report"], "report")
    rep["bootstrap"] = _opt_int(rep["bootstrap"], "report.bootstrap") or 10000
    rep["seed"] = _opt_int(rep["seed"], "report.seed", positive=False) or 0
    if not isinstance(rep["alpha"], (int, float)) or not 0 < rep["alpha"] < 1:
        raise PolyalignError(f"report.alpha must lie between 0 and 1, got {rep['alpha']!r}")

    output = _opt_str(top["output"], "output") or str(Path("runs") / name)
    return Experiment(name=name, description=str(top["description"] or ""), hardware=str(top["hardware"] or ""),
                      output=output, models=models, dtype=top["dtype"], device=top["device"], seed=seed,
                      settings=settings, prepare=top["prepare"], train=top["train"], eval=ev, lens=lens,
                      geometry=geometry, report=rep, raw=raw)


def _analysis(raw, defaults, where, ev, setting_names, tasks, check_data) -> dict:
    from polyalign.tasks import load_task

    if raw is True:
        raw = {}
    a = _check_keys(raw, defaults, where)
    a["task"] = _opt_str(a["task"], f"{where}.task") or ev["tasks"][0]
    task = tasks.get(a["task"]) or load_task(a["task"])
    a["langs"] = _lang_list(a["langs"], f"{where}.langs")
    _check_task_langs(task, a["langs"], [], where)
    a["limit"] = _opt_int(a["limit"], f"{where}.limit")
    a["data"] = _opt_str(a["data"], f"{where}.data")
    if check_data:
        _check_eval_data(task, a["langs"], a["data"], where)
    chosen = a["settings"]
    if chosen is None:
        chosen = list(setting_names)
    elif isinstance(chosen, str):
        chosen = [chosen]
    for sname in chosen:
        if sname not in setting_names:
            raise PolyalignError(f"{where}.settings: no setting named {sname!r}{_nearest(sname, setting_names)}")
    a["settings"] = list(chosen)
    if not isinstance(a["options"] or {}, dict):
        raise PolyalignError(f"{where}.options must be a mapping of option: value")
    a["options"] = dict(a["options"] or {})
    return a


def _check_task_langs(task, langs: list[str], modes: list[str], where: str) -> None:
    missing = [lang for lang in langs if lang not in task.languages]
    if missing:
        raise PolyalignError(f"{where}: task {task.name!r} has no prompt data for {', '.join(missing)} "
                             f"(it has: {' '.join(task.languages) or 'none'})")
    for lang in langs:
        for mode in modes:
            task.label_words(lang, mode)


def _check_eval_data(task, langs: list[str], data: str | None, where: str) -> None:
    """Bundled data must exist per language; a local path must exist (the loader checks the rest)."""
    if data is None:
        root = files("polyalign").joinpath(f"resources/data/{task.name}")
        missing = [lang for lang in langs if not root.joinpath(f"{lang}.jsonl").is_file()]
        if missing:
            raise PolyalignError(f"{where}: no bundled {task.name} data for {', '.join(missing)}; "
                                 "set `data:` to a local copy (see README)")
    elif not data.startswith("hf:") and "{" not in data and not Path(data).exists():
        raise PolyalignError(f"{where}: data path not found: {data}")


def _check_question_data(task, langs: list[str], data: str | None, extra: dict, where: str) -> None:
    if data is None:
        if extra.get("translator"):
            return  # questions come from a translator backend; prepare checks its own inputs
        root = files("polyalign").joinpath(f"resources/questions/{task.name}")
        missing = [lang for lang in langs if not root.joinpath(f"{lang}.jsonl").is_file()]
        if missing:
            raise PolyalignError(f"{where}: the bundled question pool of {task.name} lacks "
                                 f"{', '.join(missing)}; set `data:` (e.g. the paper's release files) "
                                 "or a translator in `prepare:`")
    elif not data.startswith("hf:") and "{" not in data and not Path(data).exists():
        raise PolyalignError(f"{where}: question data path not found: {data}")


def _check_train_keys(overrides: dict, where: str) -> None:
    """Training overrides checked against the trainer's config, when its module is installed."""
    if not overrides:
        return
    try:
        train = importlib.import_module("polyalign.training.train")
    except ImportError:
        return
    fields_ = getattr(getattr(train, "TrainConfig", None), "__dataclass_fields__", None)
    if not fields_:
        return
    fields_ = [f for f in fields_ if f not in TRAIN_META]
    for key in overrides:
        if key not in fields_:
            raise PolyalignError(f"{where}: unknown training option {key!r}{_nearest(key, fields_)}")


def _check_train_values(common: dict, models: list, settings: list) -> None:
    """Every train step's options parsed and range-checked as `polyalign train` will (types, ranges), so
    that `lr: fast` fails at load time and not after the base evaluation. Settings override models,
    which override the file's `train:` (as plan() merges them)."""
    try:
        train = importlib.import_module("polyalign.training.train")
    except ImportError:
        return
    def where(m, s) -> str:
        return f"setting {s.name}: train" if s.train else f"model {m.label}: train" if m.train else "train"
    combos = [("train", common)] + [(where(m, s), {**common, **m.train, **s.train}) for m in models for s in settings]
    for where, overrides in combos:
        try:
            train.resolve_config(train.TrainConfig(overrides=_kv(overrides)))
        except PolyalignError as e:
            raise PolyalignError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- steps
@dataclass
class Step:
    kind: str                       # eval | prepare | train | lens | geometry
    label: str                      # what the progress line shows
    inputs: dict                    # everything that determines the artefact
    deps: list["Step"]
    weight: float                   # estimated cost, for the ETA
    model: str | None = None        # model label
    setting: str | None = None
    task: str | None = None
    folder_inputs: dict | None = None   # the inputs that name the folder (default: all of them)
    argv: Callable[["Step", Path], list[str]] | None = None
    key: str = ""
    folder_key: str = ""

    def finalize(self) -> None:
        deps = [d.key for d in self.deps]
        self.key = content_hash({"schema": SCHEMA_VERSION, "kind": self.kind, "inputs": self.inputs, "deps": deps})
        base = self.inputs if self.folder_inputs is None else self.folder_inputs
        self.folder_key = content_hash({"schema": SCHEMA_VERSION, "kind": self.kind, "inputs": base, "deps": deps})

    def folder(self, run: Path) -> Path:
        return run / "steps" / f"{self.kind}-{self.folder_key}"

    def done(self, run: Path) -> dict | None:
        """done.json for this very step, and only while the step's outputs are all there and parse."""
        path = self.folder(run) / "done.json"
        if not path.exists():
            return None
        try:
            marker = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(marker, dict) or marker.get("key") != self.key:
            return None
        return None if outputs_problem(self.kind, self.folder(run)) else marker


def _json_file(path: Path, kind: type = dict):
    """The parsed file, or None when it is missing, unreadable or not a `kind`."""
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, kind) else None


def outputs_problem(kind: str, folder: Path) -> str | None:
    """What is missing or unreadable among the outputs a finished step of `kind` leaves in `folder`
    (the files the later steps and the report read), or None when they are all there and parse."""
    if kind == "eval":
        results = _json_file(folder / "results.json")
        if results is None or not isinstance(results.get("rows"), list):
            return "results.json is missing or unreadable"
        for row in results["rows"]:
            try:
                samples = folder / "samples" / row["task"] / row["labels"] / f"{row['lang']}.jsonl"
            except (TypeError, KeyError):
                return "results.json has a malformed row"
            if not samples.is_file():
                return f"{samples.relative_to(folder)} is missing"
        return None
    if kind == "prepare":
        return None if (folder / "train.jsonl").is_file() else "train.jsonl is missing"
    if kind == "train":
        try:
            found = adapter_dir(folder)
        except PolyalignError:
            return "the adapter (adapter_config.json) is missing"
        return None if _json_file(found / "adapter_config.json") is not None else "adapter_config.json is unreadable"
    if kind in ("lens", "geometry"):
        return None if _json_file(folder / "summary.json") is not None else "summary.json is missing or unreadable"
    return None


def _task_hash(name: str) -> str:
    from polyalign.tasks import load_task
    return content_hash(Path(load_task(name).path).read_text("utf-8"))


def _count_items(task: str, langs: list[str], data: str | None, limit: int | None) -> int:
    if limit:
        return limit * len(langs)
    if data is None:
        root = files("polyalign").joinpath(f"resources/data/{task}")
        total = 0
        for lang in langs:
            f = root.joinpath(f"{lang}.jsonl")
            total += sum(1 for line in f.read_text("utf-8").splitlines() if line.strip()) if f.is_file() else 0
        return total
    return 500 * len(langs)


def _flag(key: str) -> str:
    return "--" + str(key).replace("_", "-")


def _options(opts: dict) -> list[str]:
    """{key: value} -> CLI flags; True -> bare flag, False/None -> left out, lists -> comma list."""
    out = []
    for key, value in opts.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(_flag(key))
        else:
            out += [_flag(key), ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def _kv(opts: dict) -> list[str]:
    out = []
    for key, value in opts.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value)
        elif value is None:
            value = "null"
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"{key}={value}")
    return out


def adapter_dir(train_folder: Path) -> Path:
    """The folder holding the trained adapter (adapter_config.json) inside a train step's folder."""
    for cand in (train_folder, train_folder / "adapter", train_folder / "final", train_folder / "lora"):
        if (cand / "adapter_config.json").exists():
            return cand
    found = sorted(p.parent for p in train_folder.rglob("adapter_config.json")
                   if "checkpoint" not in str(p.relative_to(train_folder)))
    if found:
        return found[0]
    raise PolyalignError(f"the train step {train_folder} finished without an adapter (adapter_config.json)")


def plan(exp: Experiment) -> list[Step]:
    """The ordered steps of an experiment, each with its hash key."""
    steps: list[Step] = []
    ev = exp.eval
    eval_common = {"scoring": ev["scoring"], "limit": ev["limit"], "data": ev["data"],
                   "max_length": ev["max_length"], "trust_file_labels": ev["trust_file_labels"]}
    if ev["batch_tokens"]:
        # It changes scores in the last bits (and evaluate refuses a folder scored with another
        # value); named only when set, so that the folders of runs without it keep their names.
        eval_common["batch_tokens"] = ev["batch_tokens"]

    def add(step: Step) -> Step:
        step.finalize()
        steps.append(step)
        return step

    def eval_step(m: ModelSpec, task: str, train: Step | None, sname: str | None) -> Step:
        folder_inputs = {"model": m.name, "dtype": m.dtype, "task": task, "task_file": _task_hash(task),
                         **eval_common}
        inputs = {**folder_inputs, "langs": ev["langs"], "labels": ev["labels"]}
        n = _count_items(task, ev["langs"], ev["data"], ev["limit"]) * len(ev["labels"])
        mlabel = f"{m.label} " if len(exp.models) > 1 else ""
        label = f"eval {mlabel}{sname or 'base'} {task}"

        def argv(step: Step, run: Path) -> list[str]:
            a = ["evaluate", "--model", m.name, "--tasks", task, "--langs", ",".join(ev["langs"]),
                 "--labels", ",".join(ev["labels"]), "--scoring", ev["scoring"],
                 "--output", str(step.folder(run)), "--dtype", m.dtype, "--device", exp.device]
            if train is not None:
                a += ["--adapter", str(adapter_dir(train.folder(run)))]
            if ev["data"]:
                a += ["--data", ev["data"]]
            if ev["limit"]:
                a += ["--limit", str(ev["limit"])]
            if ev["batch_tokens"]:
                a += ["--batch-tokens", str(ev["batch_tokens"])]
            if ev["max_length"]:
                a += ["--max-length", str(ev["max_length"])]
            if ev["trust_file_labels"]:
                a.append("--trust-file-labels")
            return a

        return add(Step("eval", label, inputs, [train] if train else [],
                        40 + n * (1.15 if train else 1.0), m.label, sname, task, folder_inputs, argv))

    trains: dict[tuple[str, str], Step] = {}
    prepares: dict[str, Step] = {}
    for m in exp.models:
        for task in ev["tasks"]:
            eval_step(m, task, None, None)
        for s in exp.settings:
            if s.name not in prepares:
                popts = {k: v for k, v in {**exp.prepare, **s.prepare}.items() if k != "data"}
                pin = {"task": s.task, "task_file": _task_hash(s.task), "sources": s.sources, "target": s.target,
                       "per_language": s.per_language, "data": s.data, "seed": s.seed, "options": popts}
                n_pairs = (s.per_language or 1000) * len(s.sources)

                def pargv(step: Step, run: Path, s=s, popts=popts) -> list[str]:
                    a = ["prepare", "--task", s.task, "--sources", ",".join(s.sources), "--target", s.target,
                         "--output", str(step.folder(run)), "--seed", str(s.seed)]
                    if s.per_language:
                        a += ["--per-language", str(s.per_language)]
                    if s.data:
                        a += ["--data", s.data]
                    return a + _options(popts)

                prepares[s.name] = add(Step("prepare", f"prepare {s.name}", pin, [], 5 + n_pairs * 0.01,
                                            None, s.name, s.task, None, pargv))
            overrides = {**exp.train, **m.train, **s.train}
            tin = {"model": m.name, "dtype": m.dtype, "seed": s.seed, "overrides": overrides}
            n_pairs = (s.per_language or 1000) * len(s.sources)
            epochs = overrides.get("epochs", overrides.get("num_train_epochs", 3))
            work = n_pairs * float(epochs or 1)
            if overrides.get("max_steps"):
                batch = overrides.get("batch_size", 4) * overrides.get("grad_accum", overrides.get(
                    "gradient_accumulation_steps", 4))
                work = min(work, overrides["max_steps"] * batch) if work else overrides["max_steps"] * batch
            mlabel = f" {m.label}" if len(exp.models) > 1 else ""

            def targv(step: Step, run: Path, m=m, overrides=overrides, s=s) -> list[str]:
                # --resume continues an unfinished run of the same config, and starts a fresh one otherwise.
                a = ["train", "--model", m.name, "--data", str(step.deps[0].folder(run)),
                     "--output", str(step.folder(run)), "--resume"]
                kv = dict(overrides)
                if "seed" not in kv and s.seed is not None:
                    kv["seed"] = s.seed
                if "dtype" not in kv and m.dtype not in (None, "auto"):
                    kv["dtype"] = m.dtype
                if "device" not in kv and exp.device not in (None, "auto"):
                    kv["device"] = exp.device
                return a + _kv(kv)

            trains[(m.label, s.name)] = add(Step("train", f"train{mlabel} {s.name}", tin, [prepares[s.name]],
                                                 60 + work * 4, m.label, s.name, s.task, None, targv))
            for task in ev["tasks"]:
                eval_step(m, task, trains[(m.label, s.name)], s.name)

    for kind, cfg in (("lens", exp.lens), ("geometry", exp.geometry)):
        if cfg is None:
            continue
        for m in exp.models:
            chosen = [trains[(m.label, sname)] for sname in cfg["settings"]]
            ain = {"model": m.name, "dtype": m.dtype, "task": cfg["task"], "task_file": _task_hash(cfg["task"]),
                   "langs": cfg["langs"], "limit": cfg["limit"], "data": cfg["data"], "options": cfg["options"],
                   "compare": list(cfg["settings"])}
            if kind == "lens":
                ain["labels"] = cfg["labels"]
            n = _count_items(cfg["task"], cfg["langs"], cfg["data"], cfg["limit"])

            def aargv(step: Step, run: Path, kind=kind, cfg=cfg, m=m, chosen=chosen) -> list[str]:
                a = [kind, "--model", m.name, "--task", cfg["task"], "--langs", ",".join(cfg["langs"]),
                     "--output", str(step.folder(run))]
                for train in chosen:
                    # A copy named after the setting, so that the step's tables and legends say which it is.
                    a += ["--compare-adapter", str(_named_adapter(step.folder(run), train.folder(run),
                                                                  train.setting))]
                if kind == "lens":
                    a += ["--labels", cfg["labels"]]
                if cfg["limit"]:
                    a += ["--limit", str(cfg["limit"])]
                if cfg["data"]:
                    a += ["--data", cfg["data"]]
                if m.dtype and m.dtype != "auto":
                    a += ["--dtype", m.dtype]
                if exp.device and exp.device != "auto":
                    a += ["--device", exp.device]
                return a + _options(cfg["options"])

            mlabel = f" {m.label}" if len(exp.models) > 1 else ""
            what = ("base vs " + ", ".join(cfg["settings"])) if cfg["settings"] else "base"
            add(Step(kind, f"{kind}{mlabel} {what}", ain, chosen,
                     40 + n * (1 + len(chosen)) * (1.2 if kind == "lens" else 0.5), m.label,
                     ",".join(cfg["settings"]) or None, cfg["task"], None, aargv))
    return steps


def _named_adapter(step_folder: Path, train_folder: Path, name: str) -> Path:
    """Copy a trained adapter (its top-level files only) to <step>/adapters/<setting name>."""
    import shutil

    src = adapter_dir(train_folder)
    dst = step_folder / "adapters" / name
    if not (dst / "adapter_config.json").exists():
        with atomic_folder(dst) as tmp:
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return dst


def _module_of(command: str) -> str:
    from polyalign.cli import COMMANDS
    if command not in COMMANDS:
        raise PolyalignError(f"this installation has no `polyalign {command}` command yet")
    return COMMANDS[command][0]


def call_command(argv: list[str]) -> None:
    """Run one `polyalign` subcommand in this process, through its own argument parser."""
    from polyalign.cli import COMMANDS, _Parser

    command = argv[0]
    module_name = _module_of(command)
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"polyalign {command}")
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        raise PolyalignError(f"`polyalign {' '.join(argv)}` was refused by its parser (see the line above)") from None
    args.command, args._module = command, module_name
    assert command in COMMANDS
    module.main(args)


# ----------------------------------------------------------------------------- running
def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _bar(frac: float, width: int = 20) -> str:
    full = int(round(max(0.0, min(1.0, frac)) * width))
    return "█" * full + "░" * (width - full)


def _manifest(exp: Experiment, steps: list[Step], run: Path, status: dict[str, dict]) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "name": exp.name,
        "description": exp.description,
        "hardware": exp.hardware,
        "source": exp.source,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experiment": exp.raw,
        "models": [{"name": m.name, "label": m.label, "dtype": m.dtype, "slug": m.slug} for m in exp.models],
        "settings": [{"name": s.name, "label": s.label, "sources": s.sources, "target": s.target, "task": s.task,
                      "seen": s.seen, "per_language": s.per_language, "data": s.data} for s in exp.settings],
        "eval": exp.eval,
        "lens": exp.lens,
        "geometry": exp.geometry,
        "report": exp.report,
        "steps": [{"kind": st.kind, "label": st.label, "model": st.model, "setting": st.setting,
                   "task": st.task, "key": st.key, "dir": str(st.folder(run).relative_to(run)),
                   "inputs": st.inputs, **status.get(st.key, {})} for st in steps],
    }


def run_experiment(exp: Experiment, output: str | None = None, report: bool = True, dry_run: bool = False,
                   check_models: bool = True, out=None) -> Path:
    """Run (or resume) every step of `exp`; returns the run folder."""
    out = out or sys.stdout
    run = Path(output or exp.output)
    steps = plan(exp)
    status: dict[str, dict] = {}
    for st in steps:
        marker = st.done(run)
        status[st.key] = ({"status": "done", "seconds": marker.get("seconds")} if marker
                          else {"status": "pending"})
        problem = outputs_problem(st.kind, st.folder(run)) if (st.folder(run) / "done.json").exists() else None
        if not marker and problem:
            status[st.key]["problem"] = problem   # marked done once, its outputs broken since: run it again
    n = len(steps)
    if dry_run:
        for m in exp.models:
            check_model(m.name, hub=False)  # a missing local folder; the hub is asked only by a real run
        for i, st in enumerate(steps, 1):
            problem = status[st.key].get("problem")
            print(f"[{i}/{n}] {st.label:<40} {status[st.key]['status']:<8} {st.folder(run)}"
                  + (f"  ({problem})" if problem else ""), file=out)
        return run
    if check_models:
        preflight(exp, steps, run)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "experiment.json", {"source": exp.source, "experiment": exp.raw})
    write_atomic(run / "experiment.yaml", yaml.safe_dump(exp.raw, sort_keys=False, allow_unicode=True))
    write_json(run / "manifest.json", _manifest(exp, steps, run, status))

    todo_w = sum(st.weight for st in steps if status[st.key]["status"] != "done")
    started = time.time()
    spent_w = 0.0
    print(f"experiment {exp.name}: {n} steps ({n - sum(1 for s in status.values() if s['status'] == 'done')} "
          f"to run) in {run}", file=out)
    for i, st in enumerate(steps, 1):
        head = f"[{i}/{n}] {st.label}"
        if status[st.key]["status"] == "done":
            print(f"{head}: done earlier ({_fmt_seconds(status[st.key].get('seconds'))}), "
                  f"kept {st.folder(run).relative_to(run)}", file=out)
            continue
        elapsed = time.time() - started
        frac = spent_w / todo_w if todo_w else 1.0
        eta = (elapsed / spent_w * (todo_w - spent_w)) if spent_w and elapsed > 1 else None
        if status[st.key].get("problem"):
            print(f"{head}: finished earlier but {status[st.key]['problem']}; running it again", file=out)
        print(f"{head}  {_bar(frac)} {frac * 100:3.0f}%  elapsed {_fmt_seconds(elapsed)}  "
              f"ETA {_fmt_seconds(eta) if eta is not None else 'after the first step'}", file=out, flush=True)
        folder = st.folder(run)
        folder.parent.mkdir(parents=True, exist_ok=True)   # the step command creates its own folder
        t0 = time.time()
        try:
            argv = st.argv(st, run)
            call_command(argv)
            summary = _summary(st, folder, run)
        except PolyalignError as e:
            _failed(run, exp, steps, status, st, str(e))
            raise PolyalignError(f"{head} failed: {e} (rerun the same command to resume)") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _failed(run, exp, steps, status, st, "disk full", quiet=True)
                raise PolyalignError(f"{head}: disk full while writing {e.filename or folder}; free space and "
                                     "rerun the same command to resume") from None
            raise
        except MemoryError:
            raise PolyalignError(f"{head}: out of memory; lower eval.batch_tokens or the training batch "
                                 "and rerun to resume") from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise PolyalignError(f"{head}: out of accelerator memory ({str(e).splitlines()[0][:120]}); "
                                     "lower eval.batch_tokens or the training batch and rerun") from None
            raise
        seconds = time.time() - t0
        write_json(folder / "inputs.json", {"kind": st.kind, "label": st.label, "key": st.key,
                                            "inputs": st.inputs, "deps": [d.key for d in st.deps]})
        write_json(folder / "done.json", {"key": st.key, "kind": st.kind, "label": st.label,
                                          "seconds": round(seconds, 2), "summary": summary,
                                          "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        status[st.key] = {"status": "done", "seconds": round(seconds, 2), "ran_now": True}
        spent_w += st.weight
        write_json(run / "manifest.json", _manifest(exp, steps, run, status))
        print(f"{head}: done in {_fmt_seconds(seconds)}", file=out, flush=True)
        _free_memory()
    wall = time.time() - started
    manifest = _manifest(exp, steps, run, status)
    manifest["last_run_seconds"] = round(wall, 2)
    write_json(run / "manifest.json", manifest)
    if report:
        from polyalign.reporting.report import build_report
        t0 = time.time()
        html = build_report(run)
        manifest["report_seconds"] = round(time.time() - t0, 2)
        manifest["last_run_seconds"] = round(time.time() - started, 2)
        write_json(run / "manifest.json", manifest)
        print(f"all {n} steps done in {_fmt_seconds(time.time() - started)}; report: {run / 'report.md'}", file=out)
        print(str(html), file=out, flush=True)
    return run


def _failed(run, exp, steps, status, st, message, quiet=False) -> None:
    status[st.key] = {"status": "failed", "error": message}
    try:
        write_json(run / "manifest.json", _manifest(exp, steps, run, status))
    except OSError:
        if not quiet:
            raise


def _summary(st: Step, folder: Path, run: Path) -> dict:
    """A few facts about the finished artefact, checked so that a broken step is never marked done."""
    problem = outputs_problem(st.kind, folder)
    if problem:
        raise PolyalignError(f"the {st.kind} step finished but {problem} in {folder}")
    if st.kind == "eval":
        path = folder / "results.json"
        res = json.loads(path.read_text("utf-8"))
        return {"averages": res.get("averages", []), "timing": res.get("timing", {})}
    if st.kind == "train":
        out = {"adapter": str(adapter_dir(folder).relative_to(run))}
        if (folder / "summary.json").exists():
            try:
                out["train"] = json.loads((folder / "summary.json").read_text("utf-8"))
            except json.JSONDecodeError:
                pass
        return out
    if st.kind == "prepare":
        if (folder / "manifest.json").exists():
            try:
                return {"prepare": json.loads((folder / "manifest.json").read_text("utf-8"))}
            except json.JSONDecodeError:
                pass
        return {}
    return {"files": sorted(p.name for p in folder.iterdir() if p.is_file())}


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def preflight(exp: Experiment, steps: list[Step], run: Path) -> None:
    """Before any work: every command the plan needs exists and accepts its options; models exist."""
    from polyalign.cli import COMMANDS

    for m in exp.models:
        check_model(m.name)
    names = {"eval": "evaluate"}
    for kind in dict.fromkeys(st.kind for st in steps):
        command = names.get(kind, kind)
        if command not in COMMANDS:
            raise PolyalignError(f"this installation has no `polyalign {command}` command, which the "
                                 f"experiment's {kind} steps need")
    for st in steps:
        if st.kind == "prepare":
            _parse_check(st.argv(st, run), f"setting {st.setting}: prepare")
        elif st.kind in ("lens", "geometry"):
            cfg = exp.lens if st.kind == "lens" else exp.geometry
            _parse_check([st.kind, "--model", "m", "--output", str(st.folder(run))] + _options(cfg["options"]),
                         f"analyses.{st.kind}.options")


def _parse_check(argv: list[str], where: str) -> None:
    class Strict(argparse.ArgumentParser):
        def error(self, message):
            raise PolyalignError(f"{where}: {message}")

    module = importlib.import_module(_module_of(argv[0]))
    parser = Strict(prog=f"polyalign {argv[0]}", add_help=False)
    module.add_arguments(parser)
    parser.parse_args(argv[1:])


def check_model(name: str, hub: bool = True) -> None:
    """Fail early (one line, exit 2) when a model cannot be found; loading errors surface in the step.
    With hub=False only local folders are checked."""
    from polyalign.models import DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise PolyalignError(f"model folder {name} has no config.json")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PolyalignError(f"model folder not found: {name}")
    if not hub:
        return
    import logging

    from transformers import AutoConfig

    from polyalign.hf import hub_reachable
    offline = not hub_reachable()   # then the local cache only, at once (not a minute of retries)

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)   # no retry chatter: the error below is the one line
    try:
        AutoConfig.from_pretrained(name, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if offline:
            first = "not in the local Hugging Face cache, and the hub cannot be reached (offline)"
        raise PolyalignError(f"cannot load model {name!r}: {first[:200]}") from None
    finally:
        hub_log.setLevel(level)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", help="experiment YAML file (see docs/experiments.md)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the file, e.g. eval.limit=20 "
                                                "settings.zhde-en.per_language=500 train.epochs=1")
    p.add_argument("--demo", action="store_true", help="run the embedded demo experiment (into runs/demo)")
    p.add_argument("--output", default=None, help="run folder (default: the file's `output`, or runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the steps and which are done; run nothing")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the report at the end")


def main(args: argparse.Namespace) -> None:
    path, overrides = args.experiment, list(args.overrides or [])
    if path and "=" in path and not Path(path).exists():
        overrides.insert(0, path)
        path = None
    if args.demo and path:
        raise PolyalignError("give either an experiment file or --demo, not both")
    exp = load_experiment(path, overrides, demo=args.demo)
    run_experiment(exp, args.output, report=args.report, dry_run=args.dry_run)
