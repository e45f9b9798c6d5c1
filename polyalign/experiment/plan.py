"""The plan of `polyalign run`: an experiment's steps, their hash keys and their folders.

    eval (base) -> per setting: prepare -> train -> eval (adapter) -> lens, geometry, neurons -> report

Every step writes into `<run>/steps/<kind>-<hash>/`, where the hash covers the step's inputs and
the keys of the steps it depends on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

from polyalign.errors import PolyalignError
from polyalign import config as C
from polyalign import languages
from polyalign.experiment.spec import Experiment, ModelEntry, Setting
from polyalign.store import atomic_folder, content_hash

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- steps
@dataclass
class Step:
    kind: str                       # eval | prepare | train | lens | geometry | neurons | tune_lens | tuned_lens
    label: str                      # what the progress line shows
    inputs: dict                    # everything that determines the artefact
    deps: list["Step"]
    weight: float                   # estimated cost, for the ETA
    model: str | None = None        # model label
    setting: str | None = None
    task: str | None = None
    folder_inputs: dict | None = None   # the inputs that name the folder (default: all of them)
    config: object | None = None    # the command's config; step_config() adds the paths in the run folder
    feeds: "Step | None" = None     # eval: the geometry step whose states its forwards also pool (not in its key)
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
    if kind == "tune_lens":
        return None if (folder / "lens.safetensors").is_file() and _json_file(folder / "lens.json") is not None \
            else "the tuned lens (lens.safetensors, lens.json) is missing"
    if kind in ("lens", "geometry", "neurons", "tuned_lens"):
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


# Which command runs a step of each kind.
COMMAND_OF = {"eval": "evaluate", "prepare": "prepare", "train": "train", "lens": "lens", "geometry": "geometry",
              "neurons": "neurons", "tune_lens": "tune-lens", "tuned_lens": "lens"}
# Eval options that name the eval folders whatever their value; any other option does when it is set
# to something other than its default (so that adding an option keeps today's folders' names).
EVAL_HASHED = ("scoring", "limit", "data", "max_length", "trust_file_labels")


def plan(exp: Experiment) -> list[Step]:
    """The ordered steps of an experiment, each with its hash key and its command's config."""
    steps: list[Step] = []

    def add(step: Step) -> Step:
        step.finalize()
        steps.append(step)
        return step

    trains: dict[tuple[str, str], Step] = {}
    prepares: dict[str, Step] = {}
    for m in exp.models:
        for task in exp.eval["tasks"]:
            add(_eval_step(exp, m, task, None, None))
        for s in exp.settings:
            if s.name not in prepares:
                prepares[s.name] = add(_prepare_step(exp, s))
            train = trains[(m.label, s.name)] = add(_train_step(exp, m, s, prepares[s.name]))
            for task in exp.eval["tasks"]:
                add(_eval_step(exp, m, task, train, s.name))
    for kind, cfg in (("lens", exp.lens), ("geometry", exp.geometry)):
        if cfg is not None:
            for m in exp.models:
                add(_analysis_step(exp, kind, cfg, m, [trains[(m.label, sname)] for sname in cfg["settings"]]))
    if exp.tuned_lens is not None:     # a tuned lens trained on each base model, then read beside the logit lens
        cfg = exp.tuned_lens
        for m in exp.models:
            tune = add(_tune_lens_step(exp, cfg, m))
            add(_analysis_step(exp, "tuned_lens", cfg, m, [trains[(m.label, sname)] for sname in cfg["settings"]],
                               tune))
    if exp.neurons is not None:
        for m in exp.models:
            add(_neurons_step(exp, exp.neurons, m, [trains[(m.label, sname)] for sname in exp.neurons["settings"]]))
    _share_geometry_forwards(steps)
    return steps


def _share_geometry_forwards(steps: list[Step]) -> None:
    """Let each eval step that scores the prompts of a later geometry step (same model and adapter,
    task, label mode, dtype, context cap, data, and the geometry's items among the evaluated ones,
    in at least one common language) pool the hidden states of its own forwards for it, so that
    the geometry step runs none for them. It changes no step key: the evaluation's results are the
    same either way, and a changed geometry must not score again (it then computes its own states).
    The evaluator checks the items and prompts themselves, and geometry the cache key, so a
    mismatch here costs forwards, never correctness."""
    for geo in (st for st in steps if st.kind == "geometry"):
        g = geo.config
        compared = {d.key for d in geo.deps if d.kind == "train"}
        for ev in steps:
            if ev.kind != "eval" or ev.model != geo.model:
                continue
            if ev.deps and ev.deps[0].key not in compared:      # an adapter this geometry does not analyse
                continue
            e = ev.config
            if (ev.task == geo.task and ev.inputs["task_file"] == geo.inputs["task_file"] and not g.recompute
                    and g.labels in e.labels.split(",") and e.dtype == g.dtype and e.max_length == g.max_length
                    and e.data == g.data and e.trust_file_labels == g.trust_file_labels
                    and (e.limit is None or (g.limit is not None and e.limit >= g.limit))
                    and set(languages.parse_langs(g.langs)) & set(languages.parse_langs(e.langs))):
                ev.feeds = geo


