"""`polyalign train`: LoRA instruction tuning on question-alignment pairs (the paper's recipe).

    polyalign train --model gemma-3-270m --data data/zhde-en --output adapters/zhde-en [key=value ...]

Defaults are the paper's (TrainConfig below): LoRA r=8, alpha=16, dropout 0 on q_proj and
v_proj; lr 5e-5, cosine schedule, 10% warmup; 3 epochs; an effective batch of 16 sequences; eval loss on
the validation split; cutoff 2048 tokens. The loss covers only the target side: one cross-entropy per
target token (output + eos), averaged over all target tokens of the 16 sequences of an optimizer step,
exactly as transformers' Trainer does with gradient accumulation.

Speed without changing those semantics:
- Each optimizer step takes 16 random examples, as a random sampler would. Within the step they are
  sorted by length and cut into micro-batches (so padding is minimal), and under several processes they
  are dealt out so that every process gets a similar number of tokens. How a step's examples are grouped
  into forward passes does not change its gradient: every micro-batch's summed token loss is divided by
  the step's total number of target tokens.
- Right padding with causal attention needs no attention mask: real tokens never see the padding.
- The vocabulary projection runs only at target positions, in chunks, and each chunk's gradient is taken
  during the forward pass, so the full [tokens x vocabulary] logits never exist (for Gemma's 262k
  vocabulary they would dominate time and memory). A check at start-up compares this loss with the
  model's own forward and falls back to the plain path if they disagree.
- bf16 autocast where the CPU (avx512_bf16 / AMX) or GPU supports it, with the frozen base in bf16 and the
  LoRA weights and optimizer state in fp32.

Runs unchanged on one CPU or GPU, or under `accelerate launch` (DDP; FSDP and DeepSpeed through an
accelerate config). Outputs: the PEFT adapter, train_log.jsonl, loss.png, config.yaml, summary.json,
checkpoints/ (for --resume) and, with --merge, a merged model in <output>/merged.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import random
import resource
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from polyalign import config as C
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.store import (RunRecord, append_lines, atomic_folder, atomic_path, claim_output, content_hash,
                             publish_folder, read_jsonl, write_atomic, write_json, write_jsonl)

# Keys that may differ between a run and its resumption (they change neither the data nor the maths).
NON_SEMANTIC = {"device", "threads", "save_steps", "save_total_limit"}
log = logging.getLogger(__name__)
STATUS = {"stderr": True}     # logging extra: the CLI shows train's status lines on stderr, as it always has
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainConfig:
    """The options of `polyalign train`. The hyper-parameters (from `model` on) default to the paper's
    LLaMA-Factory setting (Zhang et al. 2024, Sec. 3); `--config FILE` and `key=value` set any of them:
    defaults <- --config file <- fields set here (a field left at its default lets the file decide)
    <- key=value overrides (see resolve_config)."""
    data: str = option("", required=True, help="a `polyalign prepare` folder, or a .jsonl/.json file of "
                                               "{input, output} (or {input, answer}, or alpaca) records")
    output: str = option("", required=True, help="output folder for the adapter, logs and checkpoints")
    config: str | None = option(None, help="YAML file setting any of the hyper-parameters below (as key: value)")
    overrides: list[str] = option([], positional=True, metavar="key=value",
                                  help="override any setting, e.g. epochs=1 max_steps=20 lr=1e-4 (see docs/training.md)")
    resume: bool = option(False, help="continue from the last checkpoint in --output")
    merge: bool = option(False, help="also write the merged model to <output>/merged")
    progress: bool = C.progress_option()
    # ---- the hyper-parameters (the keys of --config, key=value and an experiment's `train:`)
    model: str = C.model_option()
    dtype: str = C.dtype_option("auto (bf16 where the CPU/GPU supports it, else fp16 on GPU / fp32), bf16, fp16, "
                                "fp32; the frozen base's dtype (LoRA weights and optimizer state stay fp32)")
    device: str = C.device_option("auto, cpu, cuda; under `accelerate launch` each process takes its own device")
    chat_template: bool = option(False, help="wrap the input in the tokenizer's chat template (for chat models)")
    # LoRA (peft): the paper's r=8, alpha=16 (LLaMA-Factory defaults), dropout 0, on q_proj and v_proj.
    lora_r: int = option(8, help="LoRA rank")
    lora_alpha: float = option(16, help="LoRA alpha (a whole number by default, fractions allowed)")
    lora_dropout: float = option(0.0, help="LoRA dropout")
    lora_target: list[str] = option(["q_proj", "v_proj"], help="modules LoRA adapts (comma list)")
    # Optimisation: AdamW, cosine schedule with 10% warmup, 3 epochs (the paper uses 1 for PAWS).
    lr: float = option(5.0e-5, help="AdamW learning rate")
    scheduler: str = option("cosine", choices=SCHEDULERS, help="learning-rate schedule after the warmup")
    warmup_ratio: float = option(0.1, help="share of the steps that warm up")
    epochs: float = option(3, help="epochs (a whole number by default, fractions allowed)")
    max_steps: int = option(0, help="> 0: stop after this many optimizer steps (the schedule spans them)")
    batch_size: int = option(16, help="effective batch: sequences per optimizer step, over all processes")
    micro_batch_size: int = option(4, help="sequences per forward pass per process (the paper: 4 x accumulation 4)")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    adam_epsilon: float = option(1.0e-8, help="AdamW epsilon")
    seed: int = option(42, help="seed of the LoRA init, the data order and the validation split")
    # Data
    cutoff: int = option(2048, help="tokens per example (input + output); longer ones are truncated and counted")
    val_ratio: float = option(0.05, help="held-out share when --data is a single file without a validation split")
    # Cadence (in optimizer steps). 0 = automatic: eval ~10 times per run, save ~20 times per run.
    logging_steps: int = option(10, help="log the training loss every N optimizer steps")
    eval_steps: int = option(0, help="validation loss every N steps (0: about 10 times per run)")
    save_steps: int = option(0, help="checkpoint every N steps (0: every 50 steps or 5% of the run, whichever comes first)")
    save_total_limit: int = option(2, help="checkpoints kept under <output>/checkpoints")
    # Speed and memory
    loss_chunk: int = option(0, help="target positions per chunk of the vocabulary projection (0 = by vocab size)")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass (less memory)")
    threads: int = option(0, help="CPU threads for torch (0 = torch's default)")


# TrainConfig fields that are not hyper-parameters: the run's inputs, outputs and switches.
RUN_FIELDS = ("data", "output", "config", "overrides", "resume", "merge", "progress")


def defaults() -> dict:
    """The hyper-parameters' defaults, in the order config.yaml lists them."""
    return {k: v for k, v in C.defaults(TrainConfig).items() if k not in RUN_FIELDS}


