"""Batched forward passes that reuse the key/value cache of a shared prompt prefix.

Every prompt of one (task, language, label mode) starts with the same few-shot demos. Their
cache is computed once; items then run only their own tokens, sorted by length and batched by
a token budget. Callers receive the decoder's hidden states and pick the positions they need,
so the vocabulary is projected only where logits are used.

Two ways to run a batch, with the same results:
- packed (the model families in PACKED_MODEL_TYPES): the items' tokens are concatenated into
  one row, so every matmul, norm and MLP sees real tokens only, and the batch-1 prefix cache is
  neither copied nor repeated. Only attention takes the items apart: `packed_attention` (a
  transformers AttentionInterface function) lays each item's queries out against [prefix keys;
  its own keys] with an explicit causal / sliding-window mask, and folds the query heads that
  share a key/value head into one (exact for grouped-query attention, and larger blocks). On a
  CPU it runs item by item, without padding, laid out as a batch-1 forward of the whole prompt
  lays it out, which makes each item's numbers bitwise those of scoring it alone (see KV_ALIGN
  and last_query_block); on a GPU, one call per layer over items padded to the longest.
- padded (any other model): right-padded rows (causal attention keeps padding invisible to real
  tokens) after a copy of the prefix cache repeated per row.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from . import hardware

log = logging.getLogger(__name__)

PACKED_ATTENTION = "polyalign_packed"
# Families whose attention modules pass their arguments through transformers' AttentionInterface
# with plain scaled-dot-product semantics (no logit softcapping); tested: llama, qwen2, gemma3.
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"}


def unwrap(model):
    """The plain transformers CausalLM under an optional PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    return unwrap(model).get_decoder()


def final_norm(model):
    dec = decoder_of(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if hasattr(dec, name):
            return getattr(dec, name)
    raise AttributeError(f"no final norm found on {type(dec).__name__}")


def unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states -> logits in fp32, as the model's own head does (incl. Gemma's softcap)."""
    return head_to_fp32(model, head_logits(model, hidden))


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output head's raw product, in the head's dtype (see head_to_fp32)."""
    head = unwrap(model).get_output_embeddings()
    return head(hidden.to(head.weight.dtype))