def _eval_step(exp: Experiment, m: ModelEntry, task: str, train: Step | None, sname: str | None) -> Step:
    from polyalign.evaluation.evaluate import EvalConfig

    ev = exp.eval
    options = {k: v for k, v in ev.items() if k not in ("tasks", "langs", "labels")}
    defaults = C.defaults(EvalConfig)
    eval_common = {k: options[k] for k in EVAL_HASHED}
    # Any other option (batch_tokens: it changes scores in the last bits, and evaluate refuses a folder
    # scored with another value) is named only when set, so that the folders of runs without it keep
    # their names.
    eval_common.update({k: v for k, v in options.items() if k not in EVAL_HASHED and v != defaults[k]})
    folder_inputs = {"model": m.name, "dtype": m.dtype, "task": task, "task_file": _task_hash(task), **eval_common}
    inputs = {**folder_inputs, "langs": ev["langs"], "labels": ev["labels"]}
    n = _count_items(task, ev["langs"], ev["data"], ev["limit"]) * len(ev["labels"])
    mlabel = f"{m.label} " if len(exp.models) > 1 else ""
    config = C.from_mapping(EvalConfig, {**options, "model": m.name, "tasks": task, "langs": ",".join(ev["langs"]),
                                         "labels": ",".join(ev["labels"]), "dtype": m.dtype, "device": exp.device},
                            "eval")
    return Step("eval", f"eval {mlabel}{sname or 'base'} {task}", inputs, [train] if train else [],
                40 + n * (1.15 if train else 1.0), m.label, sname, task, folder_inputs, config)


def _prepare_step(exp: Experiment, s: Setting) -> Step:
    from polyalign.training.prepare import PrepareConfig

    popts = {k: v for k, v in {**exp.prepare, **s.prepare}.items() if k != "data"}
    pin = {"task": s.task, "task_file": _task_hash(s.task), "sources": s.sources, "target": s.target,
           "per_language": s.per_language, "data": s.data, "seed": s.seed, "options": popts}
    n_pairs = (s.per_language or 1000) * len(s.sources)
    given = {"task": s.task, "sources": ",".join(s.sources), "target": s.target, "seed": s.seed}
    if s.per_language:
        given["per_language"] = s.per_language
    if s.data:
        given["data"] = s.data
    config = C.from_mapping(PrepareConfig, {**given, **popts}, f"setting {s.name}: prepare")
    return Step("prepare", f"prepare {s.name}", pin, [], 5 + n_pairs * 0.01, None, s.name, s.task, None, config)


def _train_step(exp: Experiment, m: ModelEntry, s: Setting, prepare: Step) -> Step:
    from polyalign.training.train import TrainConfig, apply_settings

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
    settings = dict(overrides)
    if "seed" not in settings and s.seed is not None:
        settings["seed"] = s.seed
    if "dtype" not in settings and m.dtype not in (None, "auto"):
        settings["dtype"] = m.dtype
    if "device" not in settings and exp.device not in (None, "auto"):
        settings["device"] = exp.device
    # resume: continue an unfinished run of the same config, and start a fresh one otherwise.
    config = apply_settings(TrainConfig(model=m.name, resume=True), settings, f"setting {s.name}: train")
    return Step("train", f"train{mlabel} {s.name}", tin, [prepare], 60 + work * 4, m.label, s.name, s.task, None,
                config)


def _analysis_step(exp: Experiment, kind: str, cfg: dict, m: ModelEntry, chosen: list[Step],
                   tune: Step | None = None) -> Step:
    """A lens, geometry or tuned_lens step (the last reads the lens of the `tune` step beside the logit lens)."""
    from polyalign.experiment.spec import _analysis_config

    ain = {"model": m.name, "dtype": m.dtype, "task": cfg["task"], "task_file": _task_hash(cfg["task"]),
           "langs": cfg["langs"], "limit": cfg["limit"], "data": cfg["data"], "options": cfg["options"],
           "compare": list(cfg["settings"])}
    given = {"model": m.name, "task": cfg["task"], "langs": ",".join(cfg["langs"])}
    if kind in ("lens", "tuned_lens"):
        ain["labels"] = given["labels"] = cfg["labels"]
    if kind == "tuned_lens":
        given["lens"] = "both"
    for key in ("limit", "data"):
        if cfg[key]:
            given[key] = cfg[key]
    if m.dtype and m.dtype != "auto":
        given["dtype"] = m.dtype
    if exp.device and exp.device != "auto":
        given["device"] = exp.device
    config = C.from_mapping(_analysis_config(kind), {**given, **cfg["options"]}, f"analyses.{kind}")
    n = _count_items(cfg["task"], cfg["langs"], cfg["data"], cfg["limit"])
    mlabel = f" {m.label}" if len(exp.models) > 1 else ""
    what = ("base vs " + ", ".join(cfg["settings"])) if cfg["settings"] else "base"
    deps = ([tune] if tune else []) + chosen
    views = 2 if kind == "tuned_lens" else 1
    return Step(kind, f"{kind.replace('_', ' ')}{mlabel} {what}", ain, deps,
                40 + n * (1 + len(chosen)) * views * (0.5 if kind == "geometry" else 1.2), m.label,
                ",".join(cfg["settings"]) or None, cfg["task"], None, config)


