"""`polyalign tune-lens`: a multilingual tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions
from Transformers with the Tuned Lens").

One affine translator per layer l = 0 (the embeddings) .. L-1: h -> h + A_l h + b_l, initialised to
the identity (A_l = 0, b_l = 0), then the model's own final norm and unembedding (Gemma's softcap
included). Layer L is the model's output and needs no translator, as in Belrose et al.; at layer L
the tuned lens is exactly the model's distribution. Objective and optimiser are theirs: the KL
divergence from the model's final distribution at the same token to the lens' distribution,
averaged over tokens and summed over layers; SGD with Nesterov momentum 0.9, learning rate
lr_scale * (1 - momentum) decaying linearly to 0, weight decay 1e-3, gradient norm clipped to 1.

Why not the `tuned-lens` package (0.2.0, 2023): with our transformers it finds no final norm for
Qwen2, Mistral or Gemma3 (NotImplementedError), knows no logit softcap, normalises the last hidden
state a second time (current transformers already return it normed), and its training loop needs
torchdata.dataloader2, removed from torchdata since. See docs/analysis.md.

Text: the same per-language text as `polyalign neurons` (the bundled task sets and question pool by
default, or --data), up to --tokens-per-language per language, all chosen languages mixed in one
seeded order. Forwards go through engine.runner.PrefixRunner (no padding tokens enter the loss).
The vocabulary is projected in chunks of tokens, and each chunk's gradient is taken in the forward
pass, as training/train.py's chunked loss does, so [tokens x vocabulary] logits never stay alive:
for a 262k vocabulary the L+1 head products per token dominate the cost.

Outputs in --output: lens.safetensors (the translators), lens.json (what they were trained on and
for), log.jsonl (KL per layer per step), checkpoint.pt while training (resumed from when rerun).

Several processes (`torchrun --nproc_per_node N -m polyalign tune-lens ...`, gloo on CPU, as
`polyalign evaluate` and `train` run): every process builds the same sequences and step plan, takes a
share of each step's sequences (dealt by length, as train deals its examples), and the translators'
gradients (already scaled by the step's whole token count) and KLs are summed over the processes
before the identical clip and SGD step on each. The translators are tiny next to the model, so one
all-reduce per step does what DDP would, without DDP's one-forward-per-backward rule (the translators
run once per layer). Rank 0 alone writes the log, checkpoints and the lens; every rank resumes from
the same checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from polyalign import config as C
from polyalign import languages
from polyalign.analysis.common import adapter_option
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.store import RunRecord, append_lines, atomic_path, claim_output, content_hash, read_jsonl, write_json

log = logging.getLogger(__name__)

LENS_KINDS = ("logit", "tuned", "both")
LENS_VERSION = 1


# ============================================================================= the translators
class Translators(torch.nn.Module):
    """Affine translators of layers 0..L-1 (fp32), identity at initialisation."""

    def __init__(self, n_layers: int, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, hidden, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, hidden))

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [..., H] of `layer` -> translated [..., H] in fp32."""
        x = h.float()
        return x + x @ self.weight[layer].T + self.bias[layer]


def tuned_states(model, translators: Translators, hidden_states, last_hidden, rows, pos) -> torch.Tensor:
    """As lens.answer_states, through the translators: [B, L+1, H] final-normed states at `pos`.
    Layers 0..L-1 are translated, then normed; layer L is the decoder's output (what the head sees)."""
    from polyalign.engine.model_parts import final_norm
    norm = final_norm(model)
    dtype = last_hidden.dtype
    inner = [norm(translators(hidden_states[l][rows, pos], l).to(dtype)) for l in range(translators.n_layers)]
    return torch.stack([*inner, last_hidden[rows, pos]], 1)


