"""The batch planner (batching.plan_batches, and PrefixRunner.batches that calls it): a valid cover
of the items, and the cheapest cut (checked by brute force)."""
import itertools
import random

import pytest

from polyalign.engine.batching import plan_batches
from polyalign.engine.runner import PrefixRunner
from testdevice import DEVICE


def planner(budget, forward_cost, pad_weight=1.0):
    r = PrefixRunner.__new__(PrefixRunner)       # the planner needs no model
    r.token_budget, r.forward_cost, r.pad_weight = budget, forward_cost, pad_weight
    return r


def cost(batches, lengths, forward_cost, pad_weight=1.0):
    """Per batch: a fixed cost, its real tokens, and pad_weight per padding token."""
    total = 0
    for b in batches:
        real, padded = sum(lengths[i] for i in b), len(b) * max(lengths[i] for i in b)
        total += forward_cost + real + pad_weight * (padded - real)
    return total


def brute_force(lengths, budget, forward_cost, pad_weight):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=len(order) - 1):
        batches, cur = [], [order[0]]
        for c, i in zip(cuts, order[1:]):
            if c:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        if all(len(b) == 1 or len(b) * lengths[b[0]] <= budget for b in batches):
            best = min(best, cost(batches, lengths, forward_cost, pad_weight))
    return best


@pytest.mark.parametrize("via", ["plan_batches", "runner"])
@pytest.mark.parametrize("seed", range(10))
def test_batches_are_the_cheapest_valid_cut(seed, via):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 11))]
    budget, fc, pw = rng.choice([40, 100, 400]), rng.choice([0, 8, 64]), rng.choice([1.0, 0.25])
    if via == "plan_batches":
        batches = plan_batches(lengths, budget, fc, pw)
    else:
        batches = planner(budget, fc, pw).batches(lengths)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))                      # every item once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)    # longest first
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    assert cost(batches, lengths, fc, pw) == pytest.approx(brute_force(lengths, budget, fc, pw))


