"""The plan of `polyalign run`: an experiment's steps, their hash keys and their folders.

    eval (base) -> per setting: prepare -> train -> eval (adapter) -> lens, geometry -> report

Every step writes into `<run>/steps/<kind>-<hash>/`, where the hash covers the step's inputs and
the keys of the steps it depends on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable

from polyalign.errors import PolyalignError
from polyalign.experiment.spec import Experiment, ModelSpec
from polyalign.store import content_hash

SCHEMA_VERSION = 1


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
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return dst
