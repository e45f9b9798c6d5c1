"""`polyalign neurons`: language-specific FFN neurons (LAPE, Tang et al. 2024), before and after alignment.

1. Activation probabilities: for every FFN neuron of every layer, the share of a language's tokens on
   which its activation is positive (analysis/activations.py), over up to --tokens-per-language
   tokens of that language's text (the bundled task sets and question pool by default).
2. LAPE selection (`lape_select`), as Tang et al.'s released code does it:
   - normalise each neuron's probabilities across languages and take their entropy;
   - drop neurons none of whose probabilities exceeds the --filter-percentile (95th) of all
     probabilities;
   - keep the --top-rate (1%) of all neurons with the lowest entropy;
   - assign each kept neuron to every language whose probability exceeds the
     --activation-percentile (95th) of all probabilities.
3. Outputs: per-layer counts per language, Jaccard overlaps between languages (per layer and
   overall), the neuron lists (neurons.json), the probabilities (probabilities.npz), plots; with
   --compare-adapter, each language's set base vs trained, summarised for seen / unseen and high- /
   low-resource languages; with --deactivate, the evaluator's accuracy with each language's neurons
   zeroed (and, as a control, as many random neurons per layer), minus the accuracy without.

Each (model, language)'s counts are saved in parts/<model>/<lang>.npz under a hash of what
determines them, so a killed run resumes per language; every output is a function of those parts
(no timings), so a resumed run writes byte-identical files. Each deactivation is evaluated into a
folder of its own (deactivate/<what>-<hash of the neurons>/), with a fresh evaluator, so no prefix
cache is shared between deactivations, and a killed evaluation resumes as `evaluate` does.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from pathlib import Path

import numpy as np

from polyalign import config as C
from polyalign import languages
from polyalign.analysis.common import CSV_FLOATS, SummaryView, adapter_option, compare_adapter_option, models_to_analyse
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.store import atomic_path, content_hash, write_csv, write_json
from polyalign.tasks import LABEL_MODES

log = logging.getLogger(__name__)

PART_VERSION = 1
MIN_SHARE = 0.10        # a language needs at least this share of the token budget


# ============================================================================= LAPE
def kth_value(values: np.ndarray, percentile: float) -> float:
    """The k-th smallest value, k = round(n * percentile / 100) (at least 1), as torch.kthvalue in
    Tang et al.'s code (Python's round, so ties go to even)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    k = min(max(1, round(len(flat) * percentile / 100)), len(flat))
    return float(np.partition(flat, k - 1)[k - 1])


def lape_entropy(probs: np.ndarray) -> np.ndarray:
    """[L, I, K] activation probabilities -> [L, I] entropy (nats) of each neuron's probabilities
    normalised across the K languages (a neuron that never fires: 0)."""
    total = probs.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.where(total > 0, probs / np.where(total > 0, total, 1), 0.0)
        logs = np.where(normed > 0, np.log(np.where(normed > 0, normed, 1)), 0.0)
    return -(normed * logs).sum(-1)


@dataclass
class Selection:
    neurons: list[list[list[int]]]   # [language][layer] -> sorted neuron indices
    filter_value: float              # probability a neuron must exceed in some language to be kept
    activation_value: float          # probability above which a kept neuron belongs to a language
    kept: int                        # neurons kept by entropy (before assignment)


def lape_select(probs: np.ndarray, filter_percentile: float = 95.0, top_rate: float = 0.01,
                activation_percentile: float = 95.0) -> Selection:
    """Language-specific neurons of a [layers, neurons, languages] probability matrix.

    As Tang et al., except that neurons dropped by the filter are never kept, even where fewer
    than top_rate of all neurons survive it (their code could then keep some at infinite entropy)."""
    probs = np.asarray(probs, dtype=np.float64)
    L, n, K = probs.shape
    entropy = lape_entropy(probs)
    filter_value = kth_value(probs, filter_percentile)
    entropy[(probs > filter_value).sum(-1) == 0] = np.inf
    flat = entropy.ravel()
    order = np.argsort(flat, kind="stable")[:round(L * n * top_rate)]
    order = order[np.isfinite(flat[order])]
    activation_value = kth_value(probs, activation_percentile)
    member = probs.reshape(L * n, K)[order] > activation_value          # [kept, K]
    neurons = [[[] for _ in range(L)] for _ in range(K)]
    for j, flat_index in enumerate(order):
        layer, neuron = divmod(int(flat_index), n)
        for k in np.flatnonzero(member[j]):
            neurons[k][layer].append(neuron)
    for per_lang in neurons:
        for layer in per_lang:
            layer.sort()
    return Selection(neurons, filter_value, activation_value, len(order))


def jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else float("nan")


def as_set(per_layer: list[list[int]], layer: int | None = None) -> set:
    """A language's neurons as a set of (layer, index), or of indices of one layer."""
    if layer is not None:
        return set(per_layer[layer])
    return {(li, i) for li, idx in enumerate(per_layer) for i in idx}


def overlap_matrix(neurons: list[list[list[int]]], layer: int | None = None) -> np.ndarray:
    """[K, K] Jaccard overlaps between the languages' sets (one layer, or all layers with None)."""
    sets = [as_set(n, layer) for n in neurons]
    return np.array([[jaccard(a, b) for b in sets] for a in sets])


def random_like(per_layer: list[list[int]], widths: list[int], seed: int) -> list[list[int]]:
    """As many neurons per layer as `per_layer` holds, drawn at random (the deactivation control)."""
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(w, size=len(idx), replace=False)) for idx, w in zip(per_layer, widths)]


# ============================================================================= command
@dataclass
class NeuronsConfig:
    """The options of `polyalign neurons` (the CLI, experiment files and Python read them from here)."""
    model: str = C.model_option()
    adapter: str | None = adapter_option()
    compare_adapter: list[str] = compare_adapter_option()
    langs: str = option("all", help="'all', 'high', 'low' or a comma list")
    data: str | None = option(None, help="text source: task data as for evaluate (default: the bundled sets and "
                                         "question pool), or a {lang} file / hf: corpus with a `text` field")
    tasks: str | None = option(None, help="tasks whose items are the text (default: every bundled task)")
    tokens_per_language: int = option(20000, help="token budget of each language's text")
    max_sequence_tokens: int = option(512, help="longest text run as one sequence")
    filter_percentile: float = option(95.0, help="drop neurons whose largest probability is not above this "
                                                 "percentile of all probabilities")
    top_rate: float = option(0.01, help="share of all neurons kept (lowest entropy)")
    activation_percentile: float = option(95.0, help="a kept neuron belongs to each language whose probability "
                                                     "exceeds this percentile")
    seen: str | None = option(None, help="languages the adapters were trained on (default: read from each "
                                         "adapter's training data, via its summary.json)")
    output: str = option("runs/neurons", help="output folder")
    dtype: str = C.dtype_option()
    device: str = C.device_option()
    batch_tokens: int | None = C.batch_tokens_option()
    deactivate: bool = option(False, help="zero each language's neurons (and as many random ones) and re-run "
                                          "the evaluator")
    eval_task: str = option("amazon_polarity", help="--deactivate: the task evaluated")
    eval_langs: str | None = option(None, help="--deactivate: languages evaluated (default: --langs)")
    eval_labels: str = option("english", choices=LABEL_MODES, help="--deactivate: label mode")
    eval_data: str | None = option(None, help="--deactivate: evaluation data (default: bundled)")
    eval_limit: int | None = option(None, help="--deactivate: items per language")
    random_seed: int = option(0, help="seed of the random-neuron control")
    recompute: bool = option(False, help="ignore the counts saved in --output/parts")
    progress: bool = C.progress_option()


