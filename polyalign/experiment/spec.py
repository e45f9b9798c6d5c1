"""The experiment file of `polyalign run`: its format, loading, `a.b=value` overrides and validation.

Everything a run needs is checked here, before any work starts (see docs/experiments.md).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from polyalign import config as C
from polyalign import languages
from polyalign.errors import PolyalignError
from polyalign.store import safe_name

DEMO = "demo"

# ----------------------------------------------------------------------------- the file format
# Every key the format knows, with its default. A dict value is a section with its own keys. The
# keys of `eval`, of `prepare`, of `train` and of an analysis's `options` are the options of the
# step's command, read from its config dataclass (EvalConfig, PrepareConfig, TrainConfig, LensConfig,
# GeometryConfig): an option added there is a key here, checked by its type and allowed values.
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
    "prepare": {},                  # `polyalign prepare` options for every setting
    "train": {},                    # training hyper-parameters for every setting
    "eval": {},                     # `polyalign evaluate` options: see eval_defaults()
    "analyses": {"lens": None, "geometry": None, "neurons": None, "tuned_lens": None},
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
    "prepare": {},                  # `polyalign prepare` options for this setting
    "train": {},                    # training hyper-parameters for this setting
}
LENS_DEFAULTS: dict = {
    "task": None, "langs": ["zh", "ja", "ru"], "labels": "native", "limit": None, "data": None,
    "settings": None,               # which settings to compare with the base (default: all)
    "options": {},                  # other `polyalign lens` options
}
GEOMETRY_DEFAULTS: dict = {
    "task": None, "langs": ["en", "de", "fr", "hi", "th", "sw", "ms"], "limit": None, "data": None,
    "settings": None, "options": {},
}
NEURONS_DEFAULTS: dict = {
    "langs": None,                  # default: the eval languages
    "data": None,                   # text source (default: the bundled task sets and question pool)
    "settings": None,               # which settings' adapters to compare with the base (default: all)
    "options": {},                  # other `polyalign neurons` options (tokens_per_language, deactivate, ...)
}
TUNED_LENS_DEFAULTS: dict = {
    **LENS_DEFAULTS,                # the lens read with the logit and the tuned lens side by side
    "train": {},                    # `polyalign tune-lens` options (the lens is trained on the base model)
}
TUNE_LENS_RUNNER_SET = ("model", "adapter", "output", "progress", "dtype", "device")
MODEL_DEFAULTS: dict = {"name": None, "label": None, "dtype": None, "train": {}}

# Options of a step's command that the runner sets itself (from the models, the run folder and the
# steps a step depends on); every other option of the command is a key of its section.
EVAL_RUNNER_SET = ("model", "adapter", "output", "dtype", "device", "progress", "geometry_states")
EVAL_LIST_KEYS = ("tasks", "langs", "labels")       # lists in the file, comma strings in EvalConfig
PREPARE_RUNNER_SET = ("output", "progress")
ANALYSIS_RUNNER_SET = ("model", "adapter", "compare_adapter", "output", "progress")


def eval_defaults() -> dict:
    """The `eval` section's keys with their defaults: EvalConfig's options that the runner does not set."""
    from polyalign.evaluation.evaluate import EvalConfig

    out = {k: v for k, v in C.defaults(EvalConfig).items() if k not in EVAL_RUNNER_SET}
    out["calibration"] = "contextual"   # issue 12: experiments calibrate by default (the report compares)
    keys = [k for k in out if k != "limit"]
    keys.insert(keys.index("data"), "limit")       # manifest.json lists limit before data, as it always has
    return {k: out[k] for k in keys}


_nearest = C.nearest


def _check_keys(raw: dict, defaults: dict, where: str) -> dict:
    """Unknown keys -> PolyalignError naming the key and the nearest valid one; returns defaults + raw."""
    if not isinstance(raw, dict):
        raise PolyalignError(f"{where} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in defaults:
            raise C.UnknownKey(key, list(defaults), where)
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(raw))
    return out


def _options(cls, raw, where: str, runner_set) -> dict:
    """A section of a command's options (`prepare:`, an analysis's `options:`), checked against the
    command's config dataclass; returns it as given (the step hashes hold it so)."""
    if not isinstance(raw or {}, dict):
        raise PolyalignError(f"{where} must be a mapping of option: value")
    raw = dict(raw or {})
    C.from_mapping(cls, raw, where, keys=[k for k in C.names(cls) if k not in runner_set])
    return raw


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
class ModelEntry:
    """One model of the experiment (`model:` or an item of `models:`)."""
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
    models: list[ModelEntry]
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
    neurons: dict | None = None
    tuned_lens: dict | None = None
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
    top = _check_keys(raw, DEFAULTS, "")
    name = _opt_str(top["name"], "name") or default_name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PolyalignError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it names the run folder)")
    top["dtype"] = _dtype(top["dtype"], "dtype")
    top["device"] = _opt_str(top["device"], "device")
    seed = _opt_int(top["seed"], "seed", positive=False) or 0
    top["prepare"] = _prepare_options(top["prepare"], "prepare")
    if not isinstance(top["train"] or {}, dict):
        raise PolyalignError("train must be a mapping of option: value")
    top["train"] = dict(top["train"] or {})

    models = _models(top)
    ev, tasks = _eval_section(top["eval"], check_data)
    settings = _settings(top, ev, tasks, seed, check_data)
    _train_sections(top["train"], models, settings)
    lens, geometry, neurons, tuned_lens = _analyses(top["analyses"], ev, [s.name for s in settings], tasks, check_data)
    rep = _report_section(top["report"])
    output = _opt_str(top["output"], "output") or str(Path("runs") / name)
    return Experiment(name=name, description=str(top["description"] or ""), hardware=str(top["hardware"] or ""),
                      output=output, models=models, dtype=top["dtype"], device=top["device"], seed=seed,
                      settings=settings, prepare=top["prepare"], train=top["train"], eval=ev, lens=lens,
                      geometry=geometry, report=rep, neurons=neurons, tuned_lens=tuned_lens, raw=raw)


