"""Batched forward passes that reuse the key/value cache of a shared prompt prefix.

Every prompt of one (task, language, label mode) starts with the same few-shot demos. Their
cache is computed once; items then run only their own tokens, right-padded (so that causal
attention keeps padding invisible to real tokens), sorted by length and batched by a token
budget. Callers receive the decoder's hidden states and pick the positions they need, so the
vocabulary is projected only where logits are used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


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
    head = unwrap(model).get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype)).float()
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
    cache: object                    # the model's past_key_values after the prefix
    hidden: tuple | None = None      # per-layer hidden states of the prefix, if asked for


class PrefixRunner:
    def __init__(self, model, tokenizer, token_budget: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # Rows x padded length per forward: large enough for efficient matmuls, small enough for memory.
        self.token_budget = token_budget or (16384 if self.device.type == "cuda" else 2048)
        # A forward's fixed cost in tokens' worth: on a CPU ~1 ms a token vs ~50 ms a call.
        self.forward_cost = 64 if self.device.type == "cpu" else 512
        self._prefixes: dict[tuple, Prefix] = {}

    @torch.inference_mode()
    def prefix(self, ids: list[int], hidden_states: bool = False) -> Prefix:
        key = (tuple(ids), hidden_states)
        if not ids:  # nothing shared (e.g. zero-shot without a BOS token): no cache
            return Prefix([], None, None)
        if key not in self._prefixes:
            if len(self._prefixes) > 8:
                self._prefixes.clear()
            out = decoder_of(self.model)(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                                         output_hidden_states=hidden_states)
            self._prefixes[key] = Prefix(list(ids), out.past_key_values,
                                         out.hidden_states if hidden_states else None)
        return self._prefixes[key]

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length (longest first), cut into batches under the token budget.

        The cuts minimise the padded tokens computed plus a fixed cost per forward pass
        (`forward_cost` tokens' worth: per-call overheads and the answer-position head). Greedy
        filling up to the budget wastes ~30% on padding when lengths spread widely; the optimal
        cut of the sorted list (a small dynamic programme) wastes a few percent. Deterministic in
        `lengths`, so a resumed run recomputes exactly the same batches."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        n = len(order)
        best = [0.0] + [float("inf")] * n   # best[j]: cheapest cut of order[:j]
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):           # batch = order[i:j]; its longest is order[i]
                width = max(lengths[order[i]], 1)
                if (j - i) * width > self.token_budget and i < j - 1:
                    break
                cost = best[i] + self.forward_cost + (j - i) * width
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        out, j = [], n
        while j > 0:
            out.append(order[cut[j]:j])
            j = cut[j]
        return out[::-1]

    @torch.inference_mode()
    def forward(self, prefix: Prefix, suffixes: list[list[int]], hidden_states: bool = False):
        """Run right-padded `suffixes` after `prefix`; returns (last_hidden [B,Q,H], all hidden or None)."""
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