def load_translators(folder: str | Path, model) -> tuple[Translators, str]:
    """The translators in `folder` (checked against the model's shape) and a hash of them."""
    from safetensors.torch import load_file

    from polyalign.engine.model_parts import decoder_of
    path = Path(folder, "lens.safetensors")
    if not path.is_file():
        raise PolyalignError(f"no tuned lens at {folder} (lens.safetensors missing); train one with "
                             f"`polyalign tune-lens`")
    tensors = load_file(str(path))
    cfg = decoder_of(model).config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    if tuple(tensors["weight"].shape) != (layers, hidden, hidden):
        raise PolyalignError(f"the tuned lens at {folder} has translators of shape {tuple(tensors['weight'].shape)}; "
                             f"this model needs ({layers}, {hidden}, {hidden})")
    t = Translators(layers, hidden)
    t.load_state_dict(tensors)
    device = next(model.parameters()).device
    return t.to(device).requires_grad_(False), _tensor_hash(tensors)


def _tensor_hash(tensors: dict) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================= the chunked KL
def chunked_kl(lens_normed: torch.Tensor, final_normed: torch.Tensor, head, softcap, chunk: int):
    """KL(final || lens) per layer, averaged over tokens, and its gradient w.r.t. `lens_normed`.

    lens_normed [K, T, H] (K layers, detached), final_normed [T, H]. Tokens go through the head in
    chunks of at most `chunk`; per chunk the final log-probabilities are computed once and serve
    every layer. For a logit z = head(x) (softcapped: cap * tanh(u / cap)), dKL/dz = softmax(z) - p,
    so the gradient w.r.t. x is one matmul with the head's weight (the head must be a bias-free
    linear layer, as in every model polyalign supports)."""
    K, T, _ = lens_normed.shape
    weight = head.weight
    losses = torch.zeros(K, dtype=torch.float64, device=lens_normed.device)
    grad = torch.empty_like(lens_normed)
    for s in range(0, T, chunk):
        with torch.no_grad():
            zf = head(final_normed[s:s + chunk].to(weight.dtype)).float()
            if softcap:
                zf = torch.tanh(zf / softcap) * softcap
            logp = torch.log_softmax(zf, -1)
            p = logp.exp()
            del zf
            for k in range(K):
                u = head(lens_normed[k, s:s + chunk].to(weight.dtype)).float()
                if softcap:
                    th = torch.tanh(u / softcap)
                    u = th * softcap
                logq = torch.log_softmax(u, -1)
                losses[k] += (p * (logp - logq)).sum().double()
                dz = logq.exp_().sub_(p)                     # softmax(z) - p, in place
                if softcap:
                    dz.mul_(1 - th * th)
                grad[k, s:s + chunk] = (dz @ weight.float()).to(grad.dtype) / T
    return losses / T, grad


def lens_loss_and_backward(model, translators: Translators, hidden_states: list[torch.Tensor],
                           final_normed: torch.Tensor, chunk: int, scale: float = 1.0) -> torch.Tensor:
    """hidden_states[l] [T, H] (l < L, real tokens only), final_normed [T, H] -> KL per layer [L];
    accumulates scale * d(sum of KLs)/d(translators) into their .grad."""
    from polyalign.engine.model_parts import final_norm, unwrap
    norm = final_norm(model)
    dtype = final_normed.dtype
    normed = torch.stack([norm(translators(h, l).to(dtype)) for l, h in enumerate(hidden_states)])
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    losses, grad = chunked_kl(normed.detach(), final_normed, unwrap(model).get_output_embeddings(), softcap, chunk)
    normed.backward(grad * scale)
    return losses


# ============================================================================= data and forwards
def mixed_sequences(per_lang: dict[str, list[list[int]]], seed: int) -> list[list[int]]:
    """All languages' sequences in one seeded order."""
    flat = [s for lang in per_lang for s in per_lang[lang]]
    order = np.random.default_rng(seed).permutation(len(flat))
    return [flat[i] for i in order]


def step_plan(sequences: list[list[int]], tokens_per_step: int, steps: int) -> list[list[int]]:
    """Indices of the sequences of each step: whole sequences, ~tokens_per_step tokens, cycling."""
    plan, i, n = [], 0, len(sequences)
    for _ in range(steps):
        part, tokens = [], 0
        while tokens < tokens_per_step and len(part) < n:
            part.append(i % n)
            tokens += len(sequences[i % n])
            i += 1
        plan.append(part)
    return plan


