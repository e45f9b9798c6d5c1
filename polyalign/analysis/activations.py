"""FFN neurons of a decoder: find each layer's MLP, count how often each neuron fires, switch neurons off.

A neuron is one column of the MLP's hidden layer. Its activation is, for a gated MLP (Llama, Mistral,
Qwen2, Gemma3: down(act(gate(x)) * up(x))), the gate activation act_fn(gate_proj(x)); for a plain MLP
(fc1/fc2, GPT-2's c_fc/c_proj) the hidden activation act(fc1(x)). A neuron "fires" on a token when
that activation is positive (Tang et al. 2024).

Counting uses forward hooks on the pre-activation module (gate_proj / fc1 / c_fc; a PEFT LoRA
wrapper there is hooked as a whole, so an adapter's change is seen) and runs text through
`engine.runner.PrefixRunner`: on the packed path the hooked tensors hold real tokens only; on the
padded path the hook is told which positions are real, so padding is never counted. The shared
prefix (the BOS token) runs with counting off: it is the same token in every language.

Switching neurons off is a forward pre-hook on the down projection that zeroes those columns of its
input, which is exactly removing those columns of down_proj (tested against that).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from polyalign.engine.model_parts import decoder_of, unwrap
from polyalign.errors import PolyalignError

# (pre-activation module, activation attribute(s), down projection, gated?) in the order tried.
_LAYOUTS = (
    ("gate_proj", ("act_fn",), "down_proj", True),            # llama, mistral, qwen2/3, gemma, gemma3
    ("fc1", ("activation_fn", "act_fn", "act"), "fc2", False),  # phi, and others
    ("c_fc", ("act",), "c_proj", False),                      # gpt2
)


# Activations whose output is positive exactly where their input is (x·Φ(x), x·σ(x), ReLU, ...): for
# these the hook counts `pre(x) > 0` and skips recomputing the activation, which cost about as much
# as the compare and the sum together (bench_neurons: 1.27x a plain forward with it on Gemma-3-270M).
SIGN_PRESERVING = {"GELU", "GELUActivation", "GELUTanh", "FastGELUActivation", "NewGELUActivation",
                   "AccurateGELUActivation", "QuickGELUActivation", "ClippedGELUActivation", "SiLU",
                   "SiLUActivation", "ReLU", "ReLU6", "LeakyReLU", "Mish", "MishActivation", "Tanh",
                   "Hardswish", "LinearActivation"}


CPU_ROWS = 256     # rows per compare-and-sum on a CPU (see ActivationCounter._hook)


@dataclass
class MLPParts:
    """Where one layer's neurons live."""
    mlp: torch.nn.Module
    pre: torch.nn.Module          # its output, through `act`, is the activation we count
    act: object                   # the activation function (a module or a callable)
    down: torch.nn.Module         # its input holds the neurons' contributions (times up_proj if gated)
    size: int                     # neurons in this layer
    gated: bool

    @property
    def sign_preserving(self) -> bool:
        act = self.act
        if isinstance(act, torch.nn.LeakyReLU) and act.negative_slope < 0:
            return False
        return type(act).__name__ in SIGN_PRESERVING

    def fired(self, pre_output: torch.Tensor) -> torch.Tensor:
        """Where the activation is positive (bool, the shape of `pre_output`)."""
        return pre_output > 0 if self.sign_preserving else self.act(pre_output) > 0