def _tune_lens_step(exp: Experiment, cfg: dict, m: ModelEntry) -> Step:
    from polyalign.analysis.tuned_lens import TuneLensConfig

    tin = {"model": m.name, "dtype": m.dtype, "train": cfg["train"]}
    given = {"model": m.name}
    if m.dtype and m.dtype != "auto":
        given["dtype"] = m.dtype
    if exp.device and exp.device != "auto":
        given["device"] = exp.device
    config = C.from_mapping(TuneLensConfig, {**given, **cfg["train"]}, "analyses.tuned_lens.train")
    mlabel = f" {m.label}" if len(exp.models) > 1 else ""
    return Step("tune_lens", f"tune-lens{mlabel}", tin, [], 60 + config.steps * config.tokens_per_step / 500,
                m.label, None, None, None, config)


def _neurons_step(exp: Experiment, cfg: dict, m: ModelEntry, chosen: list[Step]) -> Step:
    from polyalign.analysis.neurons import NeuronsConfig

    nin = {"model": m.name, "dtype": m.dtype, "langs": cfg["langs"], "data": cfg["data"], "options": cfg["options"],
           "compare": list(cfg["settings"])}
    given = {"model": m.name, "langs": ",".join(cfg["langs"]), "eval_task": exp.eval["tasks"][0],
             "eval_labels": exp.eval["labels"][0]}
    if cfg["data"]:
        given["data"] = cfg["data"]
    if m.dtype and m.dtype != "auto":
        given["dtype"] = m.dtype
    if exp.device and exp.device != "auto":
        given["device"] = exp.device
    config = C.from_mapping(NeuronsConfig, {**given, **cfg["options"]}, "analyses.neurons")
    if config.deactivate:   # what is evaluated names the step too, when it is the runner's choice
        nin["eval_task"], nin["eval_labels"] = config.eval_task, config.eval_labels
    tokens = config.tokens_per_language * len(cfg["langs"]) * (1 + len(chosen))
    evals = 0
    if config.deactivate:    # nothing zeroed, then each language's neurons and its random control
        eval_langs = languages.parse_langs(config.eval_langs or config.langs)
        evals = (1 + 2 * len(cfg["langs"])) * _count_items(config.eval_task, eval_langs, config.eval_data,
                                                           config.eval_limit)
    mlabel = f" {m.label}" if len(exp.models) > 1 else ""
    what = ("base vs " + ", ".join(cfg["settings"])) if cfg["settings"] else "base"
    return Step("neurons", f"neurons{mlabel} {what}", nin, chosen, 40 + tokens / 200 + evals, m.label,
                ",".join(cfg["settings"]) or None, None, None, config)


def step_config(st: Step, run: Path):
    """The step's config with its paths in the run folder: its output folder, and the artefacts of
    the steps it depends on (the prepared pairs, the trained adapter, copies named after the settings)."""
    cfg = replace(st.config, output=str(st.folder(run)))
    if st.kind == "eval" and st.deps:
        cfg = replace(cfg, adapter=str(adapter_dir(st.deps[0].folder(run))))
    if st.kind == "eval" and st.feeds is not None:
        cfg = replace(cfg, geometry_states=_geometry_states(st, st.feeds, run))
    elif st.kind == "train":
        cfg = replace(cfg, data=str(st.deps[0].folder(run)))
    elif st.kind in ("lens", "geometry", "neurons", "tuned_lens"):
        # A copy named after the setting, so that the step's tables and legends say which it is.
        cfg = replace(cfg, compare_adapter=[str(_named_adapter(st.folder(run), d.folder(run), d.setting))
                                            for d in st.deps if d.kind == "train"])
        if st.kind == "tuned_lens":
            cfg = replace(cfg, tuned_lens=str(next(d for d in st.deps if d.kind == "tune_lens").folder(run)))
    return cfg


def _geometry_states(ev: Step, geo: Step, run: Path) -> dict:
    """EvalConfig.geometry_states of an eval step feeding `geo`: the geometry step's options with its
    folder, and the label the geometry step gives the evaluated model (as model_specs labels it)."""
    from polyalign.analysis.common import model_labels
    from polyalign.analysis.geometry import SHARED_OPTIONS

    trains = [d for d in geo.deps if d.kind == "train"]
    labels = model_labels([None, *(str(geo.folder(run) / "adapters" / d.setting) for d in trains)])
    label = labels[0] if not ev.deps else labels[1 + [d.key for d in trains].index(ev.deps[0].key)]
    cfg = replace(geo.config, output=str(geo.folder(run)))
    return {"label": label, "geometry": {k: getattr(cfg, k) for k in SHARED_OPTIONS}}


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
