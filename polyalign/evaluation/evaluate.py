"""`polyalign evaluate`: few-shot multilingual evaluation with constrained decoding.

Writes <output>/samples/<task>/<labels>/<lang>.jsonl (one line per item, appended batch by batch,
so a killed run loses nothing and a rerun resumes) and <output>/results.json (atomically, after
every finished language). Under `accelerate launch` each process scores a share of the batches
and rank 0 merges them into the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from polyalign import hardware, languages
from polyalign.data import load_data
from polyalign.errors import PolyalignError
from polyalign.engine.prompts import check_lengths
from polyalign.stats import wilson
from polyalign.store import append_lines, check_fingerprint, content_hash, read_jsonl, write_json, write_jsonl
from polyalign.tasks import LABEL_MODES, Task, parse_tasks


@dataclass
class EvalConfig:
    model: str = "gemma-3-270m"
    tasks: str = "amazon_polarity"
    langs: str = "all"
    labels: str = "english"
    scoring: str = "paper"
    output: str = "runs/eval"
    data: str | None = None
    limit: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    adapter: str | None = None
    batch_tokens: int | None = None
    max_length: int | None = None
    trust_file_labels: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m", help="HF id, local folder, or the embedded gemma-3-270m")
    p.add_argument("--tasks", default="amazon_polarity", help="comma list of task names or task YAML paths")
    p.add_argument("--langs", default="all", help="'all', 'high', 'low' or a comma list (en,de,zh)")
    p.add_argument("--labels", default="english", help="label mode(s): english, native, agnostic (comma list)")
    p.add_argument("--scoring", default="paper", choices=["paper", "first-token", "sequence"])
    p.add_argument("--output", default="runs/eval")
    p.add_argument("--data", default=None, help="data source (default: bundled); see README")
    p.add_argument("--limit", type=int, default=None, help="N items per language, balanced, parallel")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder (loaded, not merged)")
    p.add_argument("--batch-tokens", type=int, default=None, help="rows x padded length per forward")
    p.add_argument("--max-length", type=int, default=None, help="cap on prompt tokens (default: model context)")
    p.add_argument("--trust-file-labels", action="store_true",
                   help="paper-release data: take each file's own gold words instead of the parallel English ones")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(args: argparse.Namespace) -> None:
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in EvalConfig.__dataclass_fields__})
    evaluate(cfg)


# ----------------------------------------------------------------------------- helpers
def _dist(device: str = "auto"):
    """(rank, world, state) — accelerate's state only when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        from accelerate import PartialState
        # Without cpu=True accelerate ignores a CPU-only torchrun / accelerate launch and every process
        # would believe it is the only one (each scoring everything into the same files).
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        if state.num_processes != world:
            raise PolyalignError(f"launched with WORLD_SIZE={world} but accelerate set up {state.num_processes} "
                                 f"process(es) ({state.distributed_type}); check the launcher and --device")
        return state.process_index, state.num_processes, state
    return 0, 1, None


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
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the job
def evaluate(cfg: EvalConfig, preloaded=None) -> dict:
    """`preloaded`: an already loaded model (polyalign.models.LoadedModel) to evaluate instead of loading
    cfg.model (neurons --deactivate evaluates one model under several hooks)."""
    from polyalign.evaluation.scoring import Scorer, decide

    rank, world, state = _dist(cfg.device)
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
    check_lengths(cfg.batch_tokens, cfg.max_length)
    from polyalign.models import check_adapter, resolve_device, resolve_dtype
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
        print(f"data: {line}", file=sys.stderr) if rank == 0 else None

    output = Path(cfg.output)
    settings = {"model": cfg.model, "adapter": cfg.adapter, "dtype": cfg.dtype, "scoring": cfg.scoring,
                "data": cfg.data, "limit": cfg.limit, "max_length": cfg.max_length,
                "trust_file_labels": cfg.trust_file_labels}
    settings.update({f"task:{t.name}": content_hash(Path(t.path).read_text("utf-8")) for t in tasks})
    if cfg.batch_tokens is not None:   # the default budget is known once the device is (below)
        settings["batch_tokens"] = cfg.batch_tokens
    # Every process checks (so that none waits forever for a rank that failed); the settings are
    # recorded only once the model has loaded, so that a typo in --model does not claim the folder.
    check_fingerprint(output, "run.json", settings, record=False)

    from polyalign.models import load_model
    lm = preloaded if preloaded is not None else load_model(cfg.model, cfg.dtype, device, cfg.adapter,
                                                            progress=cfg.progress and rank == 0)
    scorer = Scorer(lm.model, lm.tokenizer, cfg.scoring, cfg.batch_tokens, cfg.max_length)
    # Options that change scores in the last bits, as resolved: the batch budget (an item's matmuls
    # see its batch's rows; see README), and the device and dtype that `auto` chose.
    settings.update({"batch_tokens": scorer.runner.token_budget, "device": lm.device.type,
                     "torch_dtype": str(lm.dtype).replace("torch.", "")})
    check_fingerprint(output, "run.json", settings, record=False)
    if rank == 0:
        check_fingerprint(output, "run.json", settings)
        rescored = _forget_changed_data(output, datasets)
        issues += rescored
        for line in rescored:
            print(f"data: {line}", file=sys.stderr)
    if state:
        state.wait_for_everyone()
    machine = {**hardware.describe(lm.device), **scorer.runner.fast_paths()}
    planned = {(t.name, m, lang) for t in tasks for m in modes for lang in langs}
    others = _other_rows(output, planned, cfg.scoring) if rank == 0 else []

    from tqdm.auto import tqdm
    plan = [(t, m, lang) for t in tasks for m in modes for lang in langs]
    total = sum(len(datasets[t.name][lang]) for t, _, lang in plan)
    bar = tqdm(total=total, desc="evaluate", unit="item", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    rows, overlaps = [], []
    scored_items = scored_tokens = 0
    scoring_seconds = 0.0
    for task, mode, lang in plan:
        items = datasets[task.name][lang]
        ids = [it["id"] for it in items]
        path = sample_path(output, task.name, mode, lang)
        mine = path if world == 1 else path.with_name(f"{lang}.rank{rank}.jsonl")
        done = {s["id"] for s in read_jsonl(path, repair=world == 1)}
        for part in path.parent.glob(f"{lang}.rank*.jsonl"):
            done |= {s["id"] for s in read_jsonl(part, repair=part == mine)}
        bar.set_postfix_str(f"{task.name}/{mode}/{lang}")
        bar.update(sum(1 for i in ids if i in done))
        if len(done) < len(items):
            started = time.perf_counter()
            group = scorer.prepare(task, lang, mode, items)
            overlaps += [f"{task.name}/{mode}/{lang}: {d}" for d in group.plan.describe_overlaps(lm.tokenizer)]
            words = group.plan.words
            for b_index, batch in enumerate(scorer.batches(group)):
                if b_index % world != rank:
                    continue
                todo = [i for i in batch if group.items[i].item["id"] not in done]
                if not todo:
                    continue
                # The whole batch is recomputed so that its numbers are identical to an uninterrupted run.
                results = scorer.score(group, batch)
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
                    records.append(rec)
                    scored_tokens += len(scorer.rows(group, p)[0])
                append_lines(mine, records)
                scored_items += len(records)
                bar.update(len(records) * world)
            scoring_seconds += time.perf_counter() - started
        if state:
            state.wait_for_everyone()
        if rank == 0:
            merged = {s["id"]: s for s in read_jsonl(path)}
            parts = list(path.parent.glob(f"{lang}.rank*.jsonl"))
            for part in parts:
                merged.update({s["id"]: s for s in read_jsonl(part)})
            ordered = [merged[i] for i in ids if i in merged]
            if parts or [s["id"] for s in read_jsonl(path)] != [s["id"] for s in ordered]:
                write_jsonl(path, ordered)  # canonical file order, identical whatever the resume history
                for part in parts:
                    part.unlink()
            rows.append(summarize(ordered, task.name, lang, mode, cfg.scoring))
            bar.write(f"{task.name:<16} {mode:<8} {lang:<3} acc {rows[-1]['acc']:.3f}  (n={rows[-1]['n']})")
            _write_results(output, cfg, lm, machine, _in_order(rows + others, tasks, modes, langs), issues,
                           overlaps, scoring_seconds, scored_items, scored_tokens)
        if state:
            state.wait_for_everyone()
    bar.close()
    results = None
    if rank == 0:
        results = _write_results(output, cfg, lm, machine, _in_order(rows + others, tasks, modes, langs),
                                 issues, overlaps, scoring_seconds, scored_items, scored_tokens)
        print(format_table(rows))
        for a in results["averages"]:
            print(f"average {a['task']}/{a['labels']} over {a['langs']} ({a['n_langs']} langs): {a['acc']:.3f}")
        print(f"results: {output / 'results.json'}")
    return results


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
    results = {
        "rows": rows,
        "averages": averages(rows),
        "model": {"name": cfg.model, "adapter": cfg.adapter, "dtype": str(lm.dtype).replace("torch.", ""),
                  "device": str(lm.device)},
        "config": {k: v for k, v in vars(cfg).items() if k not in ("progress", "extra")},
        "versions": versions(),
        "machine": machine,          # CPU capability and fast paths: why two machines' digits may differ
        "git": git_hash(),
        "timing": {"model_load_s": round(lm.load_seconds, 3), "scoring_s": round(seconds, 3),
                   "items_scored": items, "items_per_s": round(items / seconds, 3) if seconds else None,
                   "tokens_per_s": round(tokens / seconds, 1) if seconds else None},
        "data_issues": issues,
        "label_overlaps": overlaps,
    }
    write_json(output / "results.json", results)
    return results
