"""`polyalign evaluate`: few-shot multilingual evaluation with constrained decoding.

Writes <output>/samples/<task>/<labels>/<lang>.jsonl (one line per item, appended batch by batch,
so a killed run loses nothing and a rerun resumes) and <output>/results.json (atomically, after
every finished language). Under `accelerate launch` each process scores a share of the batches
and rank 0 merges them into the same files.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from polyalign import config as C
from polyalign import hardware, languages
from polyalign.distributed import launch_state
from polyalign.config import option
from polyalign.data import load_data
from polyalign.evaluation import calibration, diagnostics
from polyalign.errors import PolyalignError
from polyalign.engine.prompts import check_lengths
from polyalign.evaluation.scoring import RULES
from polyalign.stats import wilson
from polyalign.store import append_lines, check_fingerprint, content_hash, read_jsonl, write_json, write_jsonl
from polyalign.tasks import LABEL_MODES, Task, parse_tasks

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """The options of `polyalign evaluate` (the CLI, experiment files and Python read them from here)."""
    model: str = C.model_option()
    tasks: str = option("amazon_polarity", help="comma list of task names or task YAML paths")
    langs: str = option("all", help="'all', 'high', 'low' or a comma list (en,de,zh)")
    labels: str = option("english", help=f"label mode(s): {', '.join(LABEL_MODES)} (comma list)")
    scoring: str = option("paper", choices=RULES, help="how a class is scored at the answer position (see README)")
    output: str = option("runs/eval", help="output folder (resumes the run it holds)")
    data: str | None = C.data_option()
    limit: int | None = C.limit_option()
    dtype: str = C.dtype_option()
    device: str = C.device_option()
    adapter: str | None = option(None, help="PEFT LoRA adapter folder (loaded, not merged)")
    batch_tokens: int | None = C.batch_tokens_option()
    max_length: int | None = C.max_length_option()
    trust_file_labels: bool = C.trust_file_labels_option()
    calibration: str = option("none", choices=calibration.CALIBRATIONS,
                              help="also score content-free and answer-cue prompts and store calibrated scores "
                                   "(any method but none stores all methods: they share one forward)")
    geometry_states: dict | None = option(None, cli=False,
                                          help="also pool this evaluation's forwards into a geometry run's states "
                                               "cache where it scores the same prompts: {label, geometry: its "
                                               "options} (polyalign run sets it; see analysis.geometry.SharedStates)")
    progress: bool = C.progress_option()
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("polyalign", "torch", "transformers", "peft", "accelerate", "datasets", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sample_path(output: Path, task: str, mode: str, lang: str) -> Path:
    return output / "samples" / task / mode / f"{lang}.jsonl"


def summarize(samples: list[dict], task: str, lang: str, mode: str, rule: str) -> dict:
    n = len(samples)
    correct = sum(s["correct"] for s in samples)
    lo, hi = wilson(correct, n)
    row = {"task": task, "lang": lang, "labels": mode, "scoring": rule, "n": n,
           "acc": correct / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
           "ties": sum(s.get("tied", False) for s in samples),
           "truncated": sum(s.get("truncated", False) for s in samples)}
    if rule == "sequence":
        row["acc_byte"] = sum(s["pred_byte"] == s["gold"] for s in samples) / n if n else float("nan")
    # issue 12: calibrated accuracies (calibrated runs) and the label-bias diagnostics (always)
    acc_cal = calibration.accuracy_calibrated(samples)
    if acc_cal is not None:
        row["acc_calibrated"] = acc_cal
    row.update(diagnostics.summary_fields(samples, rule))
    return row


def averages(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["task"], r["labels"], r["scoring"]) for r in rows})
    groups = {"all": set(languages.ALL), "high": set(languages.HIGH), "low": set(languages.LOW)}
    for task, mode, rule in keys:
        mine = [r for r in rows if (r["task"], r["labels"], r["scoring"]) == (task, mode, rule) and r["n"]]
        for gname, members in groups.items():
            sel = [r for r in mine if r["lang"] in members]
            if sel:
                out.append({"task": task, "labels": mode, "scoring": rule, "langs": gname, "n_langs": len(sel),
                            "acc": sum(r["acc"] for r in sel) / len(sel)})
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'task':<16} {'labels':<8} {'lang':<4} {'n':>5} {'acc':>7}  95% CI"]
    for r in rows:
        lines.append(f"{r['task']:<16} {r['labels']:<8} {r['lang']:<4} {r['n']:>5} {r['acc']:>7.3f}  "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                     + "".join(f"  {m} {v:.3f}" for m, v in (r.get("acc_calibrated") or {}).items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EvalRow:
    """One (task, language, label mode): a row of results.json (`acc_byte` with `sequence` scoring only)."""
    task: str
    lang: str
    labels: str
    scoring: str
    n: int
    acc: float
    ci_low: float
    ci_high: float
    ties: int
    truncated: int
    acc_byte: float | None = None
    # issue 12: label-bias diagnostics (always; see evaluation/diagnostics.py) and, in calibrated runs,
    # accuracy and bias per calibration method and the group's reference distributions
    bias: dict | None = None
    acc_calibrated: dict | None = None
    bias_calibrated: dict | None = None
    p_ref: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("acc_byte", "bias", "acc_calibrated", "bias_calibrated", "p_ref"):
            if d[key] is None:
                del d[key]
        return d


@dataclass(frozen=True)
class EvalAverage:
    """The mean accuracy of a (task, label mode, scoring) over a group of languages (all, high, low)."""
    task: str
    labels: str
    scoring: str
    langs: str
    n_langs: int
    acc: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult(Mapping):
    """What `evaluate` found: `rows` and `averages` as typed records, `samples` (one dict per scored
    item, as the samples/*.jsonl lines), and the rest of results.json. `to_dict()` is exactly what
    results.json holds (with an output folder, its rows cover every sample in the folder); the
    result also reads like that dict (`result["rows"]`)."""
    rows: list[EvalRow]
    averages: list[EvalAverage]
    samples: list[dict]
    model: dict
    config: dict
    versions: dict
    machine: dict
    git: str | None
    timing: dict
    data_issues: list[str]
    label_overlaps: list[str]
    output: Path | None = None

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows], "averages": [a.to_dict() for a in self.averages],
                "model": self.model, "config": self.config, "versions": self.versions, "machine": self.machine,
                "git": self.git, "timing": self.timing, "data_issues": self.data_issues,
                "label_overlaps": self.label_overlaps}

    def to_pandas(self, what: str = "rows"):
        """`rows`, `averages` or `samples` as a pandas DataFrame (pandas is not a dependency)."""
        tables = {"rows": lambda: [r.to_dict() for r in self.rows],
                  "averages": lambda: [a.to_dict() for a in self.averages], "samples": lambda: self.samples}
        if what not in tables:
            raise PolyalignError(f"to_pandas: unknown table {what!r}; use {', '.join(tables)}")
        try:
            import pandas as pd
        except ImportError:
            raise PolyalignError("to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(tables[what]())

    def table(self) -> str:
        """The accuracy table the command line prints."""
        return format_table([r.to_dict() for r in self.rows])

    # Mapping over to_dict(), so that code written for the dict evaluate returned keeps working.
    def __getitem__(self, key):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self):
        return len(self.to_dict())

    @classmethod
    def from_dict(cls, results: dict, samples: list[dict], output: Path | None) -> "EvalResult":
        return cls(rows=[EvalRow(**r) for r in results["rows"]],
                   averages=[EvalAverage(**a) for a in results["averages"]], samples=samples,
                   output=output, **{k: v for k, v in results.items() if k not in ("rows", "averages")})


# ----------------------------------------------------------------------------- where samples go
class _FolderSamples:
    """Samples in <output>/samples/<task>/<labels>/<lang>.jsonl, appended batch by batch; under
    several processes each rank appends to <lang>.rank<r>.jsonl and rank 0 merges them."""

    def __init__(self, output: Path, rank: int, world: int):
        self.output, self.rank, self.world = output, rank, world

    def _paths(self, task: str, mode: str, lang: str) -> tuple[Path, Path]:
        path = sample_path(self.output, task, mode, lang)
        return path, path if self.world == 1 else path.with_name(f"{lang}.rank{self.rank}.jsonl")

    def done(self, task: str, mode: str, lang: str) -> set:
        path, mine = self._paths(task, mode, lang)
        done = {s["id"] for s in read_jsonl(path, repair=self.world == 1)}
        for part in path.parent.glob(f"{lang}.rank*.jsonl"):
            done |= {s["id"] for s in read_jsonl(part, repair=part == mine)}
        return done

    def append(self, task: str, mode: str, lang: str, records: list[dict]) -> None:
        append_lines(self._paths(task, mode, lang)[1], records)

    def merge(self, task: str, mode: str, lang: str, ids: list) -> list[dict] | None:
        """On rank 0: every rank's samples in data order (the file rewritten so); None elsewhere."""
        if self.rank != 0:
            return None
        path = self._paths(task, mode, lang)[0]
        merged = {s["id"]: s for s in read_jsonl(path)}
        parts = list(path.parent.glob(f"{lang}.rank*.jsonl"))
        for part in parts:
            merged.update({s["id"]: s for s in read_jsonl(part)})
        ordered = [merged[i] for i in ids if i in merged]
        if parts or [s["id"] for s in read_jsonl(path)] != [s["id"] for s in ordered]:
            write_jsonl(path, ordered)  # canonical file order, identical whatever the resume history
            for part in parts:
                part.unlink()
        return ordered


class _MemorySamples:
    """Samples kept in memory (no output folder); under several processes rank 0 gathers them."""

    def __init__(self, world: int):
        self.world, self.records = world, {}

    def done(self, task: str, mode: str, lang: str) -> set:
        return {s["id"] for s in self.records.get((task, mode, lang), [])}

    def append(self, task: str, mode: str, lang: str, records: list[dict]) -> None:
        self.records.setdefault((task, mode, lang), []).extend(records)

    def merge(self, task: str, mode: str, lang: str, ids: list) -> list[dict] | None:
        mine = self.records.pop((task, mode, lang), [])
        if self.world > 1:
            from accelerate.utils import gather_object
            mine = gather_object(mine)       # every rank calls it; each gets every rank's records
        merged = {s["id"]: s for s in mine}
        return [merged[i] for i in ids if i in merged]


# ----------------------------------------------------------------------------- the job
def evaluate(cfg: EvalConfig, *, model=None, tokenizer=None) -> EvalResult:
    """Evaluate `cfg.model` (or the loaded `model` with its `tokenizer`) on cfg's tasks, languages and
    label modes. With `cfg.output` None nothing is written and the samples stay in memory; with a
    folder, samples are appended batch by batch, results.json rewritten after every language, and
    a rerun resumes. Under several processes the returned result is rank 0's (None elsewhere)."""
    rank, world, state = launch_state(cfg.device)
    tasks: list[Task] = parse_tasks(cfg.tasks)
    langs = languages.parse_langs(cfg.langs)
    modes = [m.strip() for m in cfg.labels.split(",") if m.strip()]
    if not modes:
        raise PolyalignError(f"no label mode given (--labels): use {', '.join(LABEL_MODES)} (comma list allowed)")
    for m in modes:
        if m not in LABEL_MODES:
            raise PolyalignError(f"unknown label mode {m!r}; use {', '.join(LABEL_MODES)}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise PolyalignError("--limit must be a positive number")
    from polyalign.evaluation.scoring import RULES
    if cfg.scoring not in RULES:     # the CLI's choices catch it there; from Python, before the model loads
        raise PolyalignError(f"unknown scoring rule {cfg.scoring!r}; use one of {', '.join(RULES)}")
    check_lengths(cfg.batch_tokens, cfg.max_length)
    calibration.check_calibration(cfg.calibration)
    from polyalign.models import check_adapter, from_loaded, resolve_device, resolve_dtype
    if model is not None:
        if cfg.adapter:
            raise PolyalignError("adapter= applies to a model name; wrap a loaded model with "
                                 "peft.PeftModel.from_pretrained(model, adapter) instead")
        lm = from_loaded(model, tokenizer)
        if cfg.geometry_states is not None:   # geometry keys a loaded model's states by its weights: not shared
            log.info("geometry states: not shared from a loaded model")
        cfg = replace(cfg, model=lm.name, geometry_states=None)
        device = str(lm.device)
    else:
        lm = None
        device = str(state.device) if state and cfg.device == "auto" else cfg.device
        dev = resolve_device(device)  # --device cuda without CUDA, and fp16 on a CPU, are refused now
        if cfg.dtype == "fp16":       # (other dtypes are resolved, and warned about, once, by load_model)
            resolve_dtype(cfg.dtype, dev)
        if cfg.adapter:
            check_adapter(cfg.adapter)
    # Validate everything cheap before the model loads: prompts, label words, data.
    datasets, issues = {}, []
    for task in tasks:
        for lang in langs:
            for m in modes:
                task.label_words(lang, m)
            task.demo_prefix(lang, modes[0])
        loaded = load_data(task, langs, cfg.data, cfg.limit, cfg.trust_file_labels)
        for lang, items in loaded.items.items():
            ids = [it["id"] for it in items]
            if len(set(ids)) != len(ids):
                twice = next(i for i in ids if ids.count(i) > 1)
                raise PolyalignError(f"{task.name}/{lang}: item ids are not unique ({twice!r} appears twice)")
        datasets[task.name] = loaded.items
        issues += loaded.issues
    for line in issues:
        log.warning("data: %s", line) if rank == 0 else None

    output = Path(cfg.output) if cfg.output is not None else None
    settings = {"model": cfg.model, "adapter": cfg.adapter, "dtype": cfg.dtype, "scoring": cfg.scoring,
                "data": cfg.data, "limit": cfg.limit, "max_length": cfg.max_length,
                "trust_file_labels": cfg.trust_file_labels,
                # whether sample lines carry calibrated scores (every method, whichever was asked for)
                "calibrated": cfg.calibration != "none"}
    settings.update({f"task:{t.name}": content_hash(Path(t.path).read_text("utf-8")) for t in tasks})
    if cfg.batch_tokens is not None:   # the default budget is known once the device is (below)
        settings["batch_tokens"] = cfg.batch_tokens
    if output is not None and lm is not None:
        # A name says nothing about weights changed in memory: the folder keeps theirs too.
        from polyalign.models import weights_fingerprint
        settings.update({"adapter": lm.adapter, "weights": weights_fingerprint(lm.model)})
    # Every process checks (so that none waits forever for a rank that failed); the settings are
    # recorded only once the model has loaded, so that a typo in --model does not claim the folder.
    if output is not None:
        check_fingerprint(output, "run.json", settings, record=False)

    if lm is None:
        from polyalign.models import load_model
        lm = load_model(cfg.model, cfg.dtype, device, cfg.adapter, progress=cfg.progress and rank == 0)
    was_training = lm.model.training
    lm.model.eval()          # dropout off while scoring; a loaded model gets its mode back below
    try:
        return _score(cfg, lm, tasks, modes, langs, datasets, issues, settings, output, rank, world, state)
    finally:
        lm.model.train(was_training)


def _score(cfg, lm, tasks, modes, langs, datasets, issues, settings, output, rank, world, state) -> EvalResult | None:
    """The scoring loop of `evaluate`, once the inputs are checked and the model is there."""
    from polyalign.evaluation.scoring import Scorer, decide

    scorer = Scorer(lm.model, lm.tokenizer, cfg.scoring, cfg.batch_tokens, cfg.max_length)
    # Options that change scores in the last bits, as resolved: the batch budget (an item's matmuls
    # see its batch's rows; see README), and the device and dtype that `auto` chose.
    settings.update({"batch_tokens": scorer.runner.token_budget, "device": lm.device.type,
                     "torch_dtype": str(lm.dtype).replace("torch.", "")})
    if output is not None:
        check_fingerprint(output, "run.json", settings, record=False)
        if rank == 0:
            check_fingerprint(output, "run.json", settings)
            rescored = _forget_changed_data(output, datasets)
            issues += rescored
            for line in rescored:
                log.warning("data: %s", line)
        store = _FolderSamples(output, rank, world)
    else:
        store = _MemorySamples(world)
    if state:
        state.wait_for_everyone()
    machine = {**hardware.describe(lm.device), **scorer.runner.fast_paths()}
    planned = {(t.name, m, lang) for t in tasks for m in modes for lang in langs}
    shared = None
    if cfg.geometry_states is not None:
        if world > 1:   # each process runs a share of the batches: no language would be complete anywhere
            log.info("geometry states: not shared under several processes")
        else:
            from polyalign.analysis.geometry import SharedStates
            shared = SharedStates(cfg.geometry_states, cfg.model, cfg.adapter, lm.dtype, cfg.max_length)
            if shared.problem:
                log.info("geometry states: not shared (%s)", shared.problem)
    others = _other_rows(output, planned, cfg.scoring) if rank == 0 and output is not None else []

    from tqdm.auto import tqdm
    plan = [(t, m, lang) for t in tasks for m in modes for lang in langs]
    total = sum(len(datasets[t.name][lang]) for t, _, lang in plan)
    bar = tqdm(total=total, desc="evaluate", unit="item", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    rows, overlaps, samples = [], [], []
    scored_items = scored_tokens = 0
    scoring_seconds = 0.0
    for task, mode, lang in plan:
        items = datasets[task.name][lang]
        ids = [it["id"] for it in items]
        done = store.done(task.name, mode, lang)
        bar.set_postfix_str(f"{task.name}/{mode}/{lang}")
        bar.update(sum(1 for i in ids if i in done))
        refs = None
        if len(done) < len(items):
            started = time.perf_counter()
            group = scorer.prepare(task, lang, mode, items)
            overlaps += [f"{task.name}/{mode}/{lang}: {d}" for d in group.plan.describe_overlaps(lm.tokenizer)]
            words = group.plan.words
            refs = (calibration.load_or_compute(scorer, group, output, write=rank == 0)
                    if cfg.calibration != "none" else None)
            collector = shared.collector(task, mode, lang, group) if shared is not None else None
            for b_index, batch in enumerate(scorer.batches(group)):
                if b_index % world != rank:
                    continue
                todo = [i for i in batch if group.items[i].item["id"] not in done]
                if not todo:
                    continue
                # The whole batch is recomputed so that its numbers are identical to an uninterrupted run.
                results = scorer.score(group, batch, collector)
                records = []
                for i, res in zip(batch, results):
                    p = group.items[i]
                    if p.item["id"] in done:
                        continue
                    where = f"{task.name}/{mode}/{lang} item {p.item['id']!r}"
                    pred, tied = decide(res["scores"], where)
                    rec = {"id": p.item["id"], "task": task.name, "lang": lang, "labels": mode,
                           "prompt": p.text, "choices": words, "scores": res["scores"],
                           "pred": task.classes[pred], "gold": p.item["label"],
                           "correct": task.classes[pred] == p.item["label"], "tied": tied,
                           "truncated": p.truncated}
                    if "scores_per_byte" in res:
                        rec["scores_per_byte"] = res["scores_per_byte"]
                        rec["pred_byte"] = task.classes[decide(res["scores_per_byte"], where)[0]]
                    if refs is not None:
                        rec.update(calibration.calibrated_fields(res["scores"], refs, task.classes, cfg.scoring,
                                                                 where))
                    records.append(rec)
                    scored_tokens += len(scorer.rows(group, p)[0])
                store.append(task.name, mode, lang, records)
                scored_items += len(records)
                bar.update(len(records) * world)
            if collector is not None:
                collector.save()
            scoring_seconds += time.perf_counter() - started
        if state:
            state.wait_for_everyone()
        ordered = store.merge(task.name, mode, lang, ids)
        if rank == 0:
            samples += ordered
            rows.append(summarize(ordered, task.name, lang, mode, cfg.scoring))
            if cfg.calibration != "none":   # issue 12: the group's p_cf and p(c | cue)
                rows[-1]["p_ref"] = calibration.group_references(refs, output, task.name, mode, lang)
            log.info("%-16s %-8s %-3s acc %.3f  (n=%d)", task.name, mode, lang, rows[-1]["acc"], rows[-1]["n"])
            if output is not None:
                _write_results(output, cfg, lm, machine, _in_order(rows + others, tasks, modes, langs), issues,
                               overlaps, scoring_seconds, scored_items, scored_tokens)
        if state:
            state.wait_for_everyone()
    bar.close()
    if rank != 0:
        return None
    results = _write_results(output, cfg, lm, machine, _in_order(rows + others, tasks, modes, langs),
                             issues, overlaps, scoring_seconds, scored_items, scored_tokens)
    log.info("%s", format_table(rows))
    for a in results["averages"]:
        log.info("average %s/%s over %s (%d langs): %.3f", a["task"], a["labels"], a["langs"], a["n_langs"], a["acc"])
    if output is not None:
        log.info("results: %s", output / "results.json")
    return EvalResult.from_dict(results, samples, output)


def _forget_changed_data(output: Path, datasets: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Drop the samples of every (task, language) whose items changed since the folder scored them.

    The folder's run.json keeps a hash of each (task, language)'s loaded items (after --limit):
    the data path alone does not show a fixed gold label or an edited text. A changed language is
    scored again as a whole, in every label mode, rather than only its changed items: batches are
    planned over all of a language's items and an item's scores depend on its batch in the last bits,
    so only a whole rescore gives the files a fresh run on the new data writes. The samples go
    before the new hash is recorded, so a kill in between leaves a folder that rescores again."""
    path = output / "run.json"
    record = json.loads(path.read_text("utf-8"))
    old = record.get("data_items") or {}
    new = {f"{task}/{lang}": content_hash(items) for task, per_lang in datasets.items()
           for lang, items in per_lang.items()}
    changed = sorted(k for k in new if k in old and old[k] != new[k])
    for key in changed:
        task, lang = key.split("/")
        for f in (output / "samples" / task).glob(f"*/{lang}.jsonl"):
            f.unlink()
        for f in (output / "samples" / task).glob(f"*/{lang}.rank*.jsonl"):
            f.unlink()
    if {**old, **new} != old:
        write_json(path, {**record, "data_items": {**old, **new}})
    return [f"{key}: the items differ from those this folder scored; scoring them again" for key in changed]


def _other_rows(output: Path, planned: set, rule: str) -> list[dict]:
    """Rows for the samples in the folder that this run does not evaluate (other languages, tasks or
    label modes scored earlier), so that results.json describes every sample in the folder."""
    rows = []
    groups = sorted({(f.parent.parent.name, f.parent.name, f.name.split(".")[0])
                     for f in (output / "samples").glob("*/*/*.jsonl")})
    for task, mode, lang in groups:
        if (task, mode, lang) in planned:
            continue
        path = sample_path(output, task, mode, lang)
        merged = {s["id"]: s for s in read_jsonl(path)}
        for part in path.parent.glob(f"{lang}.rank*.jsonl"):   # a killed multi-process run's shares
            merged.update({s["id"]: s for s in read_jsonl(part)})
        if merged:
            rows.append(summarize(list(merged.values()), task, lang, mode, rule))
    return rows


def _in_order(rows: list[dict], tasks: list[Task], modes: list[str], langs: list[str]) -> list[dict]:
    """This run's order (tasks x modes x languages), the folder's other rows fitted in after theirs."""
    t_order = [t.name for t in tasks] + sorted({r["task"] for r in rows} - {t.name for t in tasks})
    m_order = list(dict.fromkeys([*modes, *LABEL_MODES, *sorted({r["labels"] for r in rows})]))
    l_order = list(dict.fromkeys([*langs, *languages.ALL, *sorted({r["lang"] for r in rows})]))
    return sorted(rows, key=lambda r: (t_order.index(r["task"]), m_order.index(r["labels"]),
                                       l_order.index(r["lang"])))


def _write_results(output, cfg, lm, machine, rows, issues, overlaps, seconds, items, tokens) -> dict:
    """results.json's content; written (atomically) when there is an output folder."""
    results = {
        "rows": rows,
        "averages": averages(rows),
        "model": {"name": cfg.model, "adapter": lm.adapter, "dtype": str(lm.dtype).replace("torch.", ""),
                  "device": str(lm.device)},
        "config": {k: v for k, v in vars(cfg).items() if k not in ("progress", "extra", "geometry_states")},
        "versions": versions(),
        "machine": machine,          # CPU capability and fast paths: why two machines' digits may differ
        "git": git_hash(),
        "timing": {"model_load_s": round(lm.load_seconds, 3), "scoring_s": round(seconds, 3),
                   "items_scored": items, "items_per_s": round(items / seconds, 3) if seconds else None,
                   "tokens_per_s": round(tokens / seconds, 1) if seconds else None},
        "data_issues": issues,
        "label_overlaps": overlaps,
    }
    if output is not None:
        write_json(output / "results.json", results)
    return results