@dataclass
class NeuronsResult(SummaryView):
    """What `run_neurons` found. `summary` is summary.json's content (the result also reads like it:
    `result["models"]`); `selections[model]` the LAPE selection of each model (neurons per language
    and layer, its thresholds); `probabilities[model]` the [layers, neurons, languages] matrix."""
    summary: dict
    selections: dict
    probabilities: dict
    langs: list[str]
    output: Path | None = None

    def table(self) -> str:
        """Language-specific neurons per model and language, as the command line prints them."""
        return format_counts(self.summary)



def _check(cfg: NeuronsConfig) -> None:
    """Cheap checks, before any text or model is read."""
    def positive(flag, v):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PolyalignError(f"{flag} must be a positive number of tokens, got {v!r}")
    positive("--tokens-per-language", cfg.tokens_per_language)
    positive("--max-sequence-tokens", cfg.max_sequence_tokens)
    if cfg.batch_tokens is not None:
        positive("--batch-tokens", cfg.batch_tokens)
    for flag, v in (("--filter-percentile", cfg.filter_percentile), ("--activation-percentile", cfg.activation_percentile)):
        if not 0 < v <= 100:
            raise PolyalignError(f"{flag} must lie in (0, 100], got {v}")
    if not 0 < cfg.top_rate <= 1:
        raise PolyalignError(f"--top-rate must lie in (0, 1], got {cfg.top_rate}")
    if cfg.eval_limit is not None and cfg.eval_limit <= 0:
        raise PolyalignError("--eval-limit must be a positive number")


def seen_languages(cfg: NeuronsConfig, adapter: str | None) -> list[str] | None:
    """--seen, else the source and target languages of the adapter's prepared training data."""
    if cfg.seen:
        return languages.parse_langs(cfg.seen)
    try:
        data = json.loads(Path(adapter, "summary.json").read_text("utf-8"))["data"]
        from polyalign.store import read_jsonl
        recs = read_jsonl(Path(data, "train.jsonl"))
    except (OSError, ValueError, KeyError, TypeError, PolyalignError):
        return None
    found = {r[k] for r in recs for k in ("source", "target") if isinstance(r.get(k), str)}
    return [c for c in languages.ALL if c in found] or None


def language_sequences(tokenizer, texts: dict[str, list[str]], langs: list[str], budget: int, max_len: int,
                       command: str, hint: str = "") -> dict[str, list[list[int]]]:
    """Each language's token sequences within `budget` (activations.token_sequences); a language whose text
    fills less than MIN_SHARE of the budget is one line naming `command` (neurons and tune-lens)."""
    from polyalign.analysis.activations import token_sequences
    sequences = {lang: token_sequences(tokenizer, texts[lang], budget, max_len) for lang in langs}
    for lang in langs:
        n = sum(map(len, sequences[lang]))
        if n < MIN_SHARE * budget:
            raise PolyalignError(f"{command}: language {lang!r} has only {n} tokens of text, under "
                                 f"{MIN_SHARE:.0%} of --tokens-per-language {budget}{hint}")
    return sequences


