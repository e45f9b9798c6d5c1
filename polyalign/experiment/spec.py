"""The experiment file of `polyalign run`: its format, loading, `a.b=value` overrides and validation.

Everything a run needs is checked here, before any work starts (see docs/experiments.md).
"""
from __future__ import annotations

import copy
import difflib
import importlib
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from polyalign import languages
from polyalign.errors import PolyalignError

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
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1]).strip("-") or "model"


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
            from polyalign.experiment.plan import _kv
            train.resolve_config(train.TrainConfig(overrides=_kv(overrides)))
        except PolyalignError as e:
            raise PolyalignError(f"{where}: {e}") from None
