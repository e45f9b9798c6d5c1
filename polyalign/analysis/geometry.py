"""`polyalign geometry`: where parallel items sit in the hidden states, layer by layer.

1. Hidden states. Every layer's states (index 0 = the embeddings, as `output_hidden_states` gives
   them) of the few-shot prompts of items that are parallel across languages, pooled per item:
   `mean` over the whole prompt, demos included (the paper's choice; with the prefix cache the
   demos' states come from the prefix forward and enter the mean), `query-mean` over the test
   item's own tokens, or the `last` token. Cached in <output>/states/<model>/<lang>.npz under a hash
   of everything that determines them, so a redraw (other --layers, --center, plots) recomputes nothing.
2. PCA, fitted per layer jointly on all languages (scikit-learn); 2-D scatter plots coloured by
   language and by item index.
3. Pearson: np.corrcoef of the 1-D PCA scores of every pair of languages across the parallel items.
4. MEXA (Kargaran et al. 2024; analysis/mexa.py) per layer and language into the pivot, after the
   same centering, pooled over layers, with the adapter-minus-base difference (mexa.csv, summary.json).
5. Beyond the paper: per layer and language, the mean cosine of parallel pairs (item i in X and in
   the pivot language) against non-parallel pairs (i in X, j≠i in the pivot), and the retrieval
   accuracy (is the nearest pivot item of X's item i its translation?). Vectors are centred first
   (--center lang: per language, the default; joint; none), because mean-pooled states share a large
   common component (the demos, the BOS token) that makes every raw cosine close to 1.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from polyalign import config as C
from polyalign import languages
from polyalign.analysis import mexa
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.analysis.common import SummaryView, models_to_analyse
from polyalign.analysis.common import (CSV_FLOATS, AnalysedModel, adapter_option, analysis_task_option, cache_key,
                                       check_mode, compare_adapter_option, load_items, prompt_texts,
                                       release_memory, write_npz)
from polyalign.engine.prompts import PromptSet, batch_groups, check_lengths, prepare_prompts
from polyalign.store import content_hash, write_csv, write_json
from polyalign.tasks import LABEL_MODES, load_task

log = logging.getLogger(__name__)

POOLINGS = ("mean", "query-mean", "last")
CENTERS = ("lang", "joint", "none")
CACHE_VERSION = 1


@dataclass
class GeometryConfig:
    """The options of `polyalign geometry` (the CLI, experiment files and Python read them from here)."""
    model: str = C.model_option()
    adapter: str | None = adapter_option()
    compare_adapter: list[str] = compare_adapter_option()
    task: str = analysis_task_option()
    langs: str = option("en,de,fr,hi,th,sw,ms", help="'all', 'high', 'low' or a comma list")
    labels: str = option("english", choices=LABEL_MODES, help="label words in the demos")
    output: str = option("runs/geo", help="output folder")
    data: str | None = C.data_option()
    limit: int | None = C.limit_option()
    pooling: str = option("mean", choices=POOLINGS, help="mean: whole prompt incl. demos (the paper); query-mean: "
                                                         "the test item only; last: last token")
    layers: str | None = option(None, help="layers to plot, comma list, negatives count from the end "
                                           "(default: the middle one and the last-but-one)")
    pivot: str = option("en", help="language that alignment metrics and MEXA retrieve into")
    center: str = option("lang", choices=CENTERS, help="centering before cosines/retrieval (PCA always centres "
                                                       "jointly)")
    states_dtype: str = option("float32", choices=("float32", "float16"), help="storage type of the cached states")
    recompute: bool = option(False, help="ignore cached states")
    dtype: str = C.dtype_option()
    device: str = C.device_option()
    batch_tokens: int | None = C.batch_tokens_option()
    max_length: int | None = C.max_length_option()
    trust_file_labels: bool = C.trust_file_labels_option()
    progress: bool = C.progress_option()


# ============================================================================= hidden states
class StatePooler:
    """Pools the per-layer hidden states of prompts that ran after their demos' prefix cache into
    one vector per prompt and layer. The one implementation of the poolings: collect_states' own
    forwards use it, and so do the evaluator's when it shares them with a geometry step."""

    def __init__(self, pooling: str):
        if pooling not in POOLINGS:
            raise PolyalignError(f"unknown pooling {pooling!r}; use {', '.join(POOLINGS)}")
        self.pooling = pooling
        # `mean` takes the demos in: the prefix forward must return their states (runner.prefix(hidden_states=True)).
        self.prefix_states = pooling == "mean"
        self._prefix_sums: dict[tuple, torch.Tensor] = {}

    def pool(self, prefix, hidden, prompts, rows: list[int] | None = None) -> torch.Tensor:
        """[B, L+1, H] float32 for `prompts` (all after `prefix`), whose suffixes sit in rows `rows`
        (default 0..B-1) of the forward's per-layer `hidden` [R, Q, H]. Only a prompt's own suffix
        positions are read: padding, and tokens a caller appended after the suffix, are not."""
        dev = hidden[0].device
        if rows is not None:
            index = torch.tensor(rows, device=dev)
            hidden = [h[index] for h in hidden]
        c = len(prefix.ids)
        lens = torch.tensor([len(p.suffix) for p in prompts], device=dev)
        if self.pooling == "last":
            at = torch.arange(len(prompts), device=dev)
            return torch.stack([h[at, lens - 1].float() for h in hidden], 1)
        width = hidden[0].shape[1]
        start = torch.tensor([0 if self.pooling == "mean" else p.query_start - c for p in prompts], device=dev)
        pos = torch.arange(width, device=dev)[None]
        mask = ((pos >= start[:, None]) & (pos < lens[:, None])).float()
        count = mask.sum(1)
        sums = torch.stack([torch.einsum("bq,bqh->bh", mask, h.float()) for h in hidden], 1)  # [B, L+1, H]
        if self.pooling == "mean" and c:
            sums = sums + self._prefix_sum(prefix)[None]
            count = count + c
        return sums / count[:, None, None]

    def _prefix_sum(self, prefix) -> torch.Tensor:
        key = tuple(prefix.ids)
        if key not in self._prefix_sums:
            if prefix.hidden is None:
                raise ValueError("mean pooling needs the prefix's hidden states: runner.prefix(ids, hidden_states=True)")
            self._prefix_sums[key] = torch.stack([h[0, :len(prefix.ids)].float().sum(0) for h in prefix.hidden], 0)
        return self._prefix_sums[key]