def head_to_fp32(model, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    cap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def max_context(model, tokenizer) -> int:
    n = getattr(unwrap(model).config, "max_position_embeddings", None) or 1 << 30
    t = getattr(tokenizer, "model_max_length", None)
    return min(n, t) if t and t < 1 << 30 else n


@dataclass
class Prefix:
    ids: list[int]
    cache: object                    # padded path: the model's past_key_values; packed: [(keys, values)] per layer
    hidden: tuple | None = None      # per-layer hidden states of the prefix, if asked for


# The CPU flash-attention kernel sums the tail of a key block that does not fill its fp32 vectors
# with scalar code (another exp, another order). A prefix computed on its own would put its last
# keys in that tail, where a full-prompt forward has them inside its vectors; running the prefix
# with filler up to a multiple of this (≥ any CPU's fp32 vector width) keeps every prefix row as
# the full-prompt forward computes it.
KV_ALIGN = 16


def last_query_block(S: int) -> int:
    """Rows in the last query block of torch's CPU flash attention over S queries (its split
    sizes: 32 below 192 queries, 64 below 768, else 256). Blocks of fewer than SMALL_BLOCK rows
    are multiplied by other kernels, with other rounding, than the larger ones."""
    split = 32 if S < 192 else 64 if S < 768 else 256
    return S - (S - 1) // split * split


SMALL_BLOCK = 4
# From 768 query rows the kernel's blocks grow to 256 rows, slower here than 64-row blocks (head_dim
# 256: 5.7 vs 4.9 ms for 400 tokens). Folded heads multiply the rows, so long items keep heads apart.
FOLD_BELOW = 768


def scatter_rows(x: torch.Tensor, slots: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Packed tokens [T, ...] -> right-padded [rows, width, ...]: token t goes to flat slot slots[t]."""
    out = x.new_zeros(rows * width, *x.shape[1:])
    return out.index_copy_(0, slots, x).view(rows, width, *x.shape[1:])


@dataclass
class PackedLayout:
    """Where each item's tokens sit in the packed row, and the prefix keys/values they all attend to."""
    lengths: list[int]          # tokens per item, in packed order
    prefix_len: int
    slots: torch.Tensor         # packed token t -> row * width + position in a padded [batch, width] layout
    prefix_kv: list | None      # [(keys, values) [1, Hkv, prefix_len, D]] per layer, or None
    per_item: bool              # one attention call per item (CPU: bitwise as a batch-1 forward) or one padded call
    record: dict | None = None  # if set, every layer's (keys, values) are kept here (to build a prefix)
    _masks: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:     # the longest item: batched attention pads to it
        return max(self.lengths)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, heads, tokens, dim] packed -> [batch, width, heads, dim] (zeros at padding)."""
        return scatter_rows(x[0].transpose(0, 1), self.slots, self.batch, self.width)

    def mask(self, rep: int, window: int | None, dtype, device) -> torch.Tensor:
        """[1, 1, width*rep, P+width]: query row i*rep+r (position P+i) may see a key at position
        kp iff kp <= P+i and, in a sliding-window layer, P+i - kp < window. An item of n tokens
        uses the leading [n*rep, P+n] block."""
        key = (rep, window, dtype)
        if key not in self._masks:
            P = self.prefix_len
            q = P + torch.arange(self.width * rep, device=device) // rep
            k = torch.arange(P + self.width, device=device)
            ok = k[None, :] <= q[:, None]
            if window is not None:
                ok &= (q[:, None] - k[None, :]) < window
            # Additive, in the query's dtype: what SDPA would turn a boolean mask into on every call.
            self._masks[key] = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))[None, None]
        return self._masks[key]


def _attention_backends(device):
    """On CUDA, keep SDPA off cuDNN: it builds a plan per new shape, and every batch here has its
    own (H100, 2000 Amazon items of a Gemma-3-270M-shaped model: 16.2 s with cuDNN, 4.2 s without)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _heads_apart(q, k, v, mask, scaling):
    """q [1, H, n, D] against k/v [1, Hkv, S, D] with a [1, 1, n, S] mask -> [n, H, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)[0].transpose(0, 1)


def _heads_folded(q, k, v, mask, scaling):
    """The same with the rep query heads of each key head folded into one: larger blocks, and a
    multiple of rep rows. mask: [1, 1, n * rep, S] (query row i*rep + r is token i, head r)."""
    _, H, n, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    q = q.view(1, Hkv, rep, n, D).transpose(2, 3).reshape(1, Hkv, n * rep, D)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return o.view(Hkv, n, rep, D).transpose(0, 1).reshape(n, H, D)


def _attention_per_item(lay, query, key, value, pk, pv, mask, scaling):
    """Each item against exactly [prefix; its own keys], so the kernel blocks the keys and sums
    each row as a batch-1 forward of the whole prompt does: bitwise equal results. Rows that the
    batch-1 forward puts in a small last query block get a call with that block alone."""
    rep = query.shape[1] // key.shape[1]
    outs, start, P = [], 0, lay.prefix_len
    for n in lay.lengths:
        q = query[:, :, start:start + n]
        k, v = key[:, :, start:start + n], value[:, :, start:start + n]
        if pk is not None:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        tail = last_query_block(P + n)
        cut = n - tail if tail < SMALL_BLOCK and tail < n else n
        if cut and (cut * rep < FOLD_BELOW or last_query_block(cut) < SMALL_BLOCK):
            outs.append(_heads_folded(q[:, :, :cut], k, v, mask[:, :, :cut * rep, :P + n], scaling))
        elif cut:
            outs.append(_heads_apart(q[:, :, :cut], k, v, mask[:, :, :cut * rep:rep, :P + n], scaling))
        if cut < n:
            outs.append(_heads_apart(q[:, :, cut:], k, v, mask[:, :, cut * rep:n * rep:rep, :P + n], scaling))
        start += n
    return torch.cat(outs)[None]


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, polyalign_layout: PackedLayout | None = None, **kwargs):
    """Attention of packed items (query [1, H, T, D], own key/value [1, Hkv, T, D]) over the shared
    prefix plus each item's own earlier tokens; returns ([1, T, H, D], None)."""
    lay = polyalign_layout
    if lay is None or softcap is not None:
        raise RuntimeError("packed_attention needs a PackedLayout and no logit softcapping")
    if lay.record is not None:
        lay.record[module.layer_idx] = (key, value)
    pk, pv = lay.prefix_kv[module.layer_idx] if lay.prefix_kv is not None else (None, None)
    H, D, Hkv = query.shape[1], query.shape[3], key.shape[1]
    rep = H // Hkv
    mask = lay.mask(rep, sliding_window, query.dtype, query.device)
    if lay.per_item:
        return _attention_per_item(lay, query, key, value, pk, pv, mask, scaling), None
    B, W = lay.batch, lay.width
    q = lay.pad(query).view(B, W, Hkv, rep, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, W * rep, D)
    k, v = lay.pad(key).transpose(1, 2), lay.pad(value).transpose(1, 2)
    if pk is not None:
        k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    with _attention_backends(query.device):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    out = out.view(B, Hkv, W, rep, D).permute(0, 2, 1, 3, 4).reshape(B * W, H, D)
    return out.index_select(0, lay.slots)[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packable(model) -> bool:
    cfg = decoder_of(model).config
    return (cfg.model_type in PACKED_MODEL_TYPES and not getattr(cfg, "attn_logit_softcapping", None)
            and cfg._attn_implementation in ("sdpa", "eager"))


class PrepackedLinears:
    """oneDNN-prepacked copies of the decoder's bf16 linear weights for forwards on a CPU: what
    torch.compile's weight freezing does, without the compile (here ~4% faster end to end, and
    bitwise the same outputs: checked once at start, else not used). The copies cost their size
    again in memory, so only decoders up to `max_bytes` get them."""

    def __init__(self, model, max_bytes: int = 4 << 30):
        self.packed: dict = {}
        lins = [m for m in decoder_of(model).modules() if isinstance(m, torch.nn.Linear)
                and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
        # Without native bf16 oneDNN's packed kernels round otherwise than plain F.linear (seen on
        # AVX2-only CPUs), and bf16 there is emulated anyway: models.resolve_dtype already warned.
        if not lins or sum(m.weight.numel() * 2 for m in lins) > max_bytes or not hardware.native_bf16():
            return
        try:
            with torch.no_grad():
                self.packed = {m: self._pack(m) for m in lins}
                m = lins[0]
                x = torch.randn(5, m.in_features, dtype=torch.bfloat16)
                if not torch.equal(self._linear(self.packed[m], m, x), F.linear(x, m.weight, m.bias)):
                    log.warning("oneDNN-prepacked bf16 weights are not bitwise the plain ones on this CPU "
                                "(%s): using plain linears", hardware.cpu_class())
                    self.packed = {}
        except (RuntimeError, AttributeError):      # no oneDNN in this torch build
            self.packed = {}

    @staticmethod
    def _pack(m):
        return torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 512), m.weight._version

    @staticmethod
    def _linear(packed, m, x, *args, **kwargs):
        return torch.ops.mkldnn._linear_pointwise(x, packed[0], m.bias, "none", [], "")

    @contextlib.contextmanager
    def active(self):
        for m in self.packed:
            if self.packed[m][1] != m.weight._version:     # the weights were changed in place: pack again
                self.packed[m] = self._pack(m)
            m.forward = partial(self._linear, self.packed[m], m)
        try:
            yield
        finally:
            for m in self.packed:
                m.__dict__.pop("forward", None)


class PrefixRunner:
    def __init__(self, model, tokenizer, token_budget: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # Rows x padded length per forward: large enough for efficient matmuls, small enough for memory.
        self.token_budget = token_budget or (16384 if self.device.type == "cuda" else 8192)
        # A forward's fixed cost in tokens' worth: on a CPU ~1 ms a token vs ~50 ms a call.
        self.forward_cost = 64 if self.device.type == "cpu" else 512
        self._prefixes: dict[tuple, Prefix] = {}
        self.packed = packable(model)
        # On a CPU, attention runs item by item: bitwise what a batch-1 forward gives, and no padding.
        # GPUs (whose kernels tile differently anyway) get one padded call per layer.
        self.per_item = self.device.type == "cpu"
        # What a padding token costs: a whole token when padded rows run through the model, ~1/4 when
        # only batched attention pads (packed on a GPU), nothing when attention runs item by item.
        self.pad_weight = 1.0 if not self.packed else 0.0 if self.per_item else 0.25
        self.linears = PrepackedLinears(model)

    def fast_paths(self) -> dict:
        """Which of the fast paths this runner takes (results.json records them)."""
        return {"packed_rows": self.packed, "per_item_attention": self.packed and self.per_item,
                "prepacked_linears": bool(self.linears.packed)}

    @torch.inference_mode()
    def prefix(self, ids: list[int], hidden_states: bool = False) -> Prefix:
        key = (tuple(ids), hidden_states)
        if not ids:  # nothing shared (e.g. zero-shot without a BOS token): no cache
            return Prefix([], None, None)
        if key not in self._prefixes:
            if len(self._prefixes) > 8:
                self._prefixes.clear()
            with self.linears.active():
                if self.packed:
                    self._prefixes[key] = self._prefix_packed(list(ids), hidden_states)
                else:
                    out = decoder_of(self.model)(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                                                 output_hidden_states=hidden_states)
                    self._prefixes[key] = Prefix(list(ids), out.past_key_values,
                                                 out.hidden_states if hidden_states else None)
        return self._prefixes[key]

    def _prefix_packed(self, ids: list[int], hidden_states: bool) -> Prefix:
        """The prefix's keys/values (all positions, sliding layers too), run with filler up to a
        multiple of KV_ALIGN and cut back (see KV_ALIGN): causal, so the filler changes nothing before it."""
        P = len(ids)
        filled = ids + ids[-1:] * (-P % KV_ALIGN)
        record: dict = {}
        layout = PackedLayout([len(filled)], 0, torch.arange(len(filled), device=self.device), None,
                              self.per_item, record)
        _, hidden = self._run_packed(filled, layout, hidden_states)
        kv = [(record[i][0][:, :, :P].contiguous(), record[i][1][:, :, :P].contiguous()) for i in range(len(record))]
        return Prefix(ids, kv, tuple(h[:, :P] for h in hidden) if hidden_states else None)

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length (longest first), cut into batches under the token budget.

        The cuts minimise the work in tokens' worth: a fixed cost per forward pass (`forward_cost`:
        per-call overheads and the answer-position head), the real tokens, and `pad_weight` per
        padding token (1 when padded rows run through the whole model, less when only batched
        attention pads, 0 when attention runs item by item). Greedy filling up to the budget wasted ~30% on padding here; the optimal
        cut of the sorted list (a small dynamic programme) wastes a few percent. Deterministic in
        `lengths`, so a resumed run recomputes exactly the same batches."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        n = len(order)
        real = [0]                                  # real[j]: tokens in order[:j]
        for i in order:
            real.append(real[-1] + lengths[i])
        best = [0.0] + [float("inf")] * n   # best[j]: cheapest cut of order[:j]
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):           # batch = order[i:j]; its longest is order[i]
                width = max(lengths[order[i]], 1)
                if (j - i) * width > self.token_budget and i < j - 1:
                    break
                padding = (j - i) * width - (real[j] - real[i])
                cost = best[i] + self.forward_cost + real[j] - real[i] + self.pad_weight * padding
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        out, j = [], n
        while j > 0:
            out.append(order[cut[j]:j])
            j = cut[j]
        return out[::-1]

    @torch.inference_mode()
    def forward(self, prefix: Prefix, suffixes: list[list[int]], hidden_states: bool = False):
        """Run `suffixes` after `prefix`; returns (last_hidden [B,Q,H], all hidden or None), right-padded
        to the longest suffix (padding positions hold zeros or junk: callers read real positions only)."""
        with self.linears.active():
            if self.packed:
                return self._forward_packed(prefix, suffixes, hidden_states)
            return self._forward_padded(prefix, suffixes, hidden_states)

    def _forward_padded(self, prefix: Prefix, suffixes: list[list[int]], hidden_states: bool):
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self.device)
        cache = None
        if prefix.ids:
            cache = copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(len(suffixes))
        out = decoder_of(self.model)(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                                     output_hidden_states=hidden_states)
        return out.last_hidden_state, (out.hidden_states if hidden_states else None)

    def _forward_packed(self, prefix: Prefix, suffixes: list[list[int]], hidden_states: bool):
        lengths = [len(s) for s in suffixes]
        width = max(lengths)
        slots = torch.tensor([b * width + i for b, n in enumerate(lengths) for i in range(n)], device=self.device)
        layout = PackedLayout(lengths, len(prefix.ids), slots, prefix.cache if prefix.ids else None, self.per_item)
        return self._run_packed([t for s in suffixes for t in s], layout, hidden_states)

    def _run_packed(self, tokens: list[int], layout: PackedLayout, hidden_states: bool):
        P, dev = layout.prefix_len, self.device
        ids = torch.tensor([tokens], device=dev)
        positions = torch.tensor([[P + i for n in layout.lengths for i in range(n)]], device=dev)
        B, width, slots = layout.batch, layout.width, layout.slots
        dec = decoder_of(self.model)
        before = dec.config._attn_implementation
        dec.config._attn_implementation = PACKED_ATTENTION   # for this call only: the model stays as loaded
        try:
            out = dec(input_ids=ids, position_ids=positions, use_cache=False,
                      output_hidden_states=hidden_states, polyalign_layout=layout)
        finally:
            dec.config._attn_implementation = before

        hidden = tuple(scatter_rows(h[0], slots, B, width) for h in out.hidden_states) if hidden_states else None
        return scatter_rows(out.last_hidden_state[0], slots, B, width), hidden
