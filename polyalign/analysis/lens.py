"""`polyalign lens`: the logit lens at the answer position, per layer, per language (Wendler et al. 2024).

For every layer l = 0 (the embeddings) .. L (the last decoder layer), the residual stream at the
answer position goes through the model's own final norm and unembedding (Gemma's logit softcap
included), then a softmax. Per sample and layer we record the probability of the gold answer in
the target language, of its English twin, of all target-language answers, of all English answers
(each the summed probability of the evaluator's `paper` token sets), and the entropy in bits.

Layer L is read from the decoder's `last_hidden_state`, which is exactly what the model's head
sees, so it is never normalised twice (transformers already returns hidden_states[-1] normalised
for Llama, Qwen2, Mistral and Gemma3); layers 0..L-1 get the final norm applied here.

Only the answer position is unembedded; the demos' KV cache is computed once per language
(`runner.PrefixRunner`), and items run batched and sorted by length.

Outputs in --output: lens.csv, samples.npz, excluded.csv, lens_<lang>.png, lens_overlay.png (two
or more models), summary.json, and parts/<model>/<lang>.npz: each (model, language) saved as soon as
it is done under a hash of what determines it, so a killed or repeated run computes only what is
missing (--recompute ignores them). What lens shares with geometry is in analysis/common.py.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from polyalign import config as C
from polyalign import languages
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.analysis.common import SummaryView, models_to_analyse
from polyalign.analysis.common import (CSV_FLOATS, AnalysedModel, adapter_option, analysis_task_option, cache_key,
                                       check_mode, compare_adapter_option, load_items, prompt_texts,
                                       release_memory, write_npz)
from polyalign.analysis.tuned_lens import LENS_KINDS, check_lens_kind, lens_views, tuned_states
from polyalign.store import content_hash, write_csv, write_json
from polyalign.engine.prompts import PromptSet, batch_groups, check_lengths, prepare_prompts
from polyalign.tasks import LABEL_MODES, Task, load_task

log = logging.getLogger(__name__)

MEASURES = ("target_answer", "english_answer", "target_all", "english_all", "entropy_bits")
LN2 = math.log(2.0)
LATENT_MIN = 0.05   # the English answer must carry at least this mean mass to count as latent English
PART_VERSION = 1    # bump when the per-language arrays change meaning


@dataclass
class LensSets:
    """The `paper` token sets of one language: per class, in the target language and in English."""
    classes: list[str]
    target_words: list[str]
    english_words: list[str]
    target: list[list[int]]
    english: list[list[int]]
    target_all: list[int]
    english_all: list[int]

    @property
    def overlap(self) -> list[bool]:
        """Per class: a sample of this class cannot be read (its two sets intersect, or one is empty)."""
        return [not t or not e or bool(set(t) & set(e)) for t, e in zip(self.target, self.english)]

    def columns(self) -> list[list[int]]:
        """The sets in the order of the lens' output columns: C target, C English, all target, all English."""
        return [*self.target, *self.english, self.target_all, self.english_all]


def lens_sets(tokenizer, task: Task, lang: str) -> LensSets:
    """Target = the language's native label words; English = the task's English label words."""
    from polyalign.labels import paper_token_set
    native, english = task.label_words(lang, "native"), task.label_words(lang, "english")
    if not native:
        raise PolyalignError(f"task {task.name!r} has no native label words for {lang!r}")
    tw = [native[c] for c in task.classes]
    ew = [english[c] for c in task.classes]
    target = [paper_token_set(tokenizer, w) for w in tw]
    eng = [paper_token_set(tokenizer, w) for w in ew]
    union = lambda sets: sorted(set().union(*map(set, sets)))  # noqa: E731
    return LensSets(list(task.classes), tw, ew, target, eng, union(target), union(eng))