@torch.inference_mode()
def collect_states(runner, ps: PromptSet, pooling: str, bar=None) -> np.ndarray:
    """Pooled hidden states [N, L+1, H] (float32) of the prompts, through the prefix cache."""
    pooler = StatePooler(pooling)
    n = len(ps.prompts)
    out = None
    for group in batch_groups(runner, ps.prompts):
        prefix = runner.prefix(ps.prefix_ids[:group[0].cached_len], hidden_states=pooler.prefix_states)
        _, hidden = runner.forward(prefix, [p.suffix for p in group], hidden_states=True)
        vecs = pooler.pool(prefix, hidden, group)
        if out is None:
            out = np.zeros((n, vecs.shape[1], vecs.shape[2]), dtype=np.float32)
        out[[p.index for p in group]] = vecs.cpu().numpy()
        if bar is not None:
            bar.update(len(group))
    return out


def parallel_items(task, langs: list[str], cfg: GeometryConfig) -> tuple[dict[str, list[dict]], list[str]]:
    """({lang: items}, data issues) of the analysis: cfg.limit items of each language, cut to the
    first n of each when the languages hold different numbers (they are parallel by index)."""
    items, issues = load_items(task, langs, cfg.data, cfg.limit, cfg.trust_file_labels)
    n = min(len(items[lang]) for lang in langs)
    if any(len(items[lang]) != n for lang in langs):
        issues.append("languages hold " + ", ".join(f"{lang} {len(items[lang])}" for lang in langs)
                      + f" items; using the first {n} of each (parallel by index)")
        items = {lang: items[lang][:n] for lang in langs}
    return items, issues


def states_key(spec: AnalysedModel, cfg: GeometryConfig, task_hash: str, lang: str, texts: list[str],
               **extra) -> str:
    return cache_key(spec, cfg, task_hash, lang, texts, v=CACHE_VERSION, pooling=cfg.pooling, **extra)


def _pool_name(pooling: str) -> str:
    return pooling.replace("-", "_")


def load_cached(path: Path, key: str, pooling: str) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            name = _pool_name(pooling)
            if f"key_{name}" in z.files and str(z[f"key_{name}"]) == key:
                return z[name].astype(np.float32)
    except (OSError, ValueError, EOFError):
        return None
    return None


def save_cached(path: Path, key: str, pooling: str, states: np.ndarray, items: list[dict], dtype: str) -> None:
    """Add this pooling's states to the language's cache file (other poolings stay)."""
    arrays = {}
    if path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            arrays = {}
    name = _pool_name(pooling)
    arrays[name] = states.astype(dtype)
    arrays[f"key_{name}"] = np.array(key)
    arrays["ids"] = np.array([str(it.get("id", i)) for i, it in enumerate(items)])
    arrays["gold"] = np.array([it["label"] for it in items])
    write_npz(path, arrays)