def _dtype(value, where: str) -> str | None:
    """A model's dtype, checked against the choices of the commands that load it."""
    from polyalign.evaluation.evaluate import EvalConfig

    value = _opt_str(value, where)
    return None if value is None else C.convert(C.spec(EvalConfig, "dtype"), value, where)


def _prepare_options(raw, where: str) -> dict:
    from polyalign.training.prepare import PrepareConfig
    return _options(PrepareConfig, raw, where, PREPARE_RUNNER_SET)


def _models(top: dict) -> list[ModelEntry]:
    if top["model"] is not None and top["models"] is not None:
        raise PolyalignError("give either `model` or `models`, not both")
    entries = top["models"] if top["models"] is not None else ([top["model"]] if top["model"] is not None else [])
    if not isinstance(entries, list) or not entries:
        raise PolyalignError("no model: set `model: NAME` or `models: [NAME, ...]`")
    models: list[ModelEntry] = []
    for i, entry in enumerate(entries):
        where = f"models.{i}" if top["models"] is not None else "model"
        spec = _check_keys({"name": entry} if isinstance(entry, str) else entry, MODEL_DEFAULTS, where)
        mname = _opt_str(spec["name"], f"{where}.name")
        if not mname:
            raise PolyalignError(f"{where}: a model needs a name (HF id, local folder or gemma-3-270m)")
        if not isinstance(spec["train"] or {}, dict):
            raise PolyalignError(f"{where}.train must be a mapping")
        models.append(ModelEntry(mname, _opt_str(spec["label"], f"{where}.label") or mname.rstrip("/").split("/")[-1],
                                 _dtype(spec["dtype"], f"{where}.dtype") or top["dtype"],
                                 dict(spec["train"] or {}), ""))
    slugs: dict[str, int] = {}
    for m in models:
        base = _slug(m.label)
        slugs[base] = slugs.get(base, 0) + 1
        m.slug = base if slugs[base] == 1 else f"{base}-{slugs[base]}"
    if len({m.label for m in models}) != len(models):
        raise PolyalignError("two models share a label; give each a distinct `label`")
    return models