def run_neurons(cfg: NeuronsConfig, *, model=None, tokenizer=None) -> NeuronsResult:
    """Language-specific neurons of cfg.model (with cfg.adapter), and of it with each of
    cfg.compare_adapter, compared with the first; or of the loaded `model` with its `tokenizer`.
    With cfg.deactivate, the evaluator's accuracy with each language's neurons (and a random
    control) zeroed in the first model. With `cfg.output` None nothing is written (no parts to
    resume from, no figures; deactivation runs are evaluated in memory)."""
    from tqdm.auto import tqdm

    from polyalign.analysis.activations import count_activations, language_texts, shared_prefix
    from polyalign.analysis.common import cache_key, release_memory
    from polyalign.analysis.lens import load_part
    from polyalign.models import load_model, load_tokenizer

    _check(cfg)
    langs = languages.parse_langs(cfg.langs)
    eval_langs = languages.parse_langs(cfg.eval_langs or cfg.langs)
    if cfg.deactivate:
        _check_eval(cfg, eval_langs)
    cfg, specs, preloaded = models_to_analyse(cfg, model, tokenizer)
    texts = language_texts(langs, cfg.data, cfg.tasks)
    for lang in langs:
        if not any(t.strip() for t in texts[lang]):
            raise PolyalignError(f"neurons: no text in language {lang!r} ({cfg.data or 'bundled sets'})")
    tok = preloaded.tokenizer if preloaded is not None else load_tokenizer(cfg.model)
    prefix = shared_prefix(tok)
    sequences = language_sequences(tok, texts, langs, cfg.tokens_per_language, cfg.max_sequence_tokens, "neurons",
                                   hint="; give more text (--data) or a smaller budget")

    output = Path(cfg.output) if cfg.output is not None else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    weights = {}
    if preloaded is not None and output is not None:   # a name says nothing about weights changed in memory
        from polyalign.models import weights_fingerprint
        weights = {"loaded_weights": weights_fingerprint(preloaded.model), "torch_dtype": str(preloaded.dtype)}
    counts: dict[str, dict[str, np.ndarray]] = {s.label: {} for s in specs}
    todo: dict = {}
    keycfg = SimpleNamespace(dtype=cfg.dtype, device=cfg.device, max_length=None, labels=None)
    for spec in specs:
        for lang in langs:
            key = path = got = None
            if output is not None:
                key = cache_key(spec, keycfg, "neurons", lang, [prefix, sequences[lang]], v=PART_VERSION, **weights)
                path = output / "parts" / spec.label / f"{lang}.npz"
                got = None if cfg.recompute else load_part(path, key)
            if got is not None:
                counts[spec.label][lang] = got[0]["counts"]
            else:
                todo.setdefault(spec.label, []).append((lang, key, path))
    total = sum(sum(map(len, sequences[lang])) for jobs in todo.values() for lang, _, _ in jobs)
    bar = tqdm(total=total, desc="neurons", unit="tok", disable=not cfg.progress or not total, dynamic_ncols=True)
    deactivation = None
    for i, spec in enumerate(specs):
        need_eval = cfg.deactivate and i == 0
        if spec.label not in todo and not need_eval:
            continue
        lm = preloaded or load_model(spec.model, cfg.dtype, cfg.device, spec.adapter, progress=cfg.progress)
        from polyalign.engine.runner import PrefixRunner
        runner = PrefixRunner(lm.model, lm.tokenizer, cfg.batch_tokens)
        was_training = lm.model.training
        lm.model.eval()
        try:
            for lang, key, path in todo.get(spec.label, []):
                bar.set_postfix_str(f"{spec.label}/{lang}")
                c, _ = count_activations(lm.model, runner, prefix, sequences[lang], bar)
                if path is not None:
                    write_npz_stable(path, {"counts": c, "_key": np.array(key), "_tokens": np.array(
                        json.dumps({"tokens": sum(map(len, sequences[lang]))}))})
                counts[spec.label][lang] = c
            if need_eval:
                bar.clear()
                first = _select(cfg, counts[spec.label], sequences, langs)
                deactivation = run_deactivation(cfg, lm, spec, langs, eval_langs, first)
        finally:
            lm.model.train(was_training)
        del lm, runner
        release_memory()
    bar.close()
    return write_outputs(cfg, specs, langs, counts, sequences, deactivation)


def _select(cfg, per_lang_counts: dict, sequences: dict, langs: list[str]) -> Selection:
    probs = probabilities(per_lang_counts, sequences, langs)
    return lape_select(probs, cfg.filter_percentile, cfg.top_rate, cfg.activation_percentile)


def probabilities(per_lang_counts: dict, sequences: dict, langs: list[str]) -> np.ndarray:
    """[layers, neurons, languages]: counts / tokens."""
    return np.stack([per_lang_counts[lang] / sum(map(len, sequences[lang])) for lang in langs], -1)


# ============================================================================= deactivation
def _check_eval(cfg: NeuronsConfig, eval_langs: list[str]) -> None:
    from polyalign.tasks import LABEL_MODES, load_task
    if cfg.eval_labels not in LABEL_MODES:
        raise PolyalignError(f"unknown label mode {cfg.eval_labels!r}; use {', '.join(LABEL_MODES)}")
    task = load_task(cfg.eval_task)
    for lang in eval_langs:
        task.label_words(lang, cfg.eval_labels)
        task.demo_prefix(lang, cfg.eval_labels)