# ============================================================================= lens: core
@torch.inference_mode()
def answer_states(model, hidden_states, last_hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The final-normed residual at `pos` of every row, per layer: [B, L+1, H], ready for `unembed`.

    hidden_states[0..L-1] get the model's final norm here; layer L is taken from the decoder's
    last_hidden_state (already normed: what the head really sees)."""
    from polyalign.engine.model_parts import final_norm
    rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
    n_layers = len(hidden_states) - 1
    inner = torch.stack([hidden_states[layer][rows, pos] for layer in range(n_layers)], 1)
    inner = final_norm(model)(inner)
    return torch.cat([inner.to(last_hidden.dtype), last_hidden[rows, pos].unsqueeze(1)], 1)


@torch.inference_mode()
def lens_measures(model, states: torch.Tensor, columns: list[list[int]], chunk_rows: int | None = None):
    """states [B, K, H] -> (set probabilities [B, K, S] for the S `columns`, entropy in bits [B, K]).
    The vocabulary is projected in chunks of rows, to bound memory with 256k-token vocabularies."""
    from polyalign.engine.model_parts import head_logits, head_to_fp32, unwrap
    b, k, h = states.shape
    flat = states.reshape(b * k, h)
    idx = [torch.tensor(c, dtype=torch.long, device=states.device) for c in columns]
    sums, ents = [], []
    if chunk_rows is None:
        vocab = unwrap(model).get_output_embeddings().weight.shape[0]
        chunk_rows = max(8, (1 << 25) // vocab)
    for part in flat.split(chunk_rows):
        # The fp32 passes run on a few rows at a time, so that they stay in the CPU's cache (the
        # matmul wants many rows, to read the 262k-row head once per chunk): 1.6 s -> 0.5 s here.
        for raw in head_logits(model, part).split(8):
            logp = torch.log_softmax(head_to_fp32(model, raw), dim=-1)
            p = logp.exp()
            sums.append(torch.stack([p[:, i].sum(-1) if len(i) else p.new_zeros(len(p)) for i in idx], -1))
            ents.append(-p.mul_(logp).sum(-1) / LN2)     # p is not needed after this
    return torch.cat(sums).reshape(b, k, len(columns)), torch.cat(ents).reshape(b, k)


@torch.inference_mode()
def run_group(model, runner, ps: PromptSet, sets: LensSets, bar=None, translators=None) -> dict[str, np.ndarray]:
    """The lens over one language's prompts -> per-sample arrays (all samples, excluded ones too).
    With `translators` (analysis.tuned_lens), the tuned lens instead of the logit lens."""
    columns = sets.columns()
    n, c = len(ps.prompts), len(sets.classes)
    out_sets = out_ent = None
    for group in batch_groups(runner, ps.prompts):
        prefix = runner.prefix(ps.prefix_ids[:group[0].cached_len])
        suffixes = [p.suffix for p in group]
        last_hidden, hidden = runner.forward(prefix, suffixes, hidden_states=True)
        pos = torch.tensor([len(s) - 1 for s in suffixes], device=last_hidden.device)
        if translators is None:
            states = answer_states(model, hidden, last_hidden, pos)
        else:  # issue 13: the tuned lens
            states = tuned_states(model, translators, hidden, last_hidden,
                                  torch.arange(len(suffixes), device=pos.device), pos)
        probs, ent = lens_measures(model, states, columns)
        if out_sets is None:
            out_sets = np.full((n, states.shape[1], len(columns)), np.nan, dtype=np.float64)
            out_ent = np.full((n, states.shape[1]), np.nan, dtype=np.float64)
        rows = [p.index for p in group]
        out_sets[rows] = probs.double().cpu().numpy()
        out_ent[rows] = ent.double().cpu().numpy()
        if bar is not None:
            bar.update(len(group))
    gold = np.array([sets.classes.index(p.item["label"]) for p in ps.prompts], dtype=np.int64)
    ar = np.arange(n)
    excluded = np.array([sets.overlap[g] for g in gold], dtype=bool)
    return {
        "ids": np.array([str(p.item.get("id", p.index)) for p in ps.prompts]),
        "gold": gold,
        "excluded": excluded,
        "truncated": np.array([p.truncated for p in ps.prompts], dtype=bool),
        "target_answer": out_sets[ar, :, gold],
        "english_answer": out_sets[ar, :, c + gold],
        "target_all": out_sets[:, :, 2 * c],
        "english_all": out_sets[:, :, 2 * c + 1],
        "entropy_bits": out_ent,
        "target_by_class": out_sets[:, :, :c],
        "english_by_class": out_sets[:, :, c:2 * c],
    }


def mean_ci(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column mean and the normal 95% interval mean ± 1.96·sd/√n (sd with ddof=1), as in the paper."""
    n = x.shape[0]
    mean = x.mean(0) if n else np.full(x.shape[1:], np.nan)
    if n < 2:
        nan = np.full(x.shape[1:], np.nan)
        return mean, nan, nan
    half = 1.96 * x.std(0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def save_part(path: Path, key: str, arrays: dict[str, np.ndarray], tokens: dict) -> None:
    write_npz(path, {**arrays, "_key": np.array(key), "_tokens": np.array(json.dumps(tokens, ensure_ascii=False))})


def load_part(path: Path, key: str) -> tuple[dict, dict] | None:
    """The arrays and token sets saved for `key`, or None (missing, stale or unreadable)."""
    try:
        with np.load(path) as z:
            if str(z["_key"]) != key:
                return None
            return ({k: z[k] for k in z.files if not k.startswith("_")}, json.loads(str(z["_tokens"])))
    except (OSError, ValueError, EOFError, KeyError):
        return None


def summarize_lang(arr: dict[str, np.ndarray], keep_overlapping: bool = False) -> dict:
    """Means and CIs over the readable samples: {measure: (mean, lo, hi)}, n."""
    keep = np.ones_like(arr["excluded"]) if keep_overlapping else ~arr["excluded"]
    out = {"n": int(keep.sum())}
    for m in MEASURES:
        out[m] = mean_ci(arr[m][keep])
    return out


def latent_reading(stats: dict) -> dict:
    """What the curves say: where English peaks, and whether it leads the target language mid-way."""
    if stats["n"] == 0:
        return {"n": 0}
    t, e = stats["target_answer"], stats["english_answer"]
    last = len(t[0]) - 1
    mid = range(1, last)
    peak = max(mid, key=lambda i: e[0][i]) if last > 1 else last
    lead = [i for i in mid if e[0][i] > t[0][i]]
    sig = [i for i in mid if np.isfinite(e[1][i]) and e[1][i] > t[2][i] and e[0][i] >= LATENT_MIN]
    return {"n": stats["n"], "final_target_answer": float(t[0][last]), "final_english_answer": float(e[0][last]),
            "peak_english_layer": int(peak), "peak_english_answer": float(e[0][peak]),
            "target_answer_at_peak": float(t[0][peak]), "english_leads_layers": lead,
            "latent_english": bool(sig), "english_significantly_leads_layers": sig,
            "final_entropy_bits": float(stats["entropy_bits"][0][last])}


# ============================================================================= command
@dataclass
class LensConfig:
    """The options of `polyalign lens` (the CLI, experiment files and Python read them from here)."""
    model: str = C.model_option()
    adapter: str | None = adapter_option()
    compare_adapter: list[str] = compare_adapter_option()
    task: str = analysis_task_option()
    langs: str = option("zh,ja,ru", help="'all', 'high', 'low' or a comma list")
    labels: str = option("native", choices=LABEL_MODES,
                         help="label words in the demos (the paper's lens uses native); the target answer is "
                              "always the native word, the English twin the English word")
    output: str = option("runs/lens", help="output folder")
    data: str | None = C.data_option()
    limit: int | None = C.limit_option()
    dtype: str = C.dtype_option()
    device: str = C.device_option()
    batch_tokens: int | None = C.batch_tokens_option()
    max_length: int | None = C.max_length_option()
    keep_overlapping: bool = option(False, help="keep samples whose English and target token sets overlap "
                                                "(counted either way)")
    trust_file_labels: bool = C.trust_file_labels_option()
    recompute: bool = option(False, help="ignore the per-language results a previous run left in --output/parts")
    progress: bool = C.progress_option()
    # issue 13: the tuned lens
    lens: str = option("logit", choices=LENS_KINDS,
                       help="logit, tuned (needs --tuned-lens) or both (the two side by side)")
    tuned_lens: str | None = option(None, metavar="DIR", help="a lens trained by `polyalign tune-lens`")


@dataclass
class LensResult(SummaryView):
    """What `run_lens` found. `summary` is summary.json's content (the result also reads like it:
    `result["reading"]`); `stats[model][lang]` holds n and, per measure, the (mean, ci_low, ci_high)
    arrays over layers; `samples[model][lang]` the per-sample arrays of samples.npz; `rows` the
    lines of lens.csv. `figure()` draws the curves as a matplotlib Figure (no pyplot)."""
    summary: dict
    stats: dict
    samples: dict
    rows: list[dict]
    models: list[str]
    langs: list[str]
    output: Path | None = None

    def figure(self, lang: str | None = None):
        """One language's Wendler-style panels (entropy strip, probability curves with 95% CI bands),
        or with lang=None the target and English answer curves of every language side by side."""
        specs = [AnalysedModel(label, "", None) for label in self.models]
        if lang is None:
            return overlay_figure(self.langs, specs, self.stats)
        if lang not in self.langs:
            raise PolyalignError(f"no lens results for {lang!r}; this result holds {', '.join(self.langs)}")
        return lang_figure(lang, specs, self.stats)

    def to_pandas(self):
        """The rows of lens.csv as a pandas DataFrame (pandas is not a dependency)."""
        try:
            import pandas as pd
        except ImportError:
            raise PolyalignError("to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows)



def run_lens(cfg: LensConfig, *, model=None, tokenizer=None) -> LensResult:
    """The lens of `cfg.model` (with cfg.adapter, and each of cfg.compare_adapter), or of the loaded
    `model` with its `tokenizer`. With `cfg.output` None nothing is written (no parts to resume from)."""
    from tqdm.auto import tqdm

    from polyalign.models import load_model
    from polyalign.engine.runner import PrefixRunner
    from polyalign.engine.model_parts import max_context

    started = time.time()
    task = load_task(cfg.task)
    langs = languages.parse_langs(cfg.langs)
    check_mode(cfg.labels)
    check_lengths(cfg.batch_tokens, cfg.max_length)
    check_lens_kind(cfg.lens, cfg.tuned_lens)
    for lang in langs:  # cheap checks before any model loads
        task.demo_prefix(lang, cfg.labels)
        task.label_words(lang, "native")
        task.label_words(lang, "english")
    cfg, specs, preloaded = models_to_analyse(cfg, model, tokenizer)
    specs, tuned = lens_views(specs, cfg.lens, cfg.tuned_lens)   # with the tuned lens: <model>-tuned views
    items, issues = load_items(task, langs, cfg.data, cfg.limit, cfg.trust_file_labels)
    for line in issues:
        log.warning("data: %s", line)
    output = Path(cfg.output) if cfg.output is not None else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)

    # Each (model, language) is kept in parts/<model>/<lang>.npz under a hash of everything that
    # determines it: a killed or repeated run computes only what is missing.
    task_hash = content_hash(Path(task.path).read_text("utf-8"))
    weights = {}
    if preloaded is not None and output is not None:   # a name says nothing about weights changed in memory
        from polyalign.models import weights_fingerprint
        weights = {"loaded_weights": weights_fingerprint(preloaded.model), "torch_dtype": str(preloaded.dtype)}
    results: dict[str, dict[str, dict]] = {s.label: {} for s in specs}     # label -> lang -> arrays
    set_info: dict[str, dict[str, dict]] = {s.label: {} for s in specs}
    todo: dict[AnalysedModel, list] = {}
    for spec in specs:
        for lang in langs:
            key = path = got = None
            if output is not None:
                key = cache_key(spec, cfg, task_hash, lang, prompt_texts(task, lang, cfg.labels, items[lang]),
                                v=PART_VERSION, gold=[it["label"] for it in items[lang]], **weights,
                                **({"tuned_lens": tuned[spec.label].fingerprint} if spec.label in tuned else {}))
                path = output / "parts" / spec.label / f"{lang}.npz"
                got = None if cfg.recompute else load_part(path, key)
            if got is not None:
                results[spec.label][lang], set_info[spec.label][lang] = got
            else:
                todo.setdefault(spec, []).append((lang, key, path))
    total = sum(len(items[lang]) for spec_todo in todo.values() for lang, _, _ in spec_todo)
    bar = tqdm(total=total, desc="lens", unit="item", disable=not cfg.progress or not total, dynamic_ncols=True)
    model_info = []
    lm = None
    for spec in specs:
        info = {"label": spec.label, "model": spec.model, "adapter": spec.adapter,
                "cached_langs": sorted(results[spec.label])}
        if spec.label in tuned:
            info["lens"], info["tuned_lens"] = "tuned", tuned[spec.label].folder
        if spec in todo:
            if preloaded is not None:
                lm = preloaded
            elif lm is None or (lm.name, lm.adapter) != (spec.model, spec.adapter):  # logit and tuned views share a load
                lm = runner = None
                release_memory()
                lm = load_model(spec.model, cfg.dtype, cfg.device, spec.adapter, progress=cfg.progress)
            was_training = lm.model.training
            lm.model.eval()
            runner = PrefixRunner(lm.model, lm.tokenizer, cfg.batch_tokens)
            translators = tuned[spec.label].load(lm.model) if spec.label in tuned else None
            limit = min(cfg.max_length or 1 << 30, max_context(lm.model, lm.tokenizer))
            t0 = time.perf_counter()
            try:
                for lang, key, path in todo[spec]:
                    bar.set_postfix_str(f"{spec.label}/{lang}")
                    sets = lens_sets(lm.tokenizer, task, lang)
                    ps = prepare_prompts(lm.tokenizer, task, lang, cfg.labels, items[lang], limit)
                    arrays = run_group(lm.model, runner, ps, sets, bar, translators)
                    tokens = {"target_words": sets.target_words, "english_words": sets.english_words,
                              "target_tokens": [lm.tokenizer.convert_ids_to_tokens(t) for t in sets.target],
                              "english_tokens": [lm.tokenizer.convert_ids_to_tokens(t) for t in sets.english],
                              "overlap": sets.overlap}
                    if path is not None:
                        save_part(path, key, arrays, tokens)
                    results[spec.label][lang], set_info[spec.label][lang] = arrays, tokens
            finally:
                lm.model.train(was_training)
            info.update({"dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                         "seconds": round(time.perf_counter() - t0, 3)})
            del runner
        info["layers"] = next(iter(results[spec.label].values()))["entropy_bits"].shape[1] - 1
        model_info.append(info)
    bar.close()
    lm = None
    release_memory()
    return write_lens_outputs(cfg, task, langs, specs, results, set_info, model_info, issues, started)


def write_lens_outputs(cfg, task, langs, specs, results, set_info, model_info, issues, started) -> LensResult:
    """Statistics over the samples, and (with an output folder) the files: CSVs, samples.npz, figures."""
    output = Path(cfg.output) if cfg.output is not None else None
    csv_rows, excl_rows, stats, readings = [], [], {}, {}
    arrays = {}
    for spec in specs:
        stats[spec.label], readings[spec.label] = {}, {}
        for lang in langs:
            arr = results[spec.label][lang]
            for k, v in arr.items():
                arrays[f"{spec.label}/{lang}/{k}"] = v
            for ci, cls in enumerate(task.classes):
                of = arr["gold"] == ci
                excl_rows.append([spec.label, lang, cls, int((arr["excluded"] & of).sum()), int(of.sum())])
            st = summarize_lang(arr, cfg.keep_overlapping)
            stats[spec.label][lang] = st
            readings[spec.label][lang] = latent_reading(st)
            for m in MEASURES:
                mean, lo, hi = st[m]
                for layer in range(len(mean)) if st["n"] else []:
                    csv_rows.append([spec.label, lang, layer, m, mean[layer], lo[layer], hi[layer], st["n"]])
    csv_header = ["model", "lang", "layer", "measure", "mean", "ci_low", "ci_high", "n"]
    if output is not None:
        write_csv(output / "lens.csv", csv_header, csv_rows, CSV_FLOATS)
        write_csv(output / "excluded.csv", ["model", "lang", "class", "n_excluded", "n_total"], excl_rows,
                  CSV_FLOATS)
        write_npz(output / "samples.npz", arrays)
    log.info("%s", format_excluded(excl_rows, cfg.keep_overlapping))

    figures = []
    if output is not None:
        for lang in langs:
            if any(stats[s.label][lang]["n"] for s in specs):
                figures.append(str(plot_lang(output / f"lens_{lang}.png", lang, specs, stats)))
        if len(specs) > 1 and any(stats[s.label][lang]["n"] for s in specs for lang in langs):
            figures.append(str(plot_overlay(output / "lens_overlay.png", langs, specs, stats)))

    summary = {
        "command": "lens",
        "config": asdict(cfg),
        "task": task.name,
        "langs": langs,
        "models": model_info,
        "measures": list(MEASURES),
        "token_sets": set_info,
        "excluded": [dict(zip(["model", "lang", "class", "n_excluded", "n_total"], r)) for r in excl_rows],
        "reading": readings,
        "data_issues": issues,
        "figures": figures,
        "seconds": round(time.time() - started, 3),
        "notes": ("layer 0 = embeddings, layer L = the model's output distribution; CI = mean ± 1.96·sd/√n "
                  "(ddof=1) over readable samples; latent_english = at some intermediate layer the English "
                  f"answer's CI lies wholly above the target answer's and its mean is at least {LATENT_MIN}"),
    }
    if output is not None:
        write_json(output / "summary.json", summary)
    log.info("%s", format_readings(readings))
    if output is not None:
        log.info("lens: %s", output / "lens.csv")
    samples = {s.label: {lang: results[s.label][lang] for lang in langs} for s in specs}
    return LensResult(summary, stats, samples, [dict(zip(csv_header, r)) for r in csv_rows],
                      [s.label for s in specs], list(langs), output)


def format_excluded(rows: list[list], kept: bool) -> str:
    what = "kept anyway (--keep-overlapping)" if kept else "excluded"
    lines = [f"samples whose English and target token sets overlap ({what}):",
             f"  {'model':<16} {'lang':<5} {'class':<14} {'n':>9}"]
    for model, lang, cls, k, n in rows:
        lines.append(f"  {model:<16} {lang:<5} {cls:<14} {k:>4}/{n:<4}")
    return "\n".join(lines)


def format_readings(readings: dict) -> str:
    lines = [f"{'model':<16} {'lang':<5} {'n':>4} {'peak EN layer':>13} {'peak EN p':>9} "
             f"{'final tgt':>9} {'final EN':>8}  latent English"]
    for label, per in readings.items():
        for lang, r in per.items():
            if not r.get("n"):
                lines.append(f"{label:<16} {lang:<5} {0:>4}  (no readable samples)")
                continue
            lines.append(f"{label:<16} {lang:<5} {r['n']:>4} {r['peak_english_layer']:>13} "
                         f"{r['peak_english_answer']:>9.3f} {r['final_target_answer']:>9.3f} "
                         f"{r['final_english_answer']:>8.3f}  {'yes' if r['latent_english'] else 'no'}")
    return "\n".join(lines)


# ============================================================================= plots
def _curves(ax, st: dict, measures=("target_answer", "english_answer", "target_all", "english_all"),
            linestyle=None, label_prefix=""):
    from matplotlib.ticker import MaxNLocator

    from polyalign.reporting.plots import MEASURE_STYLE
    layers = np.arange(len(st["target_answer"][0]))
    for m in measures:
        style = dict(MEASURE_STYLE[m])
        mean, lo, hi = st[m]
        ls = linestyle or style["linestyle"]
        ax.plot(layers, mean, color=style["color"], linestyle=ls, label=label_prefix + style["label"], lw=1.6)
        if np.isfinite(lo).any():
            ax.fill_between(layers, lo, hi, color=style["color"], alpha=0.15, lw=0)
    ax.set_ylim(0, 1)
    ax.set_xlim(0, layers[-1])
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_lang(path: Path, lang: str, specs, stats) -> Path:
    """lang_figure, saved to `path`."""
    from polyalign.reporting import plots
    return plots.save(lang_figure(lang, specs, stats), path)


def lang_figure(lang: str, specs, stats):
    """Wendler-style panel per model: probability curves with 95% CI bands, an entropy strip above (a Figure)."""
    from polyalign.reporting import plots
    shown = [s for s in specs if stats[s.label][lang]["n"]]
    if not shown:
        raise PolyalignError(f"no readable lens samples for {lang!r} to draw")
    with plots.style():
        fig = plots.figure(figsize=(4.6 * len(shown), 4.2))
        gs = fig.add_gridspec(2, len(shown), height_ratios=[1, 7], hspace=0.08)
        vmax = max(float(np.nanmax(stats[s.label][lang]["entropy_bits"][0])) for s in shown)
        for j, s in enumerate(shown):
            st = stats[s.label][lang]
            ax_e = fig.add_subplot(gs[0, j])
            ax = fig.add_subplot(gs[1, j], sharex=ax_e)
            ent = st["entropy_bits"][0][None, :]
            im = ax_e.imshow(ent, aspect="auto", cmap="magma_r", vmin=0, vmax=max(vmax, 1e-6),
                             extent=(-0.5, ent.shape[1] - 0.5, 0, 1))
            ax_e.set_yticks([])
            ax_e.grid(False)
            ax_e.tick_params(labelbottom=False)
            ax_e.set_title(f"{s.label} · {lang} · n={st['n']}")
            _curves(ax, st)
            ax.set_xlim(-0.5, ent.shape[1] - 0.5)
            if j == 0:
                ax.set_ylabel("probability")
                ax.legend(loc="upper left", fontsize=8)
            cb = fig.colorbar(im, ax=ax_e, orientation="vertical", fraction=0.04, pad=0.01)
            cb.set_label("bits", fontsize=7)
            cb.ax.tick_params(labelsize=6)
    return fig


def plot_overlay(path: Path, langs: list[str], specs, stats) -> Path:
    """overlay_figure, saved to `path`."""
    from polyalign.reporting import plots
    return plots.save(overlay_figure(langs, specs, stats), path)


def overlay_figure(langs: list[str], specs, stats):
    """Target and English answer curves of every model, one panel per language (a Figure)."""
    from polyalign.reporting import plots
    shown = [lang for lang in langs if any(stats[s.label][lang]["n"] for s in specs)]
    if not shown:
        raise PolyalignError("no readable lens samples to draw")
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    with plots.style():
        fig = plots.figure(figsize=(3.8 * cols, 3.2 * rows))
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
        for ax, lang in zip(axes.flat, shown):
            for i, s in enumerate(specs):
                st = stats[s.label][lang]
                if st["n"]:
                    _curves(ax, st, ("target_answer", "english_answer"), plots.model_linestyle(i), f"{s.label}: ")
            ax.set_title(lang)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes[0, 0].set_ylabel("probability")
        axes[0, 0].legend(loc="upper left", fontsize=7)
        fig.tight_layout()
    return fig