def _eval_section(raw, check_data: bool) -> tuple[dict, dict]:
    """The `eval` section (EvalConfig's options) and the tasks it names, loaded."""
    from polyalign.evaluation.evaluate import EvalConfig
    from polyalign.tasks import LABEL_MODES, load_task

    ev = _check_keys(raw or {}, eval_defaults(), "eval")
    ev["tasks"] = _str_list(ev["tasks"], "eval.tasks")
    ev["langs"] = _lang_list(ev["langs"], "eval.langs")
    ev["labels"] = _str_list(ev["labels"], "eval.labels")
    for mode in ev["labels"]:
        if mode not in LABEL_MODES:
            raise PolyalignError(f"eval.labels: unknown label mode {mode!r}{_nearest(mode, LABEL_MODES)}")
    for key in ("limit", "batch_tokens", "max_length"):
        ev[key] = _opt_int(ev[key], f"eval.{key}")
    for key in ev:       # every other option: by its type and allowed values in EvalConfig
        if key not in EVAL_LIST_KEYS:
            ev[key] = C.convert(C.spec(EvalConfig, key), ev[key], f"eval.{key}")
    tasks = {}
    for tname in ev["tasks"]:
        tasks[tname] = load_task(tname)
        _check_task_langs(tasks[tname], ev["langs"], ev["labels"], "eval")
        if check_data:
            _check_eval_data(tasks[tname], ev["langs"], ev["data"], "eval")
    return ev, tasks