# ============================================================================= states from the evaluator's forwards
# The GeometryConfig options that a geometry step's states depend on: what `polyalign run` hands an
# evaluation that scores the same prompts (EvalConfig.geometry_states), so that it pools them too.
SHARED_OPTIONS = ("model", "task", "langs", "labels", "output", "data", "limit", "pooling", "states_dtype",
                  "recompute", "dtype", "device", "max_length", "trust_file_labels")


class SharedStates:
    """An evaluation's forwards pooled for a geometry run over the same prompts, written into its
    states cache exactly as run_geometry writes it (states_key, save_cached), which then runs no
    forward for them. `wanted`: {"label": the geometry's label of the evaluated model, "geometry":
    GeometryConfig options (SHARED_OPTIONS)}. Whatever does not match exactly is left to geometry:
    another task or label mode, items the evaluation does not score or cuts, a killed and resumed
    language (whose finished batches do not run again)."""

    def __init__(self, wanted: dict, model: str, adapter: str | None, torch_dtype, max_length: int | None):
        self.cfg = C.from_mapping(GeometryConfig, wanted.get("geometry") or {}, "eval.geometry_states",
                                  keys=SHARED_OPTIONS)
        self.spec = AnalysedModel(str(wanted.get("label") or "base"), self.cfg.model, adapter)
        self.pooler = StatePooler(self.cfg.pooling)
        self.problem = self._mismatch(model, torch_dtype, max_length)
        self._items = None

    def _mismatch(self, model, torch_dtype, max_length) -> str | None:
        from polyalign.models import resolve_device, resolve_dtype
        cfg = self.cfg
        if cfg.output is None or cfg.recompute:
            return "the geometry run keeps no states cache"
        if cfg.model != model or cfg.max_length != max_length:
            return "the geometry run's model or --max-length differ"
        if str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))) != str(torch_dtype):
            return "the geometry run's dtype differs"
        return None

    def _load(self):
        """(task, {lang: items}) of the geometry run, loaded once; None where they cannot be."""
        if self._items is None:
            try:
                task = load_task(self.cfg.task)
                langs = languages.parse_langs(self.cfg.langs)
                self._items = (task, parallel_items(task, langs, self.cfg)[0])
            except PolyalignError as e:     # the geometry step reports it; the evaluation goes on
                log.info("geometry states: not shared (%s)", e)
                self._items = (None, {})
        return self._items

    def collector(self, task, mode: str, lang: str, group) -> "StatesCollector | None":
        """What pools `group`'s forwards (an evaluator's scoring.Group) for the geometry run, or None."""
        if self.problem is not None or mode != self.cfg.labels:
            return None
        geo_task, items = self._load()
        if geo_task is None or lang not in items or geo_task.name != task.name or \
                Path(geo_task.path).resolve() != Path(task.path).resolve():
            return None
        mine = items[lang]
        scored = {p.item["id"]: p for p in group.items}
        index = {}
        for g, it in enumerate(mine):
            p = scored.get(it.get("id"))
            if p is None or p.truncated or p.item != it:   # another item, or not the prompt geometry runs
                return None
            index[p.index] = g
        task_hash = content_hash(Path(geo_task.path).read_text("utf-8"))
        key = states_key(self.spec, self.cfg, task_hash, lang, prompt_texts(geo_task, lang, self.cfg.labels, mine))
        path = Path(self.cfg.output) / "states" / self.spec.label / f"{lang}.npz"
        cached = load_cached(path, key, self.cfg.pooling)
        if cached is not None and len(cached) == len(mine):
            return None
        return StatesCollector(self.pooler, path, key, mine, index, self.cfg.states_dtype)


class StatesCollector:
    """The pooled states of one language, filled batch by batch, saved once every item has them."""

    def __init__(self, pooler: StatePooler, path: Path, key: str, items: list[dict], index: dict[int, int],
                 dtype: str):
        self.pooler, self.path, self.key, self.items, self.index, self.dtype = pooler, path, key, items, index, dtype
        self.states: np.ndarray | None = None
        self.filled: set[int] = set()

    def wants(self, prompts) -> bool:
        return any(p.index in self.index for p in prompts)

    def add(self, prefix, hidden, prompts, rows: list[int]) -> None:
        """Pool the wanted `prompts`, whose suffixes sit in `rows` of the forward's per-layer `hidden`."""
        mine = [(p, r) for p, r in zip(prompts, rows) if p.index in self.index]
        if not mine:
            return
        vecs = self.pooler.pool(prefix, hidden, [p for p, _ in mine], [r for _, r in mine]).cpu().numpy()
        if self.states is None:
            self.states = np.zeros((len(self.items), *vecs.shape[1:]), dtype=np.float32)
        at = [self.index[p.index] for p, _ in mine]
        self.states[at] = vecs
        self.filled.update(at)

    def save(self) -> bool:
        """Write the states into the geometry cache if every item has them (else geometry computes them)."""
        if len(self.filled) != len(self.items):
            return False
        save_cached(self.path, self.key, self.pooler.pooling, self.states, self.items, self.dtype)
        log.info("geometry states: %s from this evaluation's forwards", self.path)
        return True