def decoder_layers(model) -> list:
    dec = decoder_of(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(dec, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise PolyalignError(f"neurons: cannot find the decoder layers of {type(dec).__name__} "
                         f"(looked for .layers, .h, .blocks)")


def _out_features(module) -> int:
    base = getattr(module, "base_layer", module)      # a PEFT LoRA wrapper keeps the original here
    weight = getattr(base, "weight", None)
    if hasattr(base, "out_features"):
        return int(base.out_features)
    if hasattr(base, "nf"):                            # transformers' Conv1D (GPT-2)
        return int(base.nf)
    if weight is not None:
        return int(weight.shape[0])
    raise PolyalignError(f"neurons: cannot tell the width of {type(module).__name__}")


def mlp_parts(model) -> list[MLPParts]:
    """One MLPParts per decoder layer; a layer whose MLP has none of the known layouts is one line."""
    model_type = getattr(unwrap(model).config, "model_type", "?")
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        found = None
        for pre, acts, down, gated in _LAYOUTS if mlp is not None else ():
            act = next((getattr(mlp, a) for a in acts if callable(getattr(mlp, a, None))), None)
            if hasattr(mlp, pre) and hasattr(mlp, down) and act is not None and (not gated or hasattr(mlp, "up_proj")):
                found = MLPParts(mlp, getattr(mlp, pre), act, getattr(mlp, down), _out_features(getattr(mlp, pre)), gated)
                break
        if found is None:
            what = type(mlp).__name__ if mlp is not None else f"{type(layer).__name__} (no .mlp)"
            raise PolyalignError(f"neurons: the MLP module {what} of layer {i} ({model_type}) is not recognised; "
                                 f"supported: gate_proj/up_proj/down_proj with act_fn, fc1/fc2, c_fc/c_proj")
        out.append(found)
    return out


class ActivationCounter:
    """Per layer, per neuron: how many counted tokens had a positive activation."""

    def __init__(self, parts: list[MLPParts], device):
        self.parts = parts
        self.counts = [torch.zeros(p.size, dtype=torch.long, device=device) for p in parts]
        self.tokens = 0
        self.valid: torch.Tensor | None = None   # [B, W] real positions of a padded batch; None = all real
        self.enabled = False

    def _hook(self, i: int):
        def count(module, inputs, output):
            if not self.enabled:
                return
            rows = output.reshape(-1, output.shape[-1])
            if self.valid is not None:
                rows = rows[self.valid.reshape(-1)]
            # On a CPU, compare and sum a few hundred rows at a time: they stay in cache, where one
            # pass over a batch's [8192, 2048] gate output took ~5x as long (its bool sum over rows
            # alone cost more than the compare). One pass on a GPU.
            chunk = CPU_ROWS if rows.device.type == "cpu" else len(rows) or 1
            for part in rows.split(chunk):
                self.counts[i] += self.parts[i].fired(part).sum(0, dtype=torch.int32)
        return count

    @contextlib.contextmanager
    def hooked(self):
        handles = [p.pre.register_forward_hook(self._hook(i)) for i, p in enumerate(self.parts)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def result(self) -> np.ndarray:
        """[layers, neurons] int64 (layers of unequal width are padded with zeros)."""
        width = max(p.size for p in self.parts)
        out = np.zeros((len(self.parts), width), dtype=np.int64)
        for i, c in enumerate(self.counts):
            out[i, :len(c)] = c.cpu().numpy()
        return out


def count_activations(model, runner, prefix_ids: list[int], sequences: list[list[int]], bar=None):
    """Run `sequences` (token ids, each after `prefix_ids`) and count positive activations.
    Returns (counts [layers, neurons] int64, counted tokens). The prefix is not counted."""
    counter = ActivationCounter(mlp_parts(model), runner.device)
    with counter.hooked(), torch.inference_mode():
        prefix = runner.prefix(list(prefix_ids))           # counting is off here
        for batch in runner.batches([len(s) for s in sequences]):
            suffixes = [sequences[i] for i in batch]
            if runner.packed:
                counter.valid = None                        # packed: the row holds real tokens only
            else:
                width = max(len(s) for s in suffixes)
                lengths = torch.tensor([len(s) for s in suffixes], device=runner.device)
                counter.valid = torch.arange(width, device=runner.device)[None, :] < lengths[:, None]
            counter.enabled = True
            try:
                runner.forward(prefix, suffixes)
            finally:
                counter.enabled = False
            counter.tokens += sum(len(s) for s in suffixes)
            if bar is not None:
                bar.update(sum(len(s) for s in suffixes))
    return counter.result(), counter.tokens


@contextlib.contextmanager
def deactivated(model, neurons: dict[int, list[int]] | list[list[int]]):
    """Within the block, the given neurons (layer -> indices) output zero: the down projection's input
    columns are zeroed, which removes those columns of down_proj from the MLP's output."""
    parts = mlp_parts(model)
    per_layer = dict(enumerate(neurons)) if isinstance(neurons, list) else dict(neurons)
    handles = []

    def zero(idx):
        def pre_hook(module, args):
            x = args[0]
            return (x.index_fill(-1, idx.to(x.device), 0), *args[1:])
        return pre_hook

    for layer, idx in per_layer.items():
        if len(idx):
            t = torch.as_tensor(sorted(int(i) for i in idx), dtype=torch.long)
            handles.append(parts[int(layer)].down.register_forward_pre_hook(zero(t)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- text per language
def language_texts(langs: list[str], data: str | None = None, tasks: str | None = None) -> dict[str, list[str]]:
    """lang -> texts, in a fixed order: the task items of `data` (each item's fields joined by a
    newline) for every task, then, with the bundled sets (data None), the bundled question pool.
    A `data` pattern or hf: source whose records have a `text` field is read as a plain corpus."""
    from polyalign.data import load_data, read_records
    from polyalign.tasks import parse_tasks

    if data is not None and ("{lang}" in data or data.startswith("hf:")):
        corpus = _corpus_texts(langs, data, read_records)
        if corpus is not None:
            return corpus
    task_list = parse_tasks(tasks or _bundled_task_names())
    out: dict[str, list[str]] = {lang: [] for lang in langs}
    for task in task_list:
        have = [lang for lang in langs if data is not None or _has_bundled(task.name, lang)]
        if not have:
            continue
        loaded = load_data(task, have, data)
        for lang in have:
            out[lang] += ["\n".join(it[f] for f in task.fields) for it in loaded.items[lang]]
    if data is None:
        for task in task_list:
            for lang in langs:
                out[lang] += _pool_texts(task, lang, read_records)
    return out


def _bundled_task_names() -> str:
    from importlib.resources import files
    root = files("polyalign").joinpath("resources/data")
    return ",".join(sorted(p.name for p in root.iterdir() if p.is_dir()))


def _has_bundled(task: str, lang: str) -> bool:
    from importlib.resources import files
    return files("polyalign").joinpath(f"resources/data/{task}/{lang}.jsonl").is_file()


def _pool_texts(task, lang: str, read_records) -> list[str]:
    from importlib.resources import files
    path = files("polyalign").joinpath(f"resources/questions/{task.name}/{lang}.jsonl")
    if not path.is_file():
        return []
    return ["\n".join(str(r[f]) for f in task.fields if f in r) for r in read_records(str(path))]


def _corpus_texts(langs, data, read_records) -> dict[str, list[str]] | None:
    """A plain text corpus ({lang} file pattern or hf:NAME[@SPLIT]) with a `text` field, else None."""
    out = {}
    for lang in langs:
        if data.startswith("hf:"):
            import datasets
            name, _, split = data[3:].partition("@")
            try:
                ds = datasets.load_dataset(name.format(lang=lang), split=split or "train")
            except Exception as e:   # hub errors come in many types
                raise PolyalignError(f"cannot load Hugging Face dataset {name.format(lang=lang)!r}: "
                                     f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
            if "text" not in ds.column_names:
                return None
            out[lang] = [str(t) for t in ds["text"]]
        else:
            records = read_records(data.format(lang=lang))
            if records and "text" not in records[0]:
                return None
            out[lang] = [str(r.get("text", "")) for r in records]
    return out


def token_sequences(tokenizer, texts: list[str], budget: int, max_len: int) -> list[list[int]]:
    """The texts' tokens (no special tokens), in order, each cut at `max_len`, until `budget` tokens
    are taken (the last one cut to fit). Deterministic, so a rerun takes exactly the same tokens."""
    out, total = [], 0
    for text in texts:
        if total >= budget:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        ids = ids[:budget - total]
        if ids:
            out.append(ids)
            total += len(ids)
    return out


def shared_prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before any text (BOS, or nothing): run once, not counted."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])
