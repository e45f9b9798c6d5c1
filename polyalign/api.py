"""polyalign from Python: the commands as functions with keyword arguments and typed results.

    import polyalign as pa
    lm = pa.load_model("gemma-3-270m")
    result = pa.evaluate(lm, langs=["en", "de"], limit=8)      # in memory: nothing is written
    result.to_pandas()

Each function checks its inputs as the command line does and raises `PolyalignError` with the same
one-line message. Nothing is printed: progress bars are optional (`progress=False`), and what the
command line shows (tables, data issues) is logged through `logging` ("polyalign" loggers); the
results are returned. Lists are Python lists; comma strings are accepted too.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from polyalign.errors import PolyalignError

if TYPE_CHECKING:   # the heavy modules (torch) load only when a function runs
    from polyalign.analysis.geometry import GeometryResult
    from polyalign.analysis.lens import LensResult
    from polyalign.analysis.neurons import NeuronsResult
    from polyalign.data import LoadedData
    from polyalign.evaluation.evaluate import EvalResult
    from polyalign.models import LoadedModel
    from polyalign.tasks import Task

__all__ = ["load_model", "load_task", "load_data", "evaluate", "prepare_pairs", "train", "logit_lens",
           "geometry", "neurons", "report", "PreparedPairs", "TrainResult", "ReportResult"]


# ----------------------------------------------------------------------------- arguments
def _comma(value, name: str) -> str | None:
    """A list of names (or Task objects) -> the comma string the configs hold; strings pass through."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        parts = [getattr(v, "path", v) for v in value]          # a Task stands for its file
        if not all(isinstance(p, (str, os.PathLike)) for p in parts):
            raise PolyalignError(f"{name}: give names (strings), not {[type(p).__name__ for p in parts]}")
        return ",".join(os.fspath(p) for p in parts)
    raise PolyalignError(f"{name}: give a list of names or a comma string, not {type(value).__name__}")


