"""What the analysis commands (lens, geometry) share: the models they compare, their prompts'
texts, the hash that keys their per-(model, language) caches, and their CSV and npz files."""
from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.store import atomic_path, content_hash, safe_name
from polyalign.tasks import LABEL_MODES, Task


# ============================================================================= shared: models
@dataclass(frozen=True)
class AnalysedModel:
    """One model to analyse: `label` names it in every output ("base", or the adapter folder's name)."""
    label: str
    model: str
    adapter: str | None = None


def model_specs(model: str, adapter: str | None = None, compare_adapter=None) -> list[AnalysedModel]:
    """`--model M [--adapter A] [--compare-adapter B ...]` -> [M(+A), M+B, ...]; labels are unique."""
    compare = [compare_adapter] if isinstance(compare_adapter, str) else list(compare_adapter or [])
    adapters = [adapter, *compare]
    for a in adapters:
        if a is not None and not Path(a, "adapter_config.json").exists():
            raise PolyalignError(f"no PEFT adapter at {a!r} (adapter_config.json missing)")
    return [AnalysedModel(label, model, a) for label, a in zip(model_labels(adapters), adapters)]


def model_labels(adapters: list) -> list[str]:
    """The label of each model (None: the base): "base", or the adapter folder's name; made unique."""
    labels, seen = [], set()
    for a in adapters:
        label = "base" if a is None else safe_name(Path(a).resolve().name, keep=r"\w.+-", fallback="adapter")
        base, k = label, 2
        while label in seen:
            label, k = f"{base}-{k}", k + 1
        seen.add(label)
        labels.append(label)
    return labels


def _file_fingerprint(path: Path) -> list:
    return [path.name, path.stat().st_size, int(path.stat().st_mtime)]


def model_fingerprint(spec: AnalysedModel) -> dict:
    """What identifies the weights: a local folder's config and weight files, a hub id, an adapter's bytes."""
    fp: dict = {"model": spec.model}
    root = Path(spec.model)
    if root.is_dir():
        cfg = root / "config.json"
        fp["config"] = content_hash(cfg.read_text("utf-8")) if cfg.exists() else None
        fp["weights"] = [_file_fingerprint(p) for p in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))]
    if spec.adapter:
        import hashlib
        h = hashlib.sha256()
        for p in sorted(Path(spec.adapter).iterdir()):
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "adapter_config.json"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
        fp["adapter"] = h.hexdigest()[:16]
    return fp


def release_memory() -> None:
    """After the caller dropped its references to a model: free it before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================= shared: prompts
# Prompt preparation and batching live in polyalign.engine.prompts (shared with the evaluator).
def prompt_texts(task: Task, lang: str, mode: str, items: list[dict]) -> list[str]:
    prefix = task.demo_prefix(lang, mode)
    return [prefix + task.query(lang, it) for it in items]


# ============================================================================= shared: files
CSV_FLOATS = ".6g"   # the format of the numbers in the analyses' CSV files (store.write_csv's float_format)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez into a temporary file beside `path`, fsync, then rename over it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_items(task: Task, langs: list[str], data, limit, trust_file_labels) -> tuple[dict[str, list[dict]], list[str]]:
    from polyalign.data import load_data
    if limit is not None and limit <= 0:
        raise PolyalignError("--limit must be a positive number")
    loaded = load_data(task, langs, data, limit, trust_file_labels)
    return loaded.items, loaded.issues


def check_mode(mode: str) -> None:
    if mode not in LABEL_MODES:
        raise PolyalignError(f"unknown label mode {mode!r}; use {', '.join(LABEL_MODES)}")


def cache_key(spec: AnalysedModel, cfg, task_hash: str, lang: str, texts: list[str], **extra) -> str:
    """Hash of what determines one (model, language)'s results, for lens parts and geometry states:
    the weights (and adapter), dtype, context limit, task file, language, label mode, prompts, `extra`."""
    from polyalign.models import resolve_device, resolve_dtype
    dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device)))
    return content_hash({"weights": model_fingerprint(spec), "dtype": dtype, "max_length": cfg.max_length,
                         "task": task_hash, "lang": lang, "labels": cfg.labels, "prompts": content_hash(texts),
                         **extra})


# ============================================================================= shared: options
def adapter_option():
    return option(None, help="PEFT LoRA adapter folder for --model")


def compare_adapter_option():
    return option([], repeatable=True, metavar="DIR",
                  help="also analyse --model with this adapter (repeatable); outputs compare them with the first "
                       "model (the base, or --adapter)")


def analysis_task_option():
    return option("amazon_polarity", help="task name or task YAML path")


def models_to_analyse(cfg, model=None, tokenizer=None):
    """(cfg, the models to analyse, the loaded model or None) of an analysis command: `cfg.model` with
    cfg.adapter and each of cfg.compare_adapter, or the loaded `model` with its `tokenizer`."""
    if model is None:
        return cfg, model_specs(cfg.model, cfg.adapter, cfg.compare_adapter), None
    from polyalign.models import from_loaded
    if cfg.adapter or cfg.compare_adapter:
        raise PolyalignError("adapter= and compare_adapter= apply to a model name; wrap a loaded model "
                             "with peft.PeftModel.from_pretrained(model, adapter) instead")
    preloaded = from_loaded(model, tokenizer)
    label = "base" if preloaded.adapter is None else "adapter"
    return replace(cfg, model=preloaded.name), [AnalysedModel(label, preloaded.name, None)], preloaded


class SummaryView(Mapping):
    """A typed analysis result that also reads like the summary.json it wrote (`result["reading"]`)."""

    def __getitem__(self, key):
        return self.summary[key]

    def __iter__(self):
        return iter(self.summary)

    def __len__(self):
        return len(self.summary)
