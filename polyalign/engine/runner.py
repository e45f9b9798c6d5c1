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

import copy
from dataclasses import dataclass

import torch

from polyalign.engine.attention import KV_ALIGN, PACKED_ATTENTION, PackedLayout, packable, scatter_rows
from polyalign.engine.batching import plan_batches
from polyalign.engine.model_parts import decoder_of
from polyalign.engine.prepack import PrepackedLinears


@dataclass
class Prefix:
    ids: list[int]
    cache: object                    # padded path: the model's past_key_values; packed: [(keys, values)] per layer
    hidden: tuple | None = None      # per-layer hidden states of the prefix, if asked for


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
        """Indices sorted by length (longest first), cut into batches under this runner's token
        budget at the least work (see `batching.plan_batches`)."""
        return plan_batches(lengths, self.token_budget, self.forward_cost, self.pad_weight)

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