# ============================================================================= analysis
def pca_scores(by_lang: dict[str, np.ndarray], n_components: int = 2, seed: int = 0):
    """One PCA fitted on all languages' vectors [N, H] stacked -> ({lang: scores [N, k]}, explained ratio)."""
    from sklearn.decomposition import PCA
    langs = list(by_lang)
    x = np.concatenate([by_lang[lang] for lang in langs]).astype(np.float64)
    k = min(n_components, x.shape[0], x.shape[1])
    pca = PCA(n_components=k, random_state=seed)
    z = pca.fit_transform(x)
    out, at = {}, 0
    for lang in langs:
        n = len(by_lang[lang])
        out[lang] = z[at:at + n]
        at += n
    return out, pca.explained_variance_ratio_


def pearson_pairs(scores: dict[str, np.ndarray]) -> list[tuple[str, str, float]]:
    """np.corrcoef of the 1-D scores of every pair of languages (in the given order, a before b)."""
    langs = list(scores)
    out = []
    for i, a in enumerate(langs):
        for b in langs[i + 1:]:
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.corrcoef(scores[a], scores[b])[0, 1]
            out.append((a, b, float(r)))
    return out


def center(by_lang: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    if how == "none":
        return {k: v.astype(np.float64) for k, v in by_lang.items()}
    if how == "lang":
        return {k: v.astype(np.float64) - v.mean(0, dtype=np.float64) for k, v in by_lang.items()}
    if how == "joint":
        mu = np.concatenate(list(by_lang.values())).mean(0, dtype=np.float64)
        return {k: v.astype(np.float64) - mu for k, v in by_lang.items()}
    raise PolyalignError(f"unknown centering {how!r}; use {', '.join(CENTERS)}")


def alignment_metrics(x: np.ndarray, pivot: np.ndarray) -> tuple[float, float, float]:
    """(mean cosine of parallel pairs, of non-parallel pairs, retrieval accuracy into `pivot`)."""
    def unit(a):
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return a / np.where(norm > 0, norm, 1.0)
    sim = unit(x) @ unit(pivot).T
    n = len(sim)
    par = float(np.trace(sim) / n)
    non = float((sim.sum() - np.trace(sim)) / (n * (n - 1))) if n > 1 else float("nan")
    acc = float(np.mean(sim.argmax(1) == np.arange(n)))
    return par, non, acc


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Layer indices into hidden_states (0 = embeddings .. n_layers); default: middle and last-but-one."""
    if not spec:
        chosen = [n_layers // 2, n_layers - 1]
    else:
        chosen = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                v = int(part)
            except ValueError:
                raise PolyalignError(f"--layers: {part!r} is not a layer number") from None
            if v < 0:
                v += n_layers + 1
            if not 0 <= v <= n_layers:
                raise PolyalignError(f"--layers: {part} is outside 0..{n_layers} (the model has {n_layers} layers; "
                                     f"0 is the embeddings)")
            chosen.append(v)
    return sorted(set(max(0, c) for c in chosen))


@dataclass(frozen=True)
class AlignmentRow:
    """The alignment of one language with the pivot at one layer (a row of alignment.csv, less the model)."""
    layer: int
    lang: str
    cos_parallel: float         # mean cosine of an item and its translation
    cos_nonparallel: float      # mean cosine of an item and the other items' translations
    retrieval_acc: float        # share of items whose nearest pivot item is their translation

    METRICS = ("cos_parallel", "cos_nonparallel", "retrieval_acc")

    def values(self) -> list:
        return [self.layer, self.lang, *(getattr(self, m) for m in self.METRICS)]


def analyse(states: dict[str, np.ndarray], pivot: str | None, how: str):
    """All layers of one model: PCA scores, explained ratios, Pearson pairs and alignment rows."""
    n_layers = next(iter(states.values())).shape[1] - 1
    scores, ratios, pearson, align = {}, {}, [], []
    for layer in range(n_layers + 1):
        by_lang = {lang: s[:, layer] for lang, s in states.items()}
        sc, ratio = pca_scores(by_lang)
        scores[layer], ratios[layer] = sc, ratio
        for a, b, r in pearson_pairs({lang: v[:, 0] for lang, v in sc.items()}):
            pearson.append((layer, a, b, r))
        if pivot is not None:
            c = center(by_lang, how)
            for lang in states:
                if lang != pivot:
                    align.append(AlignmentRow(layer, lang, *alignment_metrics(c[lang], c[pivot])))
    return scores, ratios, pearson, align


# ============================================================================= command
@dataclass
class GeometryResult(SummaryView):
    """What `run_geometry` found. `summary` is summary.json's content (the result also reads like it:
    `result["per_layer"]`); `pearson` and `alignment` are the rows of pearson.csv and alignment.csv
    at every layer; `states[model][lang]` the pooled hidden states [items, layers + 1, hidden]."""
    summary: dict
    pearson: list[dict]
    alignment: list[dict]
    states: dict
    output: Path | None = None

    def to_pandas(self, what: str = "alignment"):
        """`alignment` or `pearson` as a pandas DataFrame (pandas is not a dependency)."""
        if what not in ("alignment", "pearson"):
            raise PolyalignError(f"to_pandas: unknown table {what!r}; use alignment or pearson")
        try:
            import pandas as pd
        except ImportError:
            raise PolyalignError("to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(getattr(self, what))



def run_geometry(cfg: GeometryConfig, *, model=None, tokenizer=None) -> GeometryResult:
    """Hidden-state geometry of `cfg.model` (with cfg.adapter, and each of cfg.compare_adapter), or of
    the loaded `model` with its `tokenizer`. With `cfg.output` None nothing is written or cached."""
    from tqdm.auto import tqdm


    started = time.time()
    task = load_task(cfg.task)
    langs = languages.parse_langs(cfg.langs)
    check_mode(cfg.labels)
    check_lengths(cfg.batch_tokens, cfg.max_length)
    if cfg.pooling not in POOLINGS:
        raise PolyalignError(f"unknown pooling {cfg.pooling!r}; use {', '.join(POOLINGS)}")
    if cfg.center not in CENTERS:
        raise PolyalignError(f"unknown centering {cfg.center!r}; use {', '.join(CENTERS)}")
    if len(langs) < 2:
        raise PolyalignError("geometry compares languages: give at least two in --langs")
    if len(set(langs)) != len(langs):
        raise PolyalignError("--langs lists a language twice")
    for lang in langs:
        task.demo_prefix(lang, cfg.labels)
    cfg, specs, preloaded = models_to_analyse(cfg, model, tokenizer)
    items, issues = parallel_items(task, langs, cfg)
    n = len(items[langs[0]])
    if n < 3:
        raise PolyalignError(f"geometry needs at least 3 parallel items per language; got {n}")
    for line in issues:
        log.warning("data: %s", line)
    pivot = cfg.pivot if cfg.pivot in langs else None
    if pivot is None:
        log.warning("geometry: MEXA and the alignment metrics need English or the pivot named with --pivot among "
                    "--langs (%r is not); they are skipped", cfg.pivot)

    output = Path(cfg.output) if cfg.output is not None else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    task_hash = content_hash(Path(task.path).read_text("utf-8"))
    weights = {}
    if preloaded is not None and output is not None:   # a name says nothing about weights changed in memory
        from polyalign.models import weights_fingerprint
        weights = {"loaded_weights": weights_fingerprint(preloaded.model), "torch_dtype": str(preloaded.dtype)}
    keys = {(s.label, lang): states_key(s, cfg, task_hash, lang, prompt_texts(task, lang, cfg.labels, items[lang]),
                                        **weights)
            for s in specs for lang in langs} if output is not None else {}
    states: dict[str, dict[str, np.ndarray]] = {s.label: {} for s in specs}
    todo = []
    for s in specs:
        for lang in langs:
            cached = None
            if output is not None and not cfg.recompute:
                cached = load_cached(output / "states" / s.label / f"{lang}.npz", keys[s.label, lang], cfg.pooling)
            if cached is not None and len(cached) == n:
                states[s.label][lang] = cached
            else:
                todo.append((s, lang))
    model_info = {s.label: {"label": s.label, "model": s.model, "adapter": s.adapter,
                            "cached_langs": sorted(states[s.label])} for s in specs}
    bar = tqdm(total=sum(n for _ in todo), desc="geometry", unit="item", disable=not cfg.progress or not todo,
               dynamic_ncols=True)
    for s in specs:
        mine = [lang for spec, lang in todo if spec == s]
        if not mine:
            continue
        from polyalign.models import load_model
        from polyalign.engine.runner import PrefixRunner
        from polyalign.engine.model_parts import max_context
        t0 = time.perf_counter()
        lm = preloaded or load_model(s.model, cfg.dtype, cfg.device, s.adapter, progress=cfg.progress)
        was_training = lm.model.training
        lm.model.eval()
        runner = PrefixRunner(lm.model, lm.tokenizer, cfg.batch_tokens)
        limit = min(cfg.max_length or 1 << 30, max_context(lm.model, lm.tokenizer))
        try:
            for lang in mine:
                bar.set_postfix_str(f"{s.label}/{lang}")
                ps = prepare_prompts(lm.tokenizer, task, lang, cfg.labels, items[lang], limit)
                st = collect_states(runner, ps, cfg.pooling, bar)
                if output is not None:
                    save_cached(output / "states" / s.label / f"{lang}.npz", keys[s.label, lang], cfg.pooling, st,
                                items[lang], cfg.states_dtype)
                states[s.label][lang] = st.astype(cfg.states_dtype).astype(np.float32)
        finally:
            lm.model.train(was_training)
        model_info[s.label].update({"dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                                    "seconds": round(time.perf_counter() - t0, 3)})
        del lm, runner
        release_memory()
    bar.close()
    for s in specs:
        states[s.label] = {lang: states[s.label][lang] for lang in langs}
        shape = next(iter(states[s.label].values())).shape
        model_info[s.label].update({"layers": shape[1] - 1, "hidden": shape[2]})
    return write_geometry_outputs(cfg, task, langs, specs, states, pivot, model_info, issues, n, started)


def write_geometry_outputs(cfg, task, langs, specs, states, pivot, model_info, issues, n, started) -> GeometryResult:
    """The analysis of every model's states, and (with an output folder) its CSVs, figures, summary."""
    output = Path(cfg.output) if cfg.output is not None else None
    n_layers = {s.label: model_info[s.label]["layers"] for s in specs}
    if len(set(n_layers.values())) != 1:
        raise PolyalignError(f"the models differ in depth: {n_layers}")
    chosen = parse_layers(cfg.layers, next(iter(n_layers.values())))
    results = {s.label: analyse(states[s.label], pivot, cfg.center) for s in specs}

    pearson_header = ["model", "layer", "lang_a", "lang_b", "r"]
    pearson_rows = [[s.label, *row] for s in specs for row in results[s.label][2]]
    align_header = ["model", "layer", "lang", "cos_parallel", "cos_nonparallel", "retrieval_acc"]
    align_rows = [[s.label, *row.values()] for s in specs for row in results[s.label][3]]
    if output is not None:
        write_csv(output / "pearson.csv", pearson_header, pearson_rows, CSV_FLOATS)
    if pivot is not None and output is not None:
        write_csv(output / "alignment.csv", align_header, align_rows, CSV_FLOATS)
    ref = specs[0].label
    delta_rows = []
    if pivot is not None and len(specs) > 1:
        base = {(r[1], r[2]): r[3:] for r in align_rows if r[0] == ref}
        for r in align_rows:
            if r[0] != ref:
                b = base[(r[1], r[2])]
                delta_rows.append([r[0], ref, r[1], r[2], *(x - y for x, y in zip(r[3:], b))])
        if output is not None:
            write_csv(output / "alignment_delta.csv",
                      ["model", "reference", "layer", "lang", "d_cos_parallel", "d_cos_nonparallel",
                       "d_retrieval_acc"], delta_rows, CSV_FLOATS)

    # issue 12: MEXA into the pivot, after the same centering as the alignment metrics
    mexa_summary = None
    if pivot is not None:
        mexa_summary = mexa_outputs(output, specs, states, pivot, cfg.center)

    figures = []
    if output is not None:
        for layer in chosen:
            figures.append(str(plot_pca(output / f"pca_layer{layer}.png", layer, langs, specs, results)))
            figures.append(str(plot_pearson(output / f"pearson_layer{layer}.png", layer, langs, specs, results)))
        figures.append(str(plot_alignment(output / "alignment.png", langs, specs, results, pivot, cfg.center)))

    summary = {
        "command": "geometry",
        "config": asdict(cfg),
        "task": task.name,
        "langs": langs,
        "pivot": pivot,
        "pooling": cfg.pooling,
        "center": cfg.center,
        "n_items": n,
        "models": list(model_info.values()),
        "layers": chosen,
        "per_layer": {},
        "mexa": mexa_summary,
        "data_issues": issues,
        "figures": figures,
        "seconds": round(time.time() - started, 3),
        "notes": ("layer 0 = embeddings; layer L = transformers' last hidden state (final-normed for "
                  "Llama/Qwen2/Mistral/Gemma3); Pearson = np.corrcoef of 1-D PCA scores; alignment metrics "
                  f"after '{cfg.center}' centering, retrieval into {pivot}"),
    }
    for layer in chosen:
        entry = {}
        for s in specs:
            _, ratios, pearson, align = results[s.label]
            e = {"pca_explained_variance": [float(x) for x in ratios[layer]],
                 "pearson": {f"{a}-{b}": r for lyr, a, b, r in pearson if lyr == layer}}
            if pivot is not None:
                rows = [r for r in align if r.layer == layer]
                e["alignment"] = {r.lang: {m: getattr(r, m) for m in AlignmentRow.METRICS} for r in rows}
                e["alignment_mean"] = {m: float(np.mean([getattr(r, m) for r in rows])) for m in AlignmentRow.METRICS}
            entry[s.label] = e
        for s in specs[1:]:
            d = {"pearson": {k: v - entry[ref]["pearson"][k] for k, v in entry[s.label]["pearson"].items()}}
            if pivot is not None:
                d["alignment_mean"] = {k: v - entry[ref]["alignment_mean"][k]
                                       for k, v in entry[s.label]["alignment_mean"].items()}
            entry[f"{s.label}-minus-{ref}"] = d
        summary["per_layer"][str(layer)] = entry
    if output is not None:
        write_json(output / "summary.json", summary)
    log.info("%s", format_summary(summary, specs, pivot))
    if output is not None:
        log.info("geometry: %s", output / "summary.json")
    return GeometryResult(summary, [dict(zip(pearson_header, r)) for r in pearson_rows],
                          [dict(zip(align_header, r)) for r in align_rows], states, output)