# ----------------------------------------------------------------------------- configuration
def apply_settings(cfg: TrainConfig, settings, origin: str) -> TrainConfig:
    """`cfg` with hyper-parameters set from a mapping (a --config file, key=value, an experiment's `train:`),
    each converted by its field's type; an unknown key or a bad value is one line naming it and `origin`."""
    known = list(defaults())
    try:
        return C.from_mapping(TrainConfig, settings, origin, base=cfg, keys=known, locate=lambda k: f"setting {k}")
    except C.UnknownKey as e:
        near = difflib.get_close_matches(e.key, known, n=1, cutoff=0.0)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise PolyalignError(f"unknown setting {e.key!r} in {origin}{hint}") from None


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> {key: YAML value}, in order."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PolyalignError(f"override {item!r}: use key=value, e.g. epochs=1")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out[key] = parsed
    return out


def _read_config_file(path_text: str) -> dict:
    path = Path(path_text)
    if not path.is_file():
        raise PolyalignError(f"config file not found: {path_text}")
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as e:
        raise PolyalignError(f"{path_text} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise PolyalignError(f"{path_text} must hold a mapping of settings")
    return raw


def resolve_config(cfg: TrainConfig) -> dict:
    """defaults <- --config file <- fields set on TrainConfig <- key=value overrides; validated."""
    base = defaults()
    layered = TrainConfig()
    if cfg.config:
        layered = apply_settings(layered, _read_config_file(cfg.config), cfg.config)
    changed = {k: getattr(cfg, k) for k in base if getattr(cfg, k) != base[k]}
    layered = apply_settings(layered, changed, "the config")
    layered = apply_settings(layered, parse_overrides(cfg.overrides), "the command line")
    hp = {k: getattr(layered, k) for k in base}
    _validate(hp)
    return hp


def _validate(hp: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise PolyalignError(msg)
    need(hp["lora_r"] > 0, "lora_r must be positive")
    need(0 <= hp["lora_dropout"] < 1, "lora_dropout must be in [0, 1)")
    need(hp["lr"] > 0, "lr must be positive")
    need(hp["scheduler"] in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}")
    need(0 <= hp["warmup_ratio"] < 1, "warmup_ratio must be in [0, 1)")
    need(hp["epochs"] > 0 or hp["max_steps"] > 0, "epochs (or max_steps) must be positive")
    need(hp["max_steps"] >= 0, "max_steps must be 0 (off) or positive")
    need(hp["batch_size"] > 0 and hp["micro_batch_size"] > 0, "batch_size and micro_batch_size must be positive")
    need(hp["cutoff"] >= 2, "cutoff must be at least 2 tokens")
    need(0 <= hp["val_ratio"] < 1, "val_ratio must be in [0, 1)")
    for k in ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "loss_chunk", "threads"):
        need(hp[k] >= 0, f"{k} must be 0 or positive")
    need(hp["logging_steps"] > 0, "logging_steps must be positive")
    need(hp["dtype"] in ("auto", "bf16", "fp16", "fp32"), "dtype must be auto, bf16, fp16 or fp32")


# ----------------------------------------------------------------------------- data
def _normalize(rec: dict, where: str, n: int) -> dict:
    if "instruction" in rec and "output" in rec:          # alpaca
        inp = str(rec["instruction"]) + (("\n" + str(rec["input"])) if rec.get("input") else "")
        out = rec["output"]
    elif "input" in rec and ("output" in rec or "answer" in rec):
        inp, out = rec["input"], rec.get("output", rec.get("answer"))
    else:
        raise PolyalignError(f"{where}: record {n} has neither input/output nor instruction/output fields "
                             f"(has {sorted(rec)})")
    if not str(inp).strip() or out is None or not str(out).strip():
        raise PolyalignError(f"{where}: record {n} has an empty input or output")
    return {"id": str(rec.get("id", n)), "input": str(inp), "output": str(out)}


def load_pairs(data: str, val_ratio: float, seed: int) -> tuple[list[dict], list[dict], str]:
    """(train, val, description) from a prepared folder or a single file of pairs."""
    from polyalign.data import read_records
    from polyalign.training.prepare import split_pairs

    path = Path(data)
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise PolyalignError(f"{data} holds no train.jsonl; build it with `polyalign prepare`")
        train = [_normalize(r, str(path / "train.jsonl"), i) for i, r in enumerate(read_jsonl(path / "train.jsonl"))]
        val = [_normalize(r, str(path / "val.jsonl"), i) for i, r in enumerate(read_jsonl(path / "val.jsonl"))]
        return train, val, str(path)
    if not path.is_file():
        raise PolyalignError(f"training data not found: {data}")
    recs = [_normalize(r, data, i) for i, r in enumerate(read_records(path))]
    for i, r in enumerate(recs):
        r["group"] = str(i)
    train, val = split_pairs(recs, val_ratio, seed)
    strip = lambda rs: [{k: r[k] for k in ("id", "input", "output")} for r in rs]  # noqa: E731
    return strip(train), strip(val), str(path)


def _limits(s: int, t: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory's split of the cutoff between source and target lengths."""
    if s + t <= cutoff:
        return s, t
    if 2 * t < cutoff:
        return cutoff - t, t
    if 2 * s < cutoff:
        return s, cutoff - s
    ms = max(1, int(cutoff * s / (s + t)))
    return ms, cutoff - ms


def encode_pair(tokenizer, inp: str, out: str, cutoff: int, chat_template: bool = False) -> tuple[list[int], int, bool]:
    """(token ids, number of prompt tokens, truncated?). Labels are ids[n_prompt:] (output + eos)."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise PolyalignError("chat_template=true but the tokenizer has no chat template; drop --chat-template")
        user = [{"role": "user", "content": inp}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": out}], tokenize=False)
        if not full.startswith(prompt):
            raise PolyalignError("the chat template does not extend the prompt with the answer; cannot mask it")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    else:
        p = tokenizer(inp)["input_ids"]
        t = tokenizer(out, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ms, mt = _limits(len(p), len(t), cutoff)
    truncated = ms < len(p) or mt < len(t)
    p, t = p[:max(ms, 1)], t[:mt]
    return p + t, len(p), truncated


@dataclass
class Example:
    ids: list[int]
    start: int          # first target token; the loss covers ids[start:]

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.start


# ----------------------------------------------------------------------------- the loss
def _chunked_ce_forward(hidden, targets, head, softcap, chunk, want_grad):
    """(summed cross-entropy of head(hidden) against targets, its gradient w.r.t. hidden or None).

    Positions go through the head in equal chunks of at most `chunk`. For a plain bias-free linear head
    (almost every LM) the gradient is written by hand: softmax - one-hot (times the softcap's derivative),
    then one matmul with the head's weight; one fp32 logits buffer serves every chunk. Other heads go
    through autograd chunk by chunk."""
    import torch
    import torch.nn.functional as F

    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    if n == 0:
        return total, grad
    size = -(-n // -(-n // chunk))          # equal chunks: ceil(n / number of chunks)
    weight = getattr(head, "weight", None)
    manual = (isinstance(head, torch.nn.Linear) and head.bias is None and weight is not None
              and weight.dim() == 2 and weight.numel() > 0)
    if manual:
        # Allocated once: a fresh [chunk x vocabulary] buffer per chunk (268 MB for Gemma) costs its
        # page faults again every time.
        buf = torch.empty(size, weight.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, n, size):
        h, t = hidden[s:s + size].detach(), targets[s:s + size]
        if manual:
            with torch.no_grad():
                z = buf[:len(h)]
                if weight.dtype == torch.float32 and h.dtype == torch.float32:
                    torch.mm(h, weight.t(), out=z)
                else:
                    z.copy_(head(h))
                loss, dz = _softmax_ce_rows(z, t, softcap, want_grad)
                total += loss
                if want_grad:
                    grad[s:s + size] = torch.mm(dz.to(weight.dtype), weight).to(grad.dtype)
        else:
            with torch.enable_grad() if want_grad else torch.no_grad():
                if want_grad:
                    h.requires_grad_(True)
                logits = head(h).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                loss = F.cross_entropy(logits, t, reduction="sum")
                if want_grad:
                    grad[s:s + size] = torch.autograd.grad(loss, h)[0]
            total += loss.detach()
    return total, grad


# Rows of logits per pass of _softmax_ce_rows: 2 rows of a 262k vocabulary are 2 MB of fp32, which stay in
# the CPU's cache between the passes (max, exp, sum, scale) instead of going to memory and back for each.
CE_ROWS = 2


def _softmax_ce_rows(z, targets, softcap, want_grad):
    """Summed cross-entropy of the fp32 logits z [n, V] (softcapped first if `softcap`), and, if want_grad,
    d loss / d z written over z itself (softmax - one-hot, times the softcap's derivative); returns
    (loss, z or None). On a CPU it works a few rows at a time (CE_ROWS), in cache: whole-tensor passes
    cost a softcapped 262k-vocabulary head ~1 s more per training step (3.20 s -> 2.23 s), Gemma-3's
    uncapped one ~0.07 s. On a GPU, where each pass is a kernel launch, it takes the whole chunk at once."""
    import torch

    total = torch.zeros((), dtype=torch.float32, device=z.device)
    rows = torch.arange(z.shape[0], device=z.device)
    block = CE_ROWS if z.device.type == "cpu" else max(z.shape[0], 1)
    capped = torch.empty((min(block, z.shape[0]), z.shape[1]), dtype=z.dtype, device=z.device) if softcap else None
    for r in range(0, z.shape[0], block):
        zr, tr = z[r:r + block], targets[r:r + block]
        if softcap:                       # zr keeps tanh(z / cap) for the derivative; cr the capped logits
            cr = capped[:len(zr)]
            torch.mul(zr.div_(softcap).tanh_(), softcap, out=cr)
        else:
            cr = zr
        picked = cr.gather(1, tr[:, None])
        top = cr.amax(1, keepdim=True)
        p = cr.sub_(top).exp_()                                   # z is a scratch buffer: in place
        sums = p.sum(1, keepdim=True)
        total += (sums.log() + top - picked).sum()
        if want_grad:
            p.div_(sums)                                          # softmax
            p[rows[:len(p)], tr] -= 1                             # d loss / d capped logits
            if softcap:
                zr.mul_(zr).neg_().add_(1).mul_(p)                # times 1 - tanh^2: d capped / d z
    return total, (z if want_grad else None)


def _make_chunked_ce():
    import torch

    class ChunkedCE(torch.autograd.Function):
        """Summed cross-entropy of `head(hidden)`; the gradient is computed chunk by chunk in the forward
        pass, so [positions x vocabulary] logits never stay alive (and are never recomputed)."""

        @staticmethod
        def forward(ctx, hidden, targets, head, softcap, chunk):
            total, grad = _chunked_ce_forward(hidden, targets, head, softcap, chunk, True)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            (grad,) = ctx.saved_tensors
            return grad * grad_out.to(grad.dtype), None, None, None, None

    return ChunkedCE


def make_loss_model(peft_model, chunk: int, fast: bool = True):
    import torch

    ChunkedCE = _make_chunked_ce()

    class LossModel(torch.nn.Module):
        """forward(ids, rows, cols, targets) -> summed target-token loss (fp32). Wrapping the whole loss
        in one module lets DDP / FSDP / DeepSpeed see a single forward."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.fast = fast
            self.chunk = chunk

        def _causal_lm(self):
            return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

        def forward(self, input_ids, rows, cols, targets):
            lm = self._causal_lm()
            head = lm.get_output_embeddings()
            if self.fast and not any(p.requires_grad for p in head.parameters()):
                hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
                picked = hidden[rows, cols]
                softcap = getattr(lm.config, "final_logit_softcapping", None)
                if torch.is_grad_enabled():
                    return ChunkedCE.apply(picked, targets, head, softcap, self.chunk)
                return _chunked_ce_forward(picked, targets, head, softcap, self.chunk, False)[0]
            logits = lm(input_ids=input_ids, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits[rows, cols].float(), targets, reduction="sum")

    return LossModel(peft_model)


def collate(examples: list[Example], pad_id: int, device):
    """Right-padded ids plus the (row, col) positions that predict target tokens, and those targets."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    rows, cols, tgts = [], [], []
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        n = e.n_target
        rows += [r] * n
        cols += range(e.start - 1, len(e.ids) - 1)
        tgts += e.ids[e.start:]
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), t(rows), t(cols), t(tgts)


def plan_step(indices: list[int], examples: list[Example], world: int, rank: int, micro: int,
              n_micro: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches for one optimizer step: (example indices, weight). The step's examples
    are sorted by length and dealt out in a snake order (similar token counts per process); every process
    runs exactly n_micro forwards (a missing one re-runs the step's shortest example with weight 0)."""
    from polyalign.distributed import deal_by_length
    lengths = {i: len(examples[i].ids) for i in indices}
    mine = deal_by_length(indices, lengths, world, rank)
    shortest = min(indices, key=lambda i: (lengths[i], -i))
    batches = [(mine[j:j + micro], 1.0) for j in range(0, len(mine), micro)]
    while len(batches) < n_micro:
        batches.append(([shortest], 0.0))
    return batches


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- run folder
def _fingerprint(resolved: dict) -> dict:
    return {k: v for k, v in resolved.items() if k not in NON_SEMANTIC and k != "derived"}


def _read_config(text: str) -> dict:
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


# A training run's folder holds its resolved config.yaml; any other non-empty folder is refused.
TRAINING_RUN = RunRecord("config.yaml", clash="already holds a different run", damaged="choose another --output",
                         foreign="polyalign training run; choose another", parse=_read_config,
                         settings_of=_fingerprint, all_keys=True)


def _check_output(out: Path, resolved: dict, resume: bool) -> str:
    """'fresh', 'resume' or 'done'; an error when the folder holds something else."""
    if claim_output(out, TRAINING_RUN, _fingerprint(resolved)) is None:
        return "fresh"
    if (out / "summary.json").is_file() and (out / "adapter_config.json").is_file():
        return "done"      # (a finished run whose adapter went missing resumes, and saves it again)
    if not resume:
        raise PolyalignError(f"{out} holds an unfinished run of this config; pass --resume to continue it "
                             f"(or choose another --output)")
    return "resume"


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ----------------------------------------------------------------------------- training
def _accelerator(mixed_precision: str, n_micro: int, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A second Accelerator in one process (tests, `polyalign run`, the benchmark) may need other
    # settings; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=n_micro, cpu=cpu)


@dataclass
class TrainSummary:
    """A finished run's summary.json: `train` writes it through this record and `polyalign report` reads it
    through the same one, so that the two cannot disagree on a key. None = not known (an older file)."""
    train_tokens: int | None = None           # prompt and target tokens of the training steps
    target_tokens: int | None = None
    seconds: float | None = None              # time in the training steps
    tokens_per_s: float | None = None
    cpu_seconds: float | None = None          # this process's CPU time in the training steps (all threads)
    final_eval_loss: float | None = None
    truncated: int | None = None              # pairs cut to the cutoff
    steps: int | None = None
    epochs: float | None = None
    examples: int | None = None               # training pairs
    val_examples: int | None = None           # validation pairs
    final_train_loss: float | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    world_size: int | None = None
    fast_loss: bool | None = None
    resumed_from: int | None = None
    wall_seconds: float | None = None
    peak_rss_mb: float | None = None
    adapter: str | None = None
    merged: str | None = None
    data: str | None = None

    FILE = "summary.json"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSummary":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / self.FILE, self.to_dict())

    @classmethod
    def read(cls, folder: Path) -> "TrainSummary | None":
        """The summary in `folder`, or None when there is none or it does not parse."""
        path = Path(folder) / cls.FILE
        try:
            d = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return cls.from_dict(d) if isinstance(d, dict) else None


def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or find finished) the run of `cfg`; returns its TrainSummary as a dict ({"rank": r} on
    processes other than the first)."""
    if not cfg.data:
        raise PolyalignError("--data is required (a `polyalign prepare` folder or a file of pairs)")
    if not cfg.output:
        raise PolyalignError("--output is required")
    hp = resolve_config(cfg)
    train_recs, val_recs, data_desc = load_pairs(cfg.data, hp["val_ratio"], hp["seed"])
    if not train_recs:
        raise PolyalignError(f"{cfg.data}: no training pairs")
    data_hash = content_hash([[(r["input"], r["output"]) for r in train_recs],
                              [(r["input"], r["output"]) for r in val_recs]])
    resolved = {"data": str(cfg.data), "data_hash": data_hash, **hp}
    out = Path(cfg.output)

    import torch
    from accelerate import PartialState
    # Without a GPU accelerate needs cpu=True to see a torchrun / multi-CPU launch (else it runs each
    # process alone).
    cpu = hp["device"] == "cpu" or (hp["device"] == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes == 1 and cpu != (state.device.type == "cpu"):
        # One process that made its state for the other device earlier (tests, `polyalign run`):
        # the state is a process-wide singleton, so start it again for this run's device.
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
        state = PartialState(cpu=cpu)
    world, rank = state.num_processes, state.process_index
    if hp["batch_size"] % world:
        raise PolyalignError(f"batch_size {hp['batch_size']} is not divisible by {world} processes")
    # Every process decides the same way (it reads the same folder) before anything is written.
    mode = _check_output(out, resolved, cfg.resume)
    state.wait_for_everyone()      # no process may write before all have looked
    if mode == "done":
        summary = TrainSummary.read(out) or TrainSummary()
        if cfg.merge and not (out / "merged" / "config.json").exists() and rank == 0:
            _merge_saved(out, hp)
            summary.merged = str(out / "merged")
        if rank == 0:
            log.info("train: %s already holds this finished run (final eval loss %s); nothing to do",
                     out, summary.final_eval_loss, extra=STATUS)
        return summary.to_dict()

    threads_before = torch.get_num_threads()
    if hp["threads"]:
        torch.set_num_threads(hp["threads"])
    try:
        return _train_run(cfg, hp, resolved, _Pairs(train_recs, val_recs, data_desc), out, mode, state, cpu)
    finally:
        torch.set_num_threads(threads_before)


# The stages of a run, in the manner of torchtune's recipes: _train_run sets up (precision and accelerator,
# model and data, LoRA, loss, optimizer and schedule), restores or starts the run folder, then loops over
# optimizer steps and finishes (adapter, loss plot, summary). The records below carry what one stage hands
# to the next.
@dataclass
class _Pairs:
    """The training data as load_pairs read it."""
    train: list[dict]
    val: list[dict]
    desc: str


@dataclass
class _Schedule:
    """How many optimizer steps, and when to log, evaluate and save."""
    steps_per_epoch: int
    total: int
    warmup: int
    eval_every: int
    save_every: int


@dataclass
class _Setup:
    """Everything the loop needs, built by the setup stages."""
    accelerator: object
    device: object
    dtype: object                 # the compute dtype (torch)
    mixed_precision: str          # accelerate's name for it: "bf16", "fp16" or "no"
    world: int
    rank: int
    n_micro: int                  # micro-batches per process and optimizer step
    wall_start: float
    tokenizer: object = None
    pad: int = 0
    train_ex: list[Example] = field(default_factory=list)
    val_ex: list[Example] = field(default_factory=list)
    truncated: int = 0
    peft_model: object = None
    fast: bool = False            # the chunked loss at target positions (checked against the model's own)
    chunk: int = 0
    wrapped: object = None        # the loss model as accelerate prepared it
    trainable: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)    # the adapter's parameter names (checkpoints)
    optimizer: object = None
    scheduler: object = None
    schedule: _Schedule | None = None


@dataclass
class _Progress:
    """The counters of a run: what a checkpoint's state.json holds, and what the summary reports."""
    step: int = 0
    tokens: int = 0
    target_tokens: int = 0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    acc: dict = field(default_factory=lambda: {"loss": 0.0, "targets": 0, "steps": 0})   # since the last log line
    resumed_from: int | None = None

    def state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "train_seconds": self.train_seconds, "cpu_seconds": self.cpu_seconds, "acc": self.acc}

    @classmethod
    def from_state(cls, st: dict) -> "_Progress":
        return cls(st["step"], st["tokens"], st["target_tokens"], st["train_seconds"], st.get("cpu_seconds", 0.0),
                   st["acc"], resumed_from=st["step"])


def _train_run(cfg: TrainConfig, hp: dict, resolved: dict, data: _Pairs, out: Path, mode: str, state,
               cpu: bool) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        s = _setup_precision(hp, state, cpu)
        model = _setup_model_and_data(s, hp, data, cfg.progress)
        _setup_lora(s, hp, model)
        _setup_loss(s, hp)
        _setup_optimizer(s, hp)
        prog = _start_run_folder(s, hp, resolved, out, mode)
        last_eval = _loop(s, hp, prog, out, cfg.progress)
        return _finish(s, hp, prog, last_eval, out, cfg.merge, data.desc)


def _setup_precision(hp: dict, state, cpu: bool) -> _Setup:
    import torch
    from polyalign.models import resolve_dtype

    world, rank = state.num_processes, state.process_index
    per_rank = hp["batch_size"] // world
    n_micro = math.ceil(per_rank / hp["micro_batch_size"])
    dtype = resolve_dtype(hp["dtype"], state.device)
    mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    accelerator = _accelerator(mp, n_micro, cpu)
    return _Setup(accelerator, accelerator.device, dtype, mp, world, rank, n_micro, time.time())


def _setup_model_and_data(s: _Setup, hp: dict, data: _Pairs, progress: bool):
    """Load the model and tokenize the pairs (prompt tokens, then target tokens + eos); returns the model."""
    import torch
    from polyalign.models import load_model

    lm = load_model(hp["model"], {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(s.dtype, "fp32"),
                    str(s.device), progress=progress)
    tok = lm.tokenizer
    if tok.eos_token_id is None:
        raise PolyalignError(f"model {hp['model']!r} has no eos token; cannot end the targets")
    encoded = []
    for recs in (data.train, data.val):
        exs = []
        for r in recs:
            ids, start, cut = encode_pair(tok, r["input"], r["output"], hp["cutoff"], hp["chat_template"])
            s.truncated += cut
            exs.append(Example(ids, start))
        encoded.append(exs)
    s.train_ex, s.val_ex = encoded
    s.tokenizer = tok
    s.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lm.model.config.use_cache = False
    return lm.model


def _setup_lora(s: _Setup, hp: dict, model) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(hp["seed"])
    random.seed(hp["seed"])
    lora = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=list(hp["lora_target"]), bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise PolyalignError(f"LoRA targets {hp['lora_target']} do not fit model {hp['model']!r}: "
                             f"{str(e).splitlines()[0]}") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()       # fp32 master weights for the adapter
    if hp["gradient_checkpointing"]:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    peft_model.train()
    s.peft_model = peft_model


def _setup_loss(s: _Setup, hp: dict) -> None:
    vocab = s.peft_model.get_base_model().get_output_embeddings().weight.shape[0]
    s.chunk = hp["loss_chunk"] or max(32, (1 << 26) // vocab)
    s.fast = _fast_loss_ok(s.peft_model, s.train_ex[0], s.chunk, s.device, s.dtype, s.tokenizer.pad_token_id)


def _setup_optimizer(s: _Setup, hp: dict) -> None:
    """AdamW and the schedule, then accelerate's wrapping of the loss model and optimizer."""
    import torch
    from transformers import get_scheduler

    loss_model = make_loss_model(s.peft_model, s.chunk, s.fast)
    s.trainable = [p for p in loss_model.parameters() if p.requires_grad]
    s.names = [n for n, p in s.peft_model.named_parameters() if p.requires_grad]
    fused = {"fused": True} if s.device.type in ("cuda", "cpu") and _fused_ok() else {}
    optimizer = torch.optim.AdamW(s.trainable, lr=hp["lr"], betas=(hp["adam_beta1"], hp["adam_beta2"]),
                                  eps=hp["adam_epsilon"], weight_decay=hp["weight_decay"], **fused)
    steps_per_epoch = math.ceil(len(s.train_ex) / hp["batch_size"])
    total = hp["max_steps"] or math.ceil(hp["epochs"] * steps_per_epoch)
    warmup = math.ceil(total * hp["warmup_ratio"])
    s.scheduler = get_scheduler(SCHEDULERS[hp["scheduler"]], optimizer, num_warmup_steps=warmup,
                                num_training_steps=total)
    ds = getattr(s.accelerator.state, "deepspeed_plugin", None)
    if ds is not None:   # DeepSpeed cannot infer the micro-batch size without a DataLoader
        conf = ds.deepspeed_config
        if conf.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            conf["train_micro_batch_size_per_gpu"] = hp["micro_batch_size"]
        if conf.get("train_batch_size", "auto") == "auto":
            conf["train_batch_size"] = hp["micro_batch_size"] * s.n_micro * s.world
    s.wrapped, s.optimizer = s.accelerator.prepare(loss_model, optimizer)
    s.schedule = _Schedule(steps_per_epoch, total, warmup, eval_every=hp["eval_steps"] or max(1, total // 10),
                           save_every=hp["save_steps"] or max(1, min(50, total // 20)))


def _start_run_folder(s: _Setup, hp: dict, resolved: dict, out: Path, mode: str) -> _Progress:
    """A fresh run writes config.yaml and an empty log; a resumed one restores its last checkpoint and
    cuts the log back to it."""
    sch = s.schedule
    derived = {"steps": sch.total, "warmup_steps": sch.warmup, "steps_per_epoch": sch.steps_per_epoch,
               "world_size": s.world, "micro_batches_per_step": s.n_micro, "fast_loss": s.fast,
               "loss_chunk": s.chunk, "mixed_precision": s.mixed_precision}
    prog = _Progress()
    ckpts = _checkpoints(out) if mode == "resume" else []
    if ckpts:
        prog = _Progress.from_state(_load_checkpoint(ckpts[-1], s.accelerator, s.peft_model, s.names,
                                                     s.optimizer, s.scheduler))
    if s.rank == 0:
        if mode == "fresh":
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "config.yaml", yaml.safe_dump({**resolved, "derived": derived}, sort_keys=False,
                                                             allow_unicode=True))
            write_jsonl(out / "train_log.jsonl", [])
        else:
            kept = [r for r in read_jsonl(out / "train_log.jsonl", repair=True) if r.get("step", 0) <= prog.step]
            write_jsonl(out / "train_log.jsonl", kept)
        mp = s.mixed_precision
        log.info("train: %d pairs (%d val), %d steps of %d (%d x %d per process, %d process(es)), %s, %s%s",
                 len(s.train_ex), len(s.val_ex), sch.total, hp["batch_size"], s.n_micro, hp["micro_batch_size"],
                 s.world, s.device, mp if mp != "no" else "fp32",
                 f"; resuming at step {prog.step}" if prog.resumed_from else "", extra=STATUS)
    s.accelerator.wait_for_everyone()
    return prog


def _loop(s: _Setup, hp: dict, prog: _Progress, out: Path, progress: bool) -> float | None:
    """The optimizer steps from prog.step to the end; returns the last validation loss (None if none ran)."""
    from tqdm.auto import tqdm

    sch = s.schedule
    bar = tqdm(total=sch.total, initial=prog.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or s.rank != 0)
    last_eval = None
    try:
        while prog.step < sch.total:
            lr_now, grad_norm = _optimizer_step(s, hp, prog, _step_indices(prog.step, len(s.train_ex), hp, sch))
            bar.update(1)
            epoch_f = round(prog.step / sch.steps_per_epoch, 4)
            if prog.step % hp["logging_steps"] == 0 or prog.step == sch.total:
                rec = {"step": prog.step, "epoch": epoch_f, "loss": prog.acc["loss"] / max(prog.acc["targets"], 1),
                       "lr": lr_now, "tokens": prog.tokens, "grad_norm": grad_norm,
                       "seconds": round(prog.train_seconds, 3)}
                prog.acc = {"loss": 0.0, "targets": 0, "steps": 0}
                if s.rank == 0:
                    append_lines(out / "train_log.jsonl", [rec])
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if s.val_ex and (prog.step % sch.eval_every == 0 or prog.step == sch.total):
                last_eval = _validation_loss(s, hp)
                if s.rank == 0:
                    append_lines(out / "train_log.jsonl", [{"step": prog.step, "epoch": epoch_f,
                                                            "eval_loss": last_eval}])
                    log.info("step %d: eval loss %.4f", prog.step, last_eval, extra=STATUS)
            if prog.step % sch.save_every == 0 and prog.step < sch.total:
                _save_checkpoint(out, prog.step, s.accelerator, s.peft_model, s.names, s.optimizer, s.scheduler,
                                 prog.state(), hp["save_total_limit"])
    except KeyboardInterrupt:
        if s.rank == 0:
            log.warning("train: interrupted at step %d; rerun the same command with --resume to continue "
                        "from the last checkpoint", prog.step)
        raise
    finally:
        bar.close()
    if s.val_ex and last_eval is None:   # a resumed run that had nothing left to do
        last_eval = _validation_loss(s, hp)
    return last_eval


def _step_indices(step: int, n: int, hp: dict, sch: _Schedule) -> list[int]:
    """The examples of optimizer step `step`: one random permutation per epoch (seeded by the epoch, so
    that a resumed run draws the same ones), cut into batches."""
    import torch

    epoch, within = divmod(step, sch.steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp["seed"] + epoch)).tolist()
    return perm[within * hp["batch_size"]:(within + 1) * hp["batch_size"]]


def _optimizer_step(s: _Setup, hp: dict, prog: _Progress, idx: list[int]) -> tuple[float, float | None]:
    """One optimizer step over the examples `idx` (all processes); updates prog; (lr used, grad norm)."""
    import torch

    step_targets = sum(s.train_ex[i].n_target for i in idx)
    t0, c0 = time.perf_counter(), time.process_time()
    lr_now = s.scheduler.get_last_lr()[0]
    mine = torch.zeros(2, dtype=torch.float64, device=s.device)
    grad_norm = None
    for members, weight in plan_step(idx, s.train_ex, s.world, s.rank, hp["micro_batch_size"], s.n_micro):
        with s.accelerator.accumulate(s.wrapped):
            batch = collate([s.train_ex[i] for i in members], s.pad, s.device)
            loss_sum = s.wrapped(*batch)
            # Per-token loss over the whole step (all processes); DDP averages, accumulate divides.
            s.accelerator.backward(loss_sum * (weight * s.world * s.n_micro / step_targets))
            mine[0] += float(loss_sum.detach()) * weight
            if s.accelerator.sync_gradients and hp["max_grad_norm"] > 0:
                gn = s.accelerator.clip_grad_norm_(s.trainable, hp["max_grad_norm"])
                grad_norm = float(gn) if gn is not None else None
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    prog.step += 1
    prog.train_seconds += time.perf_counter() - t0
    prog.cpu_seconds += time.process_time() - c0
    prog.tokens += sum(len(s.train_ex[i].ids) for i in idx)
    prog.target_tokens += step_targets
    step_loss = float(s.accelerator.reduce(mine, "sum")[0]) if s.world > 1 else float(mine[0])
    prog.acc["loss"] += step_loss
    prog.acc["targets"] += step_targets
    prog.acc["steps"] += 1
    return lr_now, grad_norm


def _validation_loss(s: _Setup, hp: dict) -> float:
    return evaluate_loss(s.wrapped, s.val_ex, s.world, s.rank, hp["micro_batch_size"], s.pad, s.device,
                         s.accelerator)


def _finish(s: _Setup, hp: dict, prog: _Progress, last_eval: float | None, out: Path, merge: bool,
            data_desc: str) -> dict:
    """Save the adapter (gathered first when sharded), draw the losses, merge if asked, write summary.json."""
    s.accelerator.wait_for_everyone()
    sharded = _sharded(s.accelerator)
    # A full state dict (collective under FSDP / DeepSpeed; plain references otherwise).
    full = s.accelerator.get_state_dict(s.wrapped) if sharded else None
    summary = None
    if s.rank == 0:
        unwrapped = s.accelerator.unwrap_model(s.wrapped).model
        _save_adapter(unwrapped, out, full)
        records = read_jsonl(out / "train_log.jsonl")
        plot_losses(records, out / "loss.png", title=out.name)
        mp, total, tokens, train_seconds = s.mixed_precision, s.schedule.total, prog.tokens, prog.train_seconds
        summary = TrainSummary(
            train_tokens=tokens, target_tokens=prog.target_tokens, seconds=round(train_seconds, 3),
            tokens_per_s=round(tokens / train_seconds, 2) if train_seconds else None,
            cpu_seconds=round(prog.cpu_seconds, 3), final_eval_loss=last_eval, truncated=s.truncated, steps=total,
            epochs=round(total / s.schedule.steps_per_epoch, 4), examples=len(s.train_ex),
            val_examples=len(s.val_ex),
            final_train_loss=next((r["loss"] for r in reversed(records) if "loss" in r), None),
            model=hp["model"], device=str(s.device), dtype=mp if mp != "no" else "fp32", world_size=s.world,
            fast_loss=s.fast, resumed_from=prog.resumed_from, wall_seconds=round(time.time() - s.wall_start, 3),
            peak_rss_mb=round(_peak_rss_mb(), 1), adapter=str(out), merged=None, data=data_desc)
        if merge:
            _merge_saved(out, hp) if sharded else _merge_in_place(unwrapped, s.tokenizer, out)
            summary.merged = str(out / "merged")
        summary.write(out)
        log.info("train: done, %d tokens in %.1f s (%s tokens/s), final eval loss %s; adapter in %s",
                 tokens, train_seconds, summary.tokens_per_s, last_eval, out, extra=STATUS)
    s.accelerator.wait_for_everyone()
    return summary.to_dict() if summary is not None else {"rank": s.rank}


def _fused_ok() -> bool:
    import torch
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)


def _fast_loss_ok(peft_model, ex: Example, chunk: int, device, dtype, pad) -> bool:
    """Compare the fast loss (decoder + chunked head at target positions) with the model's own logits."""
    import torch

    lm = peft_model.get_base_model()
    ids, rows, cols, tgts = collate([ex], pad if pad is not None else 0, device)
    enabled = dtype in (torch.bfloat16, torch.float16)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            ref = torch.nn.functional.cross_entropy(lm(input_ids=ids, use_cache=False).logits[rows, cols].float(),
                                                    tgts, reduction="sum")
            fast = make_loss_model(peft_model, chunk, True)(ids, rows, cols, tgts)
    except Exception as e:  # an architecture the fast path does not fit
        log.warning("train: fast loss unavailable (%s: %s); using the model's full logits", type(e).__name__, e)
        return False
    ok = abs(float(ref) - float(fast)) <= 2e-2 * max(1.0, abs(float(ref)))
    if not ok:
        log.warning("train: fast loss %.4f != model loss %.4f; using the model's full logits", float(fast),
                    float(ref))
    return ok


def evaluate_loss(wrapped, examples: list[Example], world: int, rank: int, micro: int, pad: int, device,
                  accelerator) -> float:
    """Per-token loss over the validation examples (all processes; each runs the same number of forwards)."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].ids), i))
    batches = [order[j:j + micro] for j in range(0, len(order), micro)]
    per = math.ceil(len(batches) / world)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    wrapped.eval()
    with torch.no_grad():
        for k in range(per):
            j = k * world + rank
            members, weight = (batches[j], 1.0) if j < len(batches) else (batches[-1], 0.0)
            loss = wrapped(*collate([examples[i] for i in members], pad, device))
            sums[0] += float(loss) * weight
            sums[1] += sum(examples[i].n_target for i in members) * weight
    wrapped.train()
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    return float(sums[0] / sums[1])


# ----------------------------------------------------------------------------- checkpoints and artefacts
def _save_checkpoint(out: Path, step: int, accelerator, peft_model, names, optimizer, scheduler, st: dict,
                     keep: int) -> None:
    import torch
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _sharded(accelerator):
        # FSDP / DeepSpeed: parameters and optimizer state are sharded; accelerate saves them (all ranks).
        accelerator.save_state(str(tmp / "accelerate"))
    if accelerator.is_main_process:
        if not _sharded(accelerator):
            params = dict(peft_model.named_parameters())
            save_file({n: params[n].detach().float().cpu().contiguous() for n in names},
                      str(tmp / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
        write_json(tmp / "state.json", st)
        publish_folder(tmp, final)
        for old in _checkpoints(out)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _load_checkpoint(path: Path, accelerator, peft_model, names, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file

    if (path / "accelerate").is_dir():
        if not _sharded(accelerator):
            raise PolyalignError(f"checkpoint {path} was written under FSDP/DeepSpeed; resume it the same way")
        accelerator.load_state(str(path / "accelerate"))
    else:
        if _sharded(accelerator):
            raise PolyalignError(f"checkpoint {path} was written without FSDP/DeepSpeed; resume it the same way")
        saved = load_file(str(path / "adapter.safetensors"))
        params = dict(peft_model.named_parameters())
        missing = [n for n in names if n not in saved]
        if missing:
            raise PolyalignError(f"checkpoint {path} does not match this model (missing {missing[0]})")
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n].to(params[n].device, params[n].dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text("utf-8"))


def _save_adapter(peft_model, out: Path, full_state: dict | None = None) -> None:
    """The PEFT adapter files, written beside each other in a temporary folder and moved into `out`.
    `full_state`: the LossModel's gathered state dict (FSDP / DeepSpeed), whose keys start with "model."."""
    with atomic_folder(out, tmp=out / ".adapter.tmp", merge=True) as tmp:
        if full_state is not None:
            state = {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
            peft_model.save_pretrained(str(tmp), state_dict=state)
        else:
            peft_model.save_pretrained(str(tmp))


def _merge_in_place(peft_model, tokenizer, out: Path) -> None:
    with atomic_folder(out / "merged") as tmp:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def _merge_saved(out: Path, hp: dict) -> None:
    from polyalign.models import load_model
    # The merge runs on the CPU, which refuses fp16: an fp16 run merges in fp32.
    lm = load_model(hp["model"], "fp32" if hp["dtype"] == "fp16" else hp["dtype"], "cpu", adapter=str(out),
                    progress=False)
    _merge_in_place(lm.model, lm.tokenizer, out)


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """loss_figure of train_log.jsonl's records, written to `path` (atomically)."""
    fig = loss_figure(records, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def loss_figure(records: list[dict], title: str = ""):
    """Training and validation loss per optimizer step (a matplotlib Figure, outside pyplot)."""
    from matplotlib.figure import Figure

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.2)
    if ev:
        ax.plot(*zip(*ev), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title(f"polyalign train {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
