"""Language neurons: activation counts vs a brute-force forward, LAPE vs numpy, deactivation vs
down_proj without those columns, and the command (outputs, resume, bad input)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from polyalign.analysis import activations as act

TEXTS = ["The blender crushes ice in seconds.", "Das Handy ist kaputt gegangen, leider.",
         "这本小说让我熬夜读到凌晨两点。", "A man is playing a guitar on stage while people watch.",
         "short", "Le film était long mais les acteurs étaient excellents et la musique aussi."]


def _load(path):
    from polyalign.models import load_model
    return load_model(path, "fp32", "cpu", progress=False)


def brute_force_counts(model, prefix, sequences, eps):
    """Each sequence alone through the model's own forward (no packing, no padding); the MLP input is
    caught by a pre-hook and act_fn(gate_proj(x)) recomputed from the weights for every token.
    Returns (lower, upper): a gate pre-activation within eps of zero may round to either sign between
    two forwards that sum in another order, so it counts in `upper` only."""
    layers = model.model.layers
    caught = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: caught.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(layers)]
    lo = np.zeros((len(layers), model.config.intermediate_size), dtype=np.int64)
    hi = lo.copy()
    try:
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([prefix + seq]))
                for i, layer in enumerate(layers):
                    x = caught[i][0, len(prefix):]                       # the text's tokens only
                    g = x @ layer.mlp.gate_proj.weight.T
                    fired, unsure = layer.mlp.act_fn(g) > 0, g.abs() < eps
                    lo[i] += (fired & ~unsure).sum(0).numpy()
                    hi[i] += (fired | unsure).sum(0).numpy()
    finally:
        for h in hooks:
            h.remove()
    return lo, hi


@pytest.mark.parametrize("packed", [True, False])
def test_counts_equal_brute_force(tiny_model_path, one_thread, packed):
    from polyalign.engine.runner import PrefixRunner
    lm = _load(tiny_model_path)
    runner = PrefixRunner(lm.model, lm.tokenizer, token_budget=64)   # several batches, with padding
    if not packed:
        runner.packed, runner.pad_weight = False, 1.0
    seqs = act.token_sequences(lm.tokenizer, TEXTS * 3, 10_000, 40)
    prefix = act.shared_prefix(lm.tokenizer)
    counts, tokens = act.count_activations(lm.model, runner, prefix, seqs)
    assert tokens == sum(map(len, seqs))
    lo, hi = brute_force_counts(lm.model, prefix, seqs, 1e-5)
    assert counts.shape == lo.shape
    assert (lo <= counts).all() and (counts <= hi).all()
    assert (hi - lo).sum() <= 1e-4 * tokens * counts.size   # values near zero are rare: the bounds are tight
    assert counts.sum() > 0 and (counts < tokens).any()


def test_unknown_mlp_is_one_line(tiny_llama_path):
    lm = _load(tiny_llama_path)

    class StrangeMLP(torch.nn.Module):
        def forward(self, x):
            return x

    lm.model.model.layers[1].mlp = StrangeMLP()
    from polyalign.errors import PolyalignError
    with pytest.raises(PolyalignError, match="StrangeMLP") as e:
        act.mlp_parts(lm.model)
    assert "\n" not in str(e.value)


def test_deactivation_removes_down_proj_columns(tiny_model_path, one_thread):
    lm = _load(tiny_model_path)
    layer = lm.model.model.layers[1]
    mlp = layer.mlp
    off = [3, 17, 64, 127]
    x = torch.randn(2, 5, lm.model.config.hidden_size)
    keep = [i for i in range(mlp.down_proj.weight.shape[1]) if i not in off]
    with torch.no_grad():
        hidden = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        manual = hidden[..., keep] @ mlp.down_proj.weight[:, keep].T
        with act.deactivated(lm.model, {1: off}):
            hooked = mlp(x)
        after = mlp(x)                                     # the hook is gone again
    torch.testing.assert_close(hooked, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, manual, atol=1e-4)