def mexa_outputs(output: Path | None, specs, states, pivot: str, how: str) -> dict:
    """mexa.csv (model, layer, lang, mexa; with an output folder) and the summary's `mexa` entry: per
    model and language the per-layer scores and their mean/max over layers, and each adapter's
    difference from the first model."""
    scores = {s.label: mexa.mexa_scores(center(states[s.label], how), pivot) for s in specs}
    if output is not None:
        write_csv(output / "mexa.csv", ["model", "layer", "lang", "mexa"],
                  [[label, layer, lang, v] for label, per in scores.items() for lang, e in per.items()
                   for layer, v in enumerate(e["per_layer"])], CSV_FLOATS)
    ref = specs[0].label
    delta = {f"{s.label}-minus-{ref}": {lang: {k: e[k] - scores[ref][lang][k] for k in ("mean", "max")}
                                        for lang, e in scores[s.label].items()} for s in specs[1:]}
    return {"pivot": pivot, "center": how, "pooled_layers": "1..L (layer 0, the embeddings, not pooled)",
            "models": scores, "delta": delta}


def format_summary(summary: dict, specs, pivot) -> str:
    lines = []
    for layer, entry in summary["per_layer"].items():
        for s in specs:
            e = entry[s.label]
            pairs = "  ".join(f"{k} {v:+.2f}" for k, v in e["pearson"].items() if pivot is None or k.startswith(pivot))
            line = f"layer {layer:>3} {s.label:<16} pearson: {pairs or '-'}"
            if pivot is not None:
                m = e["alignment_mean"]
                line += (f" | cos par {m['cos_parallel']:.3f} non {m['cos_nonparallel']:.3f}"
                         f" | retrieval {m['retrieval_acc']:.3f}")
            lines.append(line)
    for label, per in ((summary.get("mexa") or {}).get("models") or {}).items():
        lines.append(f"MEXA {label:<16} " + "  ".join(f"{lang} {e['mean']:.2f}/{e['max']:.2f}" for lang, e in per.items())
                     + "  (mean/max over layers)")
    return "\n".join(lines)