def run_deactivation(cfg: NeuronsConfig, lm, spec, langs, eval_langs, sel: Selection) -> dict:
    """Accuracy of the evaluator with nothing, each language's neurons, and each random control zeroed.
    Each run has its own evaluator (so its own prefix cache) and its own folder."""
    from polyalign.analysis.activations import deactivated, mlp_parts
    from polyalign.evaluation.evaluate import EvalConfig, evaluate

    widths = [p.size for p in mlp_parts(lm.model)]
    runs = [("none", None, [[] for _ in widths])]
    for k, lang in enumerate(langs):
        if any(sel.neurons[k]):
            runs.append((lang, lang, sel.neurons[k]))
            runs.append((f"random-{lang}", lang, random_like(sel.neurons[k], widths, cfg.random_seed + k)))
    acc: dict[str, dict[str, float]] = {}
    for name, _, neurons in runs:
        folder = (Path(cfg.output) / "deactivate" / f"{name}-{content_hash(neurons)[:8]}"   # its own, keyed by the neurons
                  if cfg.output is not None else None)
        ecfg = EvalConfig(model=spec.model, tasks=cfg.eval_task, langs=",".join(eval_langs), labels=cfg.eval_labels,
                          output=str(folder) if folder is not None else None, data=cfg.eval_data, limit=cfg.eval_limit,
                          dtype=cfg.dtype, device=cfg.device, batch_tokens=cfg.batch_tokens, progress=cfg.progress)
        with deactivated(lm.model, neurons):
            result = evaluate(ecfg, model=lm)   # the loaded model, its adapter with it
        acc[name] = {r["lang"]: r["acc"] for r in result["rows"]}
    out = {"task": cfg.eval_task, "labels": cfg.eval_labels, "eval_langs": eval_langs, "accuracy": acc,
           "deactivated": [lang for name, lang, _ in runs if lang and not name.startswith("random-")],
           "random_neurons": {lang: {str(layer): idx for layer, idx in enumerate(neurons) if idx}
                              for name, lang, neurons in runs if name.startswith("random-")},
           "folders": {name: f"deactivate/{name}-{content_hash(neurons)[:8]}" if cfg.output is not None else None
                       for name, _, neurons in runs}}
    for kind, prefix in (("change", ""), ("random_change", "random-")):
        out[kind] = {lang: {e: acc[prefix + lang][e] - acc["none"][e] for e in eval_langs}
                     for lang in out["deactivated"]}
    return out


