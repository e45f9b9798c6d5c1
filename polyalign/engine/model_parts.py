"""Where a causal LM keeps its parts (decoder, final norm, output head) under an optional PEFT wrapper,
and the vocabulary projection as the model's own head computes it."""
from __future__ import annotations

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