# ============================================================================= plots
def plot_pca(path: Path, layer: int, langs, specs, results) -> Path:
    from polyalign.reporting import plots
    return plots.save(pca_figure(layer, langs, specs, results), path)


def pca_figure(layer: int, langs, specs, results):
    """The 2-D PCA scores of a layer, per model, coloured by language and by item index (a Figure)."""
    from polyalign.reporting import plots
    colors = plots.lang_colors(langs)
    with plots.style():
        fig = plots.figure(figsize=(10, 4.2 * len(specs)))
        axes = fig.subplots(len(specs), 2, squeeze=False)
        for row, s in enumerate(specs):
            scores = results[s.label][0][layer]
            ratio = results[s.label][1][layer]
            ax_l, ax_i = axes[row]
            for lang in langs:
                z = scores[lang]
                y = z[:, 1] if z.shape[1] > 1 else np.zeros(len(z))
                ax_l.scatter(z[:, 0], y, s=8, alpha=0.6, color=colors[lang], label=lang, lw=0)
                sc = ax_i.scatter(z[:, 0], y, s=8, alpha=0.7, c=np.arange(len(z)), cmap="viridis", lw=0)
            ax_l.legend(markerscale=2, fontsize=7, ncol=2)
            pct = [f"{100 * r:.0f}%" for r in ratio] + ["", ""]
            for ax, what in ((ax_l, "language"), (ax_i, "item index")):
                ax.set_title(f"{s.label} · layer {layer} · by {what}")
                ax.set_xlabel(f"PC1 ({pct[0]})")
                ax.set_ylabel(f"PC2 ({pct[1]})")
            fig.colorbar(sc, ax=ax_i, label="item index")
        fig.tight_layout()
    return fig