# ============================================================================= outputs
def write_outputs(cfg, specs, langs, counts, sequences, deactivation) -> NeuronsResult:
    """The selections, overlaps and comparisons, and (with an output folder) their files."""
    output = Path(cfg.output) if cfg.output is not None else None
    tokens = {lang: sum(map(len, sequences[lang])) for lang in langs}
    selections, arrays = {}, {"langs": np.array(langs)}
    count_rows, overlap_rows = [], []
    for spec in specs:
        c = np.stack([counts[spec.label][lang] for lang in langs], -1)
        probs = probabilities(counts[spec.label], sequences, langs)
        sel = lape_select(probs, cfg.filter_percentile, cfg.top_rate, cfg.activation_percentile)
        selections[spec.label] = sel
        arrays[f"{spec.label}/counts"] = c
        arrays[f"{spec.label}/probabilities"] = probs
        arrays["tokens"] = np.array([tokens[lang] for lang in langs])
        n_layers = probs.shape[0]
        for k, lang in enumerate(langs):
            for layer in range(n_layers):
                count_rows.append([spec.label, lang, layer, len(sel.neurons[k][layer])])
        for layer in [*range(n_layers), None]:
            m = overlap_matrix(sel.neurons, layer)
            for a, la in enumerate(langs):
                for b, lb in enumerate(langs):
                    shared = len(as_set(sel.neurons[a], layer) & as_set(sel.neurons[b], layer))
                    overlap_rows.append([spec.label, "all" if layer is None else layer, la, lb, m[a, b], shared])
    if output is not None:
        write_npz_stable(output / "probabilities.npz", arrays)
        write_csv(output / "counts.csv", ["model", "lang", "layer", "neurons"], count_rows, CSV_FLOATS)
        write_csv(output / "overlap.csv", ["model", "layer", "lang_a", "lang_b", "jaccard", "shared"], overlap_rows,
                  CSV_FLOATS)

    settings = {k: getattr(cfg, k) for k in ("tokens_per_language", "max_sequence_tokens", "filter_percentile",
                                            "top_rate", "activation_percentile", "data", "tasks")}
    neurons_json = {"settings": settings, "langs": langs, "tokens": tokens, "models": {
        s.label: {"model": s.model, "adapter": s.adapter,
                  "thresholds": {"filter_value": sel.filter_value, "activation_value": sel.activation_value,
                                 "kept": sel.kept},
                  "neurons": {lang: {str(layer): idx for layer, idx in enumerate(sel.neurons[k]) if idx}
                              for k, lang in enumerate(langs)}}
        for s, sel in ((s, selections[s.label]) for s in specs)}}
    figures = []          # (in memory: none; plot_counts / plot_overlap draw them from the selections)
    if output is not None:
        write_json(output / "neurons.json", neurons_json)
        for s in specs:
            sel = selections[s.label]
            figures.append(save_figure(plot_counts(sel, langs, s.label), output / f"neuron_counts_{s.label}.png").name)
            figures.append(save_figure(plot_overlap(overlap_matrix(sel.neurons), langs, s.label),
                                       output / f"neuron_overlap_{s.label}.png").name)
    summary = {"command": "neurons", "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
               "langs": langs, "tokens": tokens,
               "models": {s.label: {"thresholds": neurons_json["models"][s.label]["thresholds"],
                                    "per_language": {lang: sum(map(len, selections[s.label].neurons[k]))
                                                     for k, lang in enumerate(langs)}} for s in specs},
               "figures": figures}
    if len(specs) > 1:      # the first model against each of the others
        base = selections[specs[0].label]
        summary["compare"] = {t.label: compare(langs, base, selections[t.label], seen_languages(cfg, t.adapter))
                              for t in specs[1:]}
        rows = [[label, r["lang"], r["seen"], r["resource"], r["base"], r["trained"], r["jaccard"]]
                for label, c in summary["compare"].items() for r in c["languages"]]
        layer_rows = [[label, lang, layer, b, t, t - b] for label, c in summary["compare"].items()
                      for lang, per in c["layers"].items() for layer, (b, t) in enumerate(per)]
        if output is not None:
            write_csv(output / "compare.csv", ["model", "lang", "seen", "resource", "base", "trained", "jaccard"],
                      rows, CSV_FLOATS)
            write_csv(output / "compare_layers.csv", ["model", "lang", "layer", "base", "trained", "change"],
                      layer_rows, CSV_FLOATS)
    if deactivation is not None:
        summary["deactivation"] = deactivation
        if output is not None:
            write_deactivation(output, deactivation)
    if output is not None:
        write_json(output / "summary.json", summary)
        log.info("neurons: %s", output / "neurons.json")
    probs = {s.label: arrays[f"{s.label}/probabilities"] for s in specs}
    return NeuronsResult(summary, selections, probs, list(langs), output)


