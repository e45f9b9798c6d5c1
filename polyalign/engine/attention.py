"""Packed attention: the items of one batch concatenated into one row, taken apart only in attention.

`packed_attention` is a transformers AttentionInterface function: it lays each item's queries out
against [prefix keys; its own keys] with an explicit causal / sliding-window mask (see the runner's
docstring for why it is bitwise a batch-1 forward on a CPU).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from polyalign.engine.model_parts import decoder_of

PACKED_ATTENTION = "polyalign_packed"
# Families whose attention modules pass their arguments through transformers' AttentionInterface
# with plain scaled-dot-product semantics (no logit softcapping); tested: llama, qwen2, gemma3.
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"}


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