def my_share(indices: list[int], sequences: list[list[int]], world: int, rank: int) -> list[int]:
    """This process's sequences of one step, dealt out by length as training's steps are."""
    from polyalign.distributed import deal_by_length
    return deal_by_length(indices, {i: len(sequences[i]) for i in indices}, world, rank)


def sum_over_processes(translators: Translators, kl: torch.Tensor, world: int) -> None:
    """Sum the translators' gradients and the step's KLs over all processes, in place (one
    all-reduce each; nothing to do alone)."""
    if world == 1:
        return
    import torch.distributed as dist
    params = list(translators.parameters())
    for p in params:
        if p.grad is None:         # a process whose share of the step was empty
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    dist.all_reduce(kl)


def real_states(runner, prefix, suffixes):
    """(per-layer hidden states 0..L-1 [T, H], the decoder's normed output [T, H]) of the suffixes'
    real tokens, concatenated; detached normal tensors (usable in autograd)."""
    last, hidden = runner.forward(prefix, suffixes, hidden_states=True)
    lengths = [len(s) for s in suffixes]
    rows = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], device=last.device)
    cols = torch.tensor([i for n in lengths for i in range(n)], device=last.device)
    return [h[rows, cols].clone() for h in hidden[:-1]], last[rows, cols].clone()


# ============================================================================= command
@dataclass
class TuneLensConfig:
    """The options of `polyalign tune-lens` (the CLI, experiment files and Python read them from here)."""
    model: str = C.model_option()
    adapter: str | None = adapter_option()
    langs: str = option("all", help="'all', 'high', 'low' or a comma list")
    data: str | None = option(None, help="text source, as for `polyalign neurons` (default: bundled sets and pool)")
    tasks: str | None = option(None, help="tasks whose items are the text (default: every bundled task)")
    tokens_per_language: int = option(20000, help="token budget of each language's text")
    max_sequence_tokens: int = option(512, help="longest text run as one sequence")
    steps: int = option(250, help="optimiser steps (Belrose et al.: 250)")
    tokens_per_step: int = option(4096, help="tokens per optimiser step")
    lr_scale: float = option(1.0, help="SGD learning rate = lr_scale * (1 - momentum)")
    momentum: float = option(0.9, help="Nesterov momentum")
    weight_decay: float = option(1e-3, help="weight decay")
    save_every: int = option(25, help="steps between checkpoints")
    seed: int = option(0, help="seed of the order in which the languages' texts are mixed")
    output: str = option("lenses/gemma-3-270m", help="output folder")
    dtype: str = C.dtype_option()
    device: str = C.device_option()
    batch_tokens: int | None = C.batch_tokens_option()
    loss_chunk: int | None = option(None, help="tokens per vocabulary chunk (default: by vocabulary)")
    progress: bool = C.progress_option()


@dataclass
class TuneLensResult(Mapping):
    """What `tune_lens` trained: `info` is lens.json's content (the result also reads like it:
    `result["kl_last"]`); the translators are in `output`/lens.safetensors."""
    info: dict
    output: Path

    @property
    def lens_file(self) -> Path:
        return self.output / "lens.safetensors"

    def __getitem__(self, key):
        return self.info[key]

    def __iter__(self):
        return iter(self.info)

    def __len__(self):
        return len(self.info)


# lens.json records the settings a lens was trained with; another run's settings are refused.
TUNED_LENS = RunRecord("lens.json", clash="holds a tuned lens trained with other settings",
                       damaged="delete it or choose another --output",
                       settings_of=lambda record: record.get("settings") if isinstance(record.get("settings"), dict)
                       else {}, all_keys=True)