def plot_pearson(path: Path, layer: int, langs, specs, results) -> Path:
    from polyalign.reporting import plots
    return plots.save(pearson_figure(layer, langs, specs, results), path)


def pearson_figure(layer: int, langs, specs, results):
    """Pearson r between languages at a layer, per model, and each model's difference from the first (a Figure)."""
    from polyalign.reporting import plots
    k = len(langs)

    def matrix(label):
        m = np.eye(k)
        for lyr, a, b, r in results[label][2]:
            if lyr == layer:
                i, j = langs.index(a), langs.index(b)
                m[i, j] = m[j, i] = r
        return m

    mats = [(s.label, matrix(s.label), False) for s in specs]
    mats += [(f"{s.label} − {specs[0].label}", mats[i + 1][1] - mats[0][1], True) for i, s in enumerate(specs[1:])]
    with plots.style():
        fig = plots.figure(figsize=(3.9 * len(mats) + 0.6, 3.7))
        axes = fig.subplots(1, len(mats), squeeze=False)
        for ax, (title, m, diff) in zip(axes[0], mats):
            lim = max(float(np.nanmax(np.abs(m))), 1e-6) if diff else 1.0
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks(range(k), langs, fontsize=8)
            ax.set_yticks(range(k), langs, fontsize=8)
            ax.grid(False)
            if k <= 12:
                for i in range(k):
                    for j in range(k):
                        if np.isfinite(m[i, j]):
                            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if abs(m[i, j]) > 0.6 * lim else "black")
            ax.set_title(f"{title} · layer {layer}" + (" (Δr)" if diff else " (r)"), fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
    return fig


def plot_alignment(path: Path, langs, specs, results, pivot, how) -> Path:
    from polyalign.reporting import plots
    return plots.save(alignment_figure(langs, specs, results, pivot, how), path)


def alignment_figure(langs, specs, results, pivot, how):
    """Retrieval accuracy, cosine gap and Pearson r with the pivot across layers, per language (a Figure)."""
    from matplotlib.ticker import MaxNLocator

    from polyalign.reporting import plots
    colors = plots.lang_colors(langs)
    panels = (["retrieval_acc", "cos_gap"] if pivot is not None else []) + ["pearson"]
    titles = {"retrieval_acc": f"retrieval accuracy into {pivot}",
              "cos_gap": f"cos(parallel) − cos(non-parallel), {how}-centred",
              "pearson": f"Pearson r of PC1 scores with {pivot or langs[0]}"}
    ref = pivot or langs[0]
    with plots.style():
        fig = plots.figure(figsize=(4.6 * len(panels), 3.6))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for i, s in enumerate(specs):
            ls = plots.model_linestyle(i)
            _, _, pearson, align = results[s.label]
            for lang in langs:
                if lang == ref:
                    continue
                for ax, panel in zip(axes[0], panels):
                    if panel == "pearson":
                        pts = [(lyr, r) for lyr, a, b, r in pearson if {a, b} == {ref, lang}]
                    else:
                        pts = [(r.layer, r.retrieval_acc if panel == "retrieval_acc"
                                else r.cos_parallel - r.cos_nonparallel) for r in align if r.lang == lang]
                    x, y = zip(*pts)
                    ax.plot(x, y, ls, color=colors[lang], lw=1.3,
                            label=f"{lang} · {s.label}" if len(specs) > 1 else lang)
        for ax, panel in zip(axes[0], panels):
            ax.set_title(titles[panel], fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel == "retrieval_acc":
                ax.set_ylim(0, 1.02)
        axes[0, -1].legend(fontsize=7, ncol=2 if len(specs) > 1 else 1)
        fig.tight_layout()
    return fig