def test_batches_less_padding_than_filling_to_the_budget():
    lengths = [300, 280, 250, 120, 110, 100, 90, 40, 35, 30, 25, 20]
    batches = planner(2048, 64).batches(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    greedy = 6 * 300 + 6 * 90            # fill each batch up to 2048 tokens, longest first
    assert padded - sum(lengths) < (greedy - sum(lengths)) / 3


def test_packed_forward_equals_padded_forward(tiny_model_path):
    """The packed path (one concatenated row, re-padded only inside attention) gives the hidden states
    of the padded path at every real position, every layer; also with no prefix and with a prefix
    longer than Gemma3's sliding window (the tiny config's is 32 tokens)."""
    import torch
    from polyalign.models import load_model

    lm = load_model(tiny_model_path, dtype="fp32", device=DEVICE)
    runner = PrefixRunner(lm.model, lm.tokenizer)
    assert runner.packed                              # llama, qwen2 and gemma3 all take the packed path
    tok = lm.tokenizer
    prefix_ids = tok("Review: a long few-shot prefix " * 6, add_special_tokens=True)["input_ids"]
    assert len(prefix_ids) > 40
    suffixes = [tok(t, add_special_tokens=False)["input_ids"] for t in
                ["Great kettle, boils fast and looks nice on the counter.", "Meh.", "Broke after two days, sadly."]]
    def run(packed: bool, per_item: bool, ids):
        runner.packed, runner.per_item = packed, per_item
        runner._prefixes.clear()                      # each path builds its own kind of prefix
        prefix = runner.prefix(ids, hidden_states=True)
        return prefix, runner.forward(prefix, suffixes, hidden_states=True)

    for ids in (prefix_ids, []):
        prefix_r, (last_r, hid_r) = run(False, False, ids)
        for per_item in (True, False):                # attention item by item (CPU) or padded (GPU)
            prefix_p, (last_p, hid_p) = run(True, per_item, ids)
            assert len(hid_p) == len(hid_r)
            for b, s in enumerate(suffixes):
                n = len(s)
                torch.testing.assert_close(last_p[b, :n], last_r[b, :n], atol=1e-5, rtol=1e-5)
                for hp, hr in zip(hid_p, hid_r):
                    torch.testing.assert_close(hp[b, :n], hr[b, :n], atol=1e-5, rtol=1e-5)
            if ids:
                for hp, hr in zip(prefix_p.hidden, prefix_r.hidden):
                    torch.testing.assert_close(hp, hr, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="a property of the CPU attention kernel")
def test_cpu_bf16_items_are_bitwise_a_batch1_forward(tiny_model_path):
    """bf16 on a CPU: each packed item's hidden states are exactly those of a batch-1 forward of
    [prefix; item], so the evaluator's numbers are the naive loop's. Lengths cover the kernel's
    small last query blocks (1-3 rows), both smaller block sizes, items long enough to keep their
    heads apart (FOLD_BELOW) and Gemma3's sliding window; with no prefix and with a short one (items
    of 16+ tokens: see KV_ALIGN)."""
    import torch
    from polyalign.models import load_model
    from polyalign.engine.attention import FOLD_BELOW, SMALL_BLOCK, last_query_block
    from polyalign.engine.model_parts import decoder_of

    lm = load_model(tiny_model_path, dtype="bf16", device="cpu")
    runner = PrefixRunner(lm.model, lm.tokenizer, token_budget=4096)
    assert runner.packed and runner.per_item
    gen = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    prefix_ids = torch.randint(5, vocab, (21,), generator=gen).tolist()
    for ids in ([], prefix_ids):
        lengths = [1, 3, 7, 15, 30, 33, 34, 35, 66, 97, 180, 193, 194, 195, 240, 259, 300, 420, 453]
        lengths = [n - len(ids) for n in lengths if n - len(ids) >= (16 if ids else 1)]
        assert any(last_query_block(len(ids) + n) < SMALL_BLOCK for n in lengths)
        assert max(lengths) * 2 >= FOLD_BELOW                 # the tiny models fold 2 heads per key head
        suffixes = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]
        prefix = runner.prefix(ids)
        last, _ = runner.forward(prefix, suffixes)
        with torch.inference_mode():
            for b, s in enumerate(suffixes):
                ref = decoder_of(lm.model)(input_ids=torch.tensor([ids + s])).last_hidden_state[0, len(ids):]
                assert torch.equal(last[b, :len(s)], ref), (len(ids), len(s))


def test_prepacked_linears_give_the_same_bits(tiny_llama_path):
    """bf16 on a CPU: forwards through oneDNN-prepacked weights equal plain F.linear bit for bit,
    follow in-place weight changes, and leave the modules as they were."""
    import torch
    from polyalign.models import load_model

    lm = load_model(tiny_llama_path, dtype="bf16", device="cpu")
    runner = PrefixRunner(lm.model, lm.tokenizer)
    from polyalign import hardware
    if not hardware.native_bf16():
        pytest.skip(f"oneDNN bf16 prepacking needs avx512_bf16 or AMX; this CPU: {hardware.cpu_class()}")
    assert runner.linears.packed          # native bf16: prepacking must be active
    prefix = runner.prefix(lm.tokenizer("Review: fine.\nAnswer: \"", add_special_tokens=True)["input_ids"])
    suffixes = [[5, 6, 7, 8], [9, 10]]
    packed, _ = runner.forward(prefix, suffixes)
    saved, runner.linears.packed = runner.linears.packed, {}
    plain, _ = runner.forward(prefix, suffixes)
    assert torch.equal(packed, plain)
    runner.linears.packed, before = saved, plain
    lin = next(iter(saved))
    with torch.no_grad():
        lin.weight.mul_(2)                                  # changed in place after packing
    packed, _ = runner.forward(prefix, suffixes)
    runner.linears.packed = {}
    plain, _ = runner.forward(prefix, suffixes)
    assert torch.equal(packed, plain) and not torch.equal(packed, before)
    assert all("forward" not in m.__dict__ for m in saved)