def _check(cfg: TuneLensConfig) -> None:
    for flag, v in (("--tokens-per-language", cfg.tokens_per_language), ("--steps", cfg.steps),
                    ("--tokens-per-step", cfg.tokens_per_step), ("--save-every", cfg.save_every),
                    ("--max-sequence-tokens", cfg.max_sequence_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PolyalignError(f"{flag} must be a positive number, got {v!r}")
    if not 0 <= cfg.momentum < 1:
        raise PolyalignError(f"--momentum must lie in [0, 1), got {cfg.momentum}")


def tune_lens(cfg: TuneLensConfig) -> TuneLensResult | None:
    """Train (or resume, or find already trained) the translators of cfg.model in cfg.output.
    Under several processes rank 0 returns the result, the others None."""
    from tqdm.auto import tqdm

    from polyalign.analysis.activations import language_texts, shared_prefix
    from polyalign.analysis.common import AnalysedModel, model_fingerprint
    from polyalign.analysis.neurons import language_sequences
    from polyalign.models import load_tokenizer
    from polyalign.engine.model_parts import decoder_of, unwrap
    from polyalign.engine.runner import PrefixRunner
    from polyalign.distributed import launch_state   # the launch detection evaluate uses (torchrun, gloo on CPU)
    from polyalign.models import check_adapter, load_model

    _check(cfg)
    langs = languages.parse_langs(cfg.langs)
    if cfg.adapter:
        check_adapter(cfg.adapter)
    texts = language_texts(langs, cfg.data, cfg.tasks)
    tok = load_tokenizer(cfg.model)
    per_lang = language_sequences(tok, texts, langs, cfg.tokens_per_language, cfg.max_sequence_tokens, "tune-lens")
    sequences = mixed_sequences(per_lang, cfg.seed)
    plan = step_plan(sequences, cfg.tokens_per_step, cfg.steps)
    out = Path(cfg.output)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "progress", "device", "batch_tokens",
                                                                  "save_every", "loss_chunk")}
    settings["weights"] = model_fingerprint(AnalysedModel("lens", cfg.model, cfg.adapter))
    settings["data_hash"] = content_hash(sequences)
    settings["version"] = LENS_VERSION
    fingerprint = content_hash(settings)
    rank, world, state = launch_state(cfg.device)
    # Every process decides the same way (it reads the same folder) before any writes.
    done = claim_output(out, TUNED_LENS, json.loads(json.dumps(settings)))   # as lens.json holds them
    if state:
        state.wait_for_everyone()
    if done is not None:
        if rank == 0:
            log.info("tune-lens: %s holds this lens already", out)
        return TuneLensResult(done, out) if rank == 0 else None

    device = str(state.device) if state and cfg.device == "auto" else cfg.device
    lm = load_model(cfg.model, cfg.dtype, device, cfg.adapter, progress=cfg.progress and rank == 0)
    model = lm.model.requires_grad_(False)
    dcfg = decoder_of(model).config
    translators = Translators(dcfg.num_hidden_layers, dcfg.hidden_size).to(lm.device)
    beta = cfg.momentum
    opt = torch.optim.SGD(translators.parameters(), lr=cfg.lr_scale * (1 - beta), momentum=beta, nesterov=beta > 0,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps))
    start = _resume(out, fingerprint, translators, opt, sched, write=rank == 0)
    runner = PrefixRunner(model, lm.tokenizer, cfg.batch_tokens)
    prefix = runner.prefix(shared_prefix(lm.tokenizer))
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]
    chunk = cfg.loss_chunk or max(8, (1 << 25) // vocab)
    bar = tqdm(total=cfg.steps, initial=start, desc="tune-lens", unit="step", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    for step in range(start, cfg.steps):
        total = sum(len(sequences[i]) for i in plan[step])       # the whole step's tokens, all processes
        seqs = [sequences[i] for i in my_share(plan[step], sequences, world, rank)]
        kl = torch.zeros(translators.n_layers, dtype=torch.float64, device=lm.device)
        opt.zero_grad(set_to_none=False)
        for batch in runner.batches([len(s) for s in seqs]):
            suffixes = [seqs[i] for i in batch]
            hidden, final = real_states(runner, prefix, suffixes)
            share = sum(map(len, suffixes)) / total       # the step's loss is the mean over all its tokens
            kl += lens_loss_and_backward(model, translators, hidden, final, chunk, share) * share
        sum_over_processes(translators, kl, world)
        torch.nn.utils.clip_grad_norm_(translators.parameters(), 1.0)
        opt.step()
        sched.step()
        if rank == 0:
            append_lines(out / "log.jsonl", [{"step": step + 1, "tokens": total,
                                              "kl_bits": [round(float(v) / math.log(2), 6) for v in kl]}])
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(out, fingerprint, step + 1, translators, opt, sched)
        bar.update(1)
        bar.set_postfix(kl=f"{float(kl.mean()) / math.log(2):.3f}b")
    bar.close()
    if rank != 0:
        state.wait_for_everyone()          # until rank 0 has written the lens
        return None
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "lens.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in translators.state_dict().items()}, str(tmp))
    history = [r for r in read_jsonl(out / "log.jsonl") if r["step"] <= cfg.steps]
    info = {"fingerprint": fingerprint, "settings": settings, "langs": langs, "layers": translators.n_layers,
            "hidden_size": dcfg.hidden_size, "tokens_per_language": {l: sum(map(len, per_lang[l])) for l in langs},
            "kl_first": float(np.mean(history[0]["kl_bits"])) if history else float("nan"),
            "kl_last": float(np.mean(history[-1]["kl_bits"])) if history else float("nan"),
            "objective": "KL(final || lens), mean over tokens, summed over layers", "optimizer":
            f"SGD nesterov momentum {beta}, lr {cfg.lr_scale * (1 - beta)} linear decay, weight decay "
            f"{cfg.weight_decay}, grad norm clip 1.0"}
    write_json(out / "lens.json", info)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    if state:
        state.wait_for_everyone()
    return TuneLensResult(info, out)


def _save_checkpoint(out: Path, fingerprint: str, step: int, translators, opt, sched) -> None:
    with atomic_path(out / "checkpoint.pt") as tmp:
        torch.save({"fingerprint": fingerprint, "step": step, "translators": translators.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)


def _resume(out: Path, fingerprint: str, translators, opt, sched, write: bool = True) -> int:
    """The step to start from: a checkpoint of the same settings, else 0 (and, when `write`, an old
    log is cut: only one process may)."""
    path = out / "checkpoint.pt"
    step = 0
    if path.is_file():
        state = torch.load(path, map_location=translators.weight.device, weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise PolyalignError(f"{out} holds a tuned-lens checkpoint of other settings; choose another --output")
        translators.load_state_dict(state["translators"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    log_path = out / "log.jsonl"
    if write and log_path.is_file():       # steps logged after the checkpoint are redone: drop their lines
        from polyalign.store import write_jsonl
        write_jsonl(log_path, [r for r in read_jsonl(log_path, repair=True) if r["step"] <= step])
    return step


# ============================================================================= use in `polyalign lens`
def check_lens_kind(kind: str, folder: str | None) -> None:
    if kind not in LENS_KINDS:
        raise PolyalignError(f"unknown lens {kind!r}; use {', '.join(LENS_KINDS)}")
    if kind != "logit":
        if not folder:
            raise PolyalignError(f"--lens {kind} needs --tuned-lens DIR (a folder written by `polyalign tune-lens`)")
        if not Path(folder, "lens.safetensors").is_file():
            raise PolyalignError(f"no tuned lens at {folder} (lens.safetensors missing); train one with "
                                 f"`polyalign tune-lens`")


@dataclass
class TunedView:
    """The tuned lens read on one model: its folder, a fingerprint of its file, a loader."""
    folder: str
    fingerprint: str

    def load(self, model) -> Translators:
        return load_translators(self.folder, model)[0]


def lens_views(specs: list, kind: str, folder: str | None) -> tuple[list, dict[str, TunedView]]:
    """The (model, lens) pairs `polyalign lens` reads: for `both`, each model's logit lens followed by
    its tuned lens (labelled <model>-tuned), so that they are drawn side by side."""
    from polyalign.analysis.common import AnalysedModel
    if kind == "logit":
        return specs, {}
    import hashlib
    view = TunedView(folder, hashlib.sha256(Path(folder, "lens.safetensors").read_bytes()).hexdigest()[:16])
    out, tuned = [], {}
    for s in specs:
        if kind == "both":
            out.append(s)
        t = AnalysedModel(f"{s.label}-tuned", s.model, s.adapter)
        out.append(t)
        tuned[t.label] = view
    return out, tuned