def _settings(top: dict, ev: dict, tasks: dict, seed: int, check_data: bool) -> list[Setting]:
    if not isinstance(top["settings"] or [], list):
        raise PolyalignError("settings must be a list of {sources, target, task, ...}")
    settings = [_setting(entry, i, top, ev, tasks, seed, check_data) for i, entry in enumerate(top["settings"] or [])]
    names = [s.name for s in settings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PolyalignError(f"two settings are named {dupes[0]!r}; give each a distinct `name`")
    for sname in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", sname):
            raise PolyalignError(f"setting name {sname!r}: use letters, digits, '.', '_' or '-'")
    return settings


def _setting(entry, i: int, top: dict, ev: dict, tasks: dict, seed: int, check_data: bool) -> Setting:
    from polyalign.tasks import load_task

    s = _check_keys(entry, SETTING_DEFAULTS, f"settings.{i}")
    sname = _opt_str(s["name"], f"settings.{i}.name") or _setting_name(s)
    where = f"setting {sname}"
    sources = _lang_list(s["sources"], f"{where}: sources")
    target = _lang_list([s["target"]] if not isinstance(s["target"], list) else s["target"], f"{where}: target")
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
    if not isinstance(s["train"] or {}, dict):
        raise PolyalignError(f"{where}.train must be a mapping")
    if not isinstance(s["prepare"] or {}, dict):
        raise PolyalignError(f"{where}.prepare must be a mapping")
    own = _prepare_options(s["prepare"], f"settings.{i}.prepare")
    extra = {**top["prepare"], **own}
    # `prepare: {data: ...}` gives every setting the same question source.
    data = _opt_str(s["data"] if s["data"] is not None else extra.get("data"), f"{where}.data")
    per_language = _opt_int(s["per_language"], f"{where}.per_language")
    sseed = _opt_int(s["seed"], f"{where}.seed", positive=False)
    if check_data:
        _check_question_data(task, [*sources, target], data, extra, where)
    return Setting(sname, sources, target, task.name, data, per_language, seed if sseed is None else sseed,
                   own, dict(s["train"] or {}))


def _train_sections(common: dict, models: list[ModelEntry], settings: list[Setting]) -> None:
    _check_train_keys(common, "train")
    for m in models:
        _check_train_keys(m.train, f"model {m.label}: train")
    for s in settings:
        _check_train_keys(s.train, f"setting {s.name}: train")
    _check_train_values(common, models, settings)


def _analyses(raw, ev: dict, setting_names: list[str], tasks: dict, check_data: bool):
    from polyalign.tasks import LABEL_MODES, load_task

    an = _check_keys(raw or {}, DEFAULTS["analyses"], "analyses")
    lens = geometry = None
    found = {}
    for kind, defaults in (("lens", LENS_DEFAULTS), ("tuned_lens", TUNED_LENS_DEFAULTS)):
        if an[kind] is None:
            continue
        where = f"analyses.{kind}"
        a = found[kind] = _analysis(an[kind], defaults, where, ev, setting_names, tasks, check_data)
        lmode = _opt_str(a["labels"], f"{where}.labels")
        if lmode not in LABEL_MODES:
            raise PolyalignError(f"{where}.labels: unknown label mode {lmode!r}{_nearest(lmode, LABEL_MODES)}")
        _check_task_langs(load_task(a["task"]), a["langs"], [lmode], where)
    lens, tuned_lens = found.get("lens"), found.get("tuned_lens")
    if tuned_lens is not None:
        from polyalign.analysis.tuned_lens import TuneLensConfig
        tuned_lens["train"] = _options(TuneLensConfig, tuned_lens["train"], "analyses.tuned_lens.train",
                                       TUNE_LENS_RUNNER_SET)
    if an["geometry"] is not None:
        geometry = _analysis(an["geometry"], GEOMETRY_DEFAULTS, "analyses.geometry", ev, setting_names, tasks,
                             check_data)
        if len(geometry["langs"]) < 2:
            raise PolyalignError("analyses.geometry.langs: give at least two languages to compare")
    neurons = None
    if an["neurons"] is not None:
        neurons = _neurons_analysis(an["neurons"], ev, setting_names, check_data)
    return lens, geometry, neurons, tuned_lens


def _neurons_analysis(raw, ev: dict, setting_names: list[str], check_data: bool) -> dict:
    """`analyses.neurons`: the languages whose neurons are found (at least two: LAPE compares them),
    their text, the settings compared with the base, and `polyalign neurons` options."""
    from polyalign.analysis.neurons import NeuronsConfig

    where = "analyses.neurons"
    a = _check_keys({} if raw is True else raw, NEURONS_DEFAULTS, where)
    a["langs"] = _lang_list(a["langs"] if a["langs"] is not None else ev["langs"], f"{where}.langs")
    if len(a["langs"]) < 2:
        raise PolyalignError(f"{where}.langs: give at least two languages (language-specific neurons are found "
                             "by comparing languages)")
    a["data"] = _opt_str(a["data"], f"{where}.data")
    if check_data and a["data"] and not a["data"].startswith("hf:") and "{" not in a["data"] \
            and not Path(a["data"]).exists():
        raise PolyalignError(f"{where}.data: data path not found: {a['data']}")
    a["settings"] = _chosen_settings(a["settings"], setting_names, where)
    a["options"] = _options(NeuronsConfig, a["options"], f"{where}.options", ANALYSIS_RUNNER_SET)
    return a


def _chosen_settings(chosen, setting_names: list[str], where: str) -> list[str]:
    """An analysis's `settings:` (default: all), each checked against the experiment's settings."""
    if chosen is None:
        chosen = list(setting_names)
    elif isinstance(chosen, str):
        chosen = [chosen]
    for sname in chosen:
        if sname not in setting_names:
            raise PolyalignError(f"{where}.settings: no setting named {sname!r}{_nearest(sname, setting_names)}")
    return list(chosen)


def _report_section(raw) -> dict:
    rep = _check_keys(raw or {}, DEFAULTS["report"], "report")
    rep["bootstrap"] = _opt_int(rep["bootstrap"], "report.bootstrap") or 10000
    rep["seed"] = _opt_int(rep["seed"], "report.seed", positive=False) or 0
    if not isinstance(rep["alpha"], (int, float)) or not 0 < rep["alpha"] < 1:
        raise PolyalignError(f"report.alpha must lie between 0 and 1, got {rep['alpha']!r}")
    return rep


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
    a["settings"] = _chosen_settings(a["settings"], setting_names, where)
    kind = where.split(".")[-1]
    runner_set = ANALYSIS_RUNNER_SET + (("tuned_lens",) if kind == "tuned_lens" else ())   # the runner's lens
    a["options"] = _options(_analysis_config(kind), a["options"], f"{where}.options", runner_set)
    return a


def _analysis_config(kind: str):
    if kind in ("lens", "tuned_lens"):
        from polyalign.analysis.lens import LensConfig
        return LensConfig
    from polyalign.analysis.geometry import GeometryConfig
    return GeometryConfig


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
    """Training hyper-parameters checked against TrainConfig's."""
    from polyalign.training.train import defaults

    known = list(defaults())
    for key in overrides or {}:
        if key not in known:
            raise PolyalignError(f"{where}: unknown training option {key!r}{_nearest(key, known)}")


def _check_train_values(common: dict, models: list, settings: list) -> None:
    """Every train step's options converted and range-checked as `polyalign train` will (types, ranges), so
    that `lr: fast` fails at load time and not after the base evaluation. Settings override models,
    which override the file's `train:` (as plan() merges them)."""
    from polyalign.training import train

    def where(m, s) -> str:
        return f"setting {s.name}: train" if s.train else f"model {m.label}: train" if m.train else "train"
    combos = [("train", common)] + [(where(m, s), {**common, **m.train, **s.train}) for m in models for s in settings]
    for where, overrides in combos:
        try:
            train.resolve_config(train.apply_settings(train.TrainConfig(), overrides, where))
        except PolyalignError as e:
            raise PolyalignError(f"{where}: {e}") from None
