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

import errno
import gc
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.experiment.plan import (COMMAND_OF, SCHEMA_VERSION, Step, adapter_dir, outputs_problem,  # noqa: F401
                                       plan, step_config)
from polyalign.experiment.spec import Experiment, apply_overrides, load_experiment, validate  # noqa: F401
from polyalign.store import write_atomic, write_json

log = logging.getLogger(__name__)



def run_command(command: str, cfg):
    """Run one step: the command's work function on its config, in this process."""
    from polyalign.cli import COMMANDS

    _, work = COMMANDS[command].load()
    return work(cfg)


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
        "neurons": exp.neurons,
        "tuned_lens": exp.tuned_lens,
        "report": exp.report,
        "steps": [{"kind": st.kind, "label": st.label, "model": st.model, "setting": st.setting,
                   "task": st.task, "key": st.key, "dir": str(st.folder(run).relative_to(run)),
                   "inputs": st.inputs, **status.get(st.key, {})} for st in steps],
    }


def run_experiment(exp: Experiment, output: str | None = None, report: bool = True, dry_run: bool = False,
                   check_models: bool = True, out=None) -> Path:
    """Run (or resume) every step of `exp`; returns the run folder. Progress lines go to `out` (a
    text stream) when given, else to logging (the CLI shows them on stdout; the library prints nothing).
    Every step loads its model; the tokenizer is parsed once for the whole run."""
    from polyalign.models import sharing_tokenizers
    with sharing_tokenizers():
        return _run_experiment(exp, output, report, dry_run, check_models, out)


def _run_experiment(exp: Experiment, output: str | None, report: bool, dry_run: bool, check_models: bool,
                    out) -> Path:

    def say(message: str) -> None:
        if out is None:
            log.info("%s", message)
        else:
            print(message, file=out, flush=True)

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
            say(f"[{i}/{n}] {st.label:<40} {status[st.key]['status']:<8} {st.folder(run)}"
                + (f"  ({problem})" if problem else ""))
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
    say(f"experiment {exp.name}: {n} steps ({n - sum(1 for s in status.values() if s['status'] == 'done')} "
        f"to run) in {run}")
    for i, st in enumerate(steps, 1):
        head = f"[{i}/{n}] {st.label}"
        if status[st.key]["status"] == "done":
            say(f"{head}: done earlier ({_fmt_seconds(status[st.key].get('seconds'))}), "
                f"kept {st.folder(run).relative_to(run)}")
            continue
        elapsed = time.time() - started
        frac = spent_w / todo_w if todo_w else 1.0
        eta = (elapsed / spent_w * (todo_w - spent_w)) if spent_w and elapsed > 1 else None
        if status[st.key].get("problem"):
            say(f"{head}: finished earlier but {status[st.key]['problem']}; running it again")
        say(f"{head}  {_bar(frac)} {frac * 100:3.0f}%  elapsed {_fmt_seconds(elapsed)}  "
            f"ETA {_fmt_seconds(eta) if eta is not None else 'after the first step'}")
        folder = st.folder(run)
        folder.parent.mkdir(parents=True, exist_ok=True)   # the step command creates its own folder
        t0 = time.time()
        try:
            run_command(COMMAND_OF[st.kind], step_config(st, run))
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
        say(f"{head}: done in {_fmt_seconds(seconds)}")
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
        say(f"all {n} steps done in {_fmt_seconds(time.time() - started)}; report: {run / 'report.md'}")
        say(str(html))
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
    """Before any work: every command the plan needs exists; models exist. (The steps' options were
    checked when the file was read and the plan built their configs.)"""
    from polyalign.cli import COMMANDS

    for m in exp.models:
        check_model(m.name)
    for kind in dict.fromkeys(st.kind for st in steps):
        if COMMAND_OF[kind] not in COMMANDS:
            raise PolyalignError(f"this installation has no `polyalign {COMMAND_OF[kind]}` command, which the "
                                 f"experiment's {kind} steps need")


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


# ----------------------------------------------------------------------------- the command
@dataclass
class RunConfig:
    """The options of `polyalign run`."""
    experiment: str | None = option(None, positional=True, help="experiment YAML file (see docs/experiments.md)")
    overrides: list[str] = option([], positional=True, help="key=value overrides of the file, e.g. eval.limit=20 "
                                                            "settings.zhde-en.per_language=500 train.epochs=1")
    demo: bool = option(False, help="run the embedded demo experiment (into runs/demo)")
    output: str | None = option(None, help="run folder (default: the file's `output`, or runs/<name>)")
    dry_run: bool = option(False, help="validate, print the steps and which are done; run nothing")
    report: bool = option(True, help="skip the report at the end")


def run(cfg: RunConfig) -> Path:
    """Read the experiment (a file or the demo) with its overrides, then run or resume it; the run folder."""
    path, overrides = cfg.experiment, list(cfg.overrides or [])
    if path and "=" in path and not Path(path).exists():
        overrides.insert(0, path)
        path = None
    if cfg.demo and path:
        raise PolyalignError("give either an experiment file or --demo, not both")
    exp = load_experiment(path, overrides, demo=cfg.demo)
    return run_experiment(exp, cfg.output, report=cfg.report, dry_run=cfg.dry_run)