def compare(langs, base: Selection, trained: Selection, seen: list[str] | None) -> dict:
    """Per language: the overlap of its set base vs trained and the counts per layer; summarised by
    group (seen / unseen by the training data, when known; high / low resource)."""
    rows, layers = [], {}
    for k, lang in enumerate(langs):
        a, b = as_set(base.neurons[k]), as_set(trained.neurons[k])
        rows.append({"lang": lang, "seen": None if seen is None else lang in seen,
                     "resource": languages.get(lang).resource, "base": len(a), "trained": len(b),
                     "jaccard": jaccard(a, b)})
        layers[lang] = [[len(x), len(y)] for x, y in zip(base.neurons[k], trained.neurons[k])]
    groups = {}
    for name, keep in (("seen", lambda r: r["seen"] is True), ("unseen", lambda r: r["seen"] is False),
                       ("high", lambda r: r["resource"] == "high"), ("low", lambda r: r["resource"] == "low")):
        sel = [r for r in rows if keep(r)]
        if sel:
            ja = [r["jaccard"] for r in sel if not math.isnan(r["jaccard"])]
            groups[name] = {"langs": [r["lang"] for r in sel],
                            "mean_jaccard": float(np.mean(ja)) if ja else None,
                            "mean_change": float(np.mean([r["trained"] - r["base"] for r in sel]))}
    return {"seen_langs": seen, "languages": rows, "layers": layers, "groups": groups}


def write_deactivation(output: Path, d: dict) -> None:
    rows = [[kind, lang, e, d[kind][lang][e]] for kind in ("change", "random_change")
            for lang in d["deactivated"] for e in d["eval_langs"]]
    write_csv(output / "deactivation.csv", ["kind", "deactivated", "evaluated", "accuracy_change"], rows, CSV_FLOATS)
    if d["deactivated"]:
        save_figure(plot_deactivation(d), output / "deactivation.png")


def format_counts(summary: dict) -> str:
    lines = [f"{'model':<16} " + " ".join(f"{lang:>5}" for lang in summary["langs"])]
    for label, m in summary["models"].items():
        lines.append(f"{label:<16} " + " ".join(f"{m['per_language'][lang]:>5}" for lang in summary["langs"]))
    return "\n".join(lines)


def write_npz_stable(path: Path, arrays: dict) -> None:
    """As np.savez, but with a fixed time stamp on every zip entry (np.savez stamps the current
    time), so that the same arrays give the same bytes; written beside `path`, then renamed."""
    import io
    import zipfile
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


# ============================================================================= plots (no pyplot)
def save_figure(fig, path: Path) -> Path:
    """A matplotlib Figure as PNG, written beside `path` and renamed over it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def plot_counts(sel: Selection, langs: list[str], label: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    cmap = __import__("matplotlib").colormaps["tab20"]
    for k, lang in enumerate(langs):
        ax.plot(range(len(sel.neurons[k])), [len(x) for x in sel.neurons[k]], label=lang, color=cmap(k % 20), lw=1.4)
    ax.set_xlabel("layer")
    ax.set_ylabel("language-specific neurons")
    ax.set_title(f"{label}: LAPE neurons per layer")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    return fig


def _heatmap(ax, m, rows, cols, fmt, cmap, vmin=None, vmax=None):
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=5)
    return im


def plot_overlap(m: np.ndarray, langs: list[str], label: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(0.35 * len(langs) + 2.5, 0.35 * len(langs) + 1.8))
    ax = fig.add_subplot()
    im = _heatmap(ax, m, langs, langs, "{:.2f}", "viridis", 0, 1)
    fig.colorbar(im, ax=ax, label="Jaccard")
    ax.set_title(f"{label}: overlap of language neurons")
    return fig


def plot_deactivation(d: dict):
    from matplotlib.figure import Figure
    rows, cols = d["deactivated"], d["eval_langs"]
    fig = Figure(figsize=(2 * (0.35 * len(cols) + 2.5), 0.35 * len(rows) + 1.8))
    for j, (kind, title) in enumerate((("change", "language neurons zeroed"), ("random_change", "random control"))):
        ax = fig.add_subplot(1, 2, j + 1)
        m = np.array([[d[kind][r][c] for c in cols] for r in rows])
        lim = max(1e-6, float(np.nanmax(np.abs(m)))) if m.size else 1
        im = _heatmap(ax, m, rows, cols, "{:+.2f}", "RdBu", -lim, lim)
        ax.set_xlabel("evaluated")
        ax.set_ylabel("deactivated")
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, label="accuracy change")
    return fig