def _path(value, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise PolyalignError(f"{name}: give a path, not {type(value).__name__}")


def _model_and_name(model, tokenizer):
    """(loaded model or None, model name): a name or folder is loaded by the command itself."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise PolyalignError("a tokenizer goes with a loaded model, not with a model name")
        return None, os.fspath(model)
    return model, None


def _config(cls, **kwargs):
    """cls(**kwargs), with an unknown keyword refused in one line (and the nearest one suggested)."""
    known = {f.name for f in fields(cls)}
    for key in kwargs:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise PolyalignError(f"unknown option {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    return cls(**kwargs)


def _command_config(cls, model, tokenizer, options: dict):
    """(the command's config, the loaded model or None) from keyword options. Names, defaults and
    allowed values are the config dataclass's (written once, there): only what Python callers pass
    differently is converted here (lists for comma-list options, paths, Task objects). Without
    `output` the command computes in memory."""
    from polyalign import config as C

    loaded, name = _model_and_name(model, tokenizer)
    values = {"output": None}
    if name is not None:
        values["model"] = name
    for key, value in options.items():
        try:
            s = C.spec(cls, key)
        except KeyError:
            return None, _config(cls, **{key: value})      # the one-line unknown-option error
        if isinstance(value, os.PathLike) or (s.base is str and hasattr(value, "path")):
            value = os.fspath(getattr(value, "path", value))          # a Task stands for its file
        if s.is_list and isinstance(value, (str, os.PathLike)):
            value = [os.fspath(value)]
        elif s.is_list and value is not None:
            value = [os.fspath(getattr(v, "path", v)) for v in value]
        elif s.base is str and isinstance(value, (list, tuple)):
            value = _comma(value, key)
        values[key] = value
    return _config(cls, **values), loaded


# ----------------------------------------------------------------------------- models, tasks, data
def load_model(name: str | os.PathLike = "gemma-3-270m", *, dtype: str = "auto", device: str = "auto",
               adapter: str | os.PathLike | None = None, progress: bool = True) -> "LoadedModel":
    """Load a causal LM and its tokenizer: a Hugging Face id, a local folder, or the embedded
    `gemma-3-270m`; `adapter` adds a PEFT LoRA without merging it.

    >>> lm = pa.load_model("gemma-3-270m", dtype="fp32")
    >>> lm.model, lm.tokenizer, lm.device, lm.dtype
    """
    from polyalign.models import load_model as _load
    return _load(os.fspath(name), dtype, device, _path(adapter, "adapter"), progress=progress)


def load_task(name_or_path: str | os.PathLike) -> "Task":
    """A bundled task (`amazon_polarity`, `snli`, `paws`) or a task YAML file.

    >>> task = pa.load_task("snli")
    >>> task.classes, task.prompt("de", {"premise": "...", "hypothesis": "..."}, "english")
    """
    from polyalign.tasks import load_task as _load
    return _load(os.fspath(name_or_path))


def load_data(task: "str | Task", langs: list[str] | str = "all", *, data: str | os.PathLike | None = None,
              limit: int | None = None, trust_file_labels: bool = False) -> "LoadedData":
    """A task's items per language (`.items[lang]`, a list of dicts) and the issues found (`.issues`).
    `data` as for `polyalign evaluate --data` (None: the bundled sets); `limit` keeps N items per
    language, balanced over the classes and parallel across languages.

    >>> d = pa.load_data("amazon_polarity", ["en", "de"], limit=8)
    >>> d.items["de"][0]["review"], d.issues
    """
    from polyalign.data import load_data as _load
    from polyalign.languages import parse_langs
    if limit is not None and limit <= 0:
        raise PolyalignError("limit must be a positive number")
    task = task if hasattr(task, "classes") else load_task(task)
    return _load(task, parse_langs(_comma(langs, "langs")), _path(data, "data"), limit, trust_file_labels)


# ----------------------------------------------------------------------------- evaluation
def evaluate(model=None, tokenizer=None, **options) -> "EvalResult":
    """Few-shot evaluation with constrained decoding, as `polyalign evaluate`.

    `model` is a name (Hugging Face id, folder, `gemma-3-270m`; then `dtype`, `device`, `adapter`
    apply), a `load_model` result, or a loaded transformers / PEFT model with its `tokenizer` (used
    as it is, on its device). Without `output` nothing is written; with a folder the same files as
    the command line are written and a rerun resumes. Returns an `EvalResult`: `.rows`,
    `.averages`, `.samples` (one dict per item), `.to_pandas()`, `.to_dict()` (= results.json).
    `calibration` ("contextual" or "pmi"; either stores both) adds calibrated scores (see README).
    Options are those of `polyalign evaluate` (`EvalConfig`: names, defaults and allowed values are
    written there once), by keyword; list options take Python lists. `model=None`: the default model.

    >>> result = pa.evaluate("gemma-3-270m", langs=["en", "de"], labels=["english", "native"], limit=8)
    >>> result.to_pandas()[["lang", "labels", "acc"]]
    """
    from polyalign.evaluation.evaluate import EvalConfig, evaluate as _evaluate
    cfg, loaded = _command_config(EvalConfig, model, tokenizer, options)
    return _evaluate(cfg, model=loaded, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- training
@dataclass
class PreparedPairs:
    """A `prepare_pairs` folder: train.jsonl, val.jsonl, the LLaMA-Factory export and manifest.json."""
    output: Path
    manifest: dict

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    def pairs(self) -> tuple[list[dict], list[dict]]:
        """(train, val) records: id, source, target, input, output."""
        from polyalign.training.prepare import load_prepared
        return load_prepared(self.output)


def prepare_pairs(*, sources: list[str] | str, output: str | os.PathLike, task: str = "snli", target: str = "en",
                  per_language: int | None = 10000, data: str | os.PathLike | None = None,
                  translator: str | None = None, progress: bool = True, **options) -> PreparedPairs:
    """Question-alignment training pairs (sources ⇒ target), as `polyalign prepare`; further options
    (fields, translation_cache, val_size, seed, batch_size, num_beams, device, dtype) by keyword.

    >>> pairs = pa.prepare_pairs(task="snli", sources=["zh", "de"], target="en", per_language=100,
    ...                          output="data/zhde-en")
    >>> pairs.counts["train"], pairs.pairs()[0][0]["input"]
    """
    from polyalign.training.prepare import PrepareConfig, prepare
    cfg = _config(PrepareConfig, task=task, sources=_comma(sources, "sources"), target=target,
                  output=_path(output, "output"), per_language=per_language, data=_path(data, "data"),
                  translator=translator, progress=progress, **options)
    return PreparedPairs(Path(cfg.output), prepare(cfg))


@dataclass
class TrainResult:
    """A trained LoRA adapter: its folder (load it with `load_model(..., adapter=result.adapter)`)
    and the training summary `train` wrote (losses, tokens/s, settings)."""
    output: Path
    summary: dict

    @property
    def adapter(self) -> Path:
        return self.output


def train(data: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
          config: str | os.PathLike | None = None, resume: bool = False, merge: bool = False,
          progress: bool = True, **hyperparameters) -> TrainResult:
    """LoRA instruction tuning on question-alignment pairs, as `polyalign train`. `hyperparameters`
    are the keys of train_defaults.yaml (lr, epochs, max_steps, batch_size, lora_r, ...).

    >>> result = pa.train("data/zhde-en", "adapters/zhde-en", model="gemma-3-270m", max_steps=20)
    >>> pa.evaluate("gemma-3-270m", adapter=result.adapter, langs=["zh", "de", "sw"])
    """
    from polyalign.training.train import TrainConfig, train as _train
    cfg = _config(TrainConfig, data=_path(data, "data"), output=_path(output, "output"), model=model,
                  config=_path(config, "config"), resume=resume, merge=merge, progress=progress,
                  **hyperparameters)
    return TrainResult(Path(cfg.output), _train(cfg))


# ----------------------------------------------------------------------------- analysis
def logit_lens(model=None, tokenizer=None, **options) -> "LensResult":
    """The logit lens at the answer position, per layer and language, as `polyalign lens`: the
    probability of the target-language answer, its English twin, all answers of each, the entropy.
    `model` as for `evaluate`; `compare_adapter` (with a model name) adds models to compare. Other
    options (dtype, device, batch_tokens, max_length, keep_overlapping, trust_file_labels,
    recompute) by keyword. Without `output` nothing is written.

    >>> lens = pa.logit_lens("gemma-3-270m", langs=["zh", "ja"], limit=8)
    >>> lens["reading"]["base"]["zh"]["latent_english"]
    >>> lens.figure("zh")                         # a matplotlib Figure; shown inline in Jupyter
    """
    from polyalign.analysis.lens import LensConfig, run_lens
    cfg, loaded = _command_config(LensConfig, model, tokenizer, options)
    return run_lens(cfg, model=loaded, tokenizer=tokenizer)


def geometry(model=None, tokenizer=None, **options) -> "GeometryResult":
    """Hidden-state geometry of parallel items, as `polyalign geometry`: PCA per layer, Pearson of
    1-D PCA scores for every language pair, parallel-vs-non-parallel cosine and retrieval into the
    pivot language. `model` as for `evaluate`. Other options (pooling, layers, pivot, center,
    states_dtype, dtype, device, batch_tokens, max_length, trust_file_labels, recompute) by keyword.

    >>> geo = pa.geometry("gemma-3-270m", langs=["en", "de", "sw"], limit=12)
    >>> geo.to_pandas("alignment").query("lang == 'sw'")
    """
    from polyalign.analysis.geometry import GeometryConfig, run_geometry
    cfg, loaded = _command_config(GeometryConfig, model, tokenizer, options)
    return run_geometry(cfg, model=loaded, tokenizer=tokenizer)


def neurons(model=None, tokenizer=None, **options) -> "NeuronsResult":
    """Language-specific FFN neurons (LAPE, Tang et al. 2024), as `polyalign neurons`: per-layer
    counts per language, overlaps between languages, and with `compare_adapter` (with a model name)
    each language's neurons base vs trained. `model` as for `evaluate`. Other options (tasks,
    max_sequence_tokens, filter_percentile, top_rate, activation_percentile, seen, deactivate and the
    eval_* options, dtype, device, batch_tokens, recompute) by keyword. Without `output` nothing is
    written.

    >>> found = pa.neurons("gemma-3-270m", langs=["en", "zh"], tokens_per_language=4000)
    >>> found["models"]["base"]["per_language"]
    >>> found.selections["base"].neurons[1][5]        # zh's neurons in layer 5
    """
    from polyalign.analysis.neurons import NeuronsConfig, run_neurons
    cfg, loaded = _command_config(NeuronsConfig, model, tokenizer, options)
    return run_neurons(cfg, model=loaded, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- report
@dataclass
class ReportResult:
    """The report of a `polyalign run` folder: report.md and the self-contained report.html."""
    run: Path
    html: Path

    @property
    def markdown(self) -> Path:
        return self.run / "report.md"


def report(run_dir: str | os.PathLike, *, bootstrap: int | None = None, seed: int | None = None) -> ReportResult:
    """(Re)build the paper-style report of a run folder, as `polyalign report`.

    >>> rep = pa.report("runs/mistral7b-amazon-table1")
    >>> rep.html
    """
    from polyalign.reporting.report import build_report
    run = Path(_path(run_dir, "run_dir"))
    return ReportResult(run, Path(build_report(run, bootstrap, seed)))
