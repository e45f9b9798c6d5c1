"""Evaluator speed: a naive loop vs polyalign's batched, prefix-cached scorer, in one process.

    .venv/bin/python benchmarks/bench_eval.py [--langs all] [--items 25] [--data ../shared/data/paper-release]
        [--model gemma-3-270m] [--device cpu|cuda]

Naive = batch 1, the full prompt through the CausalLM, full-vocabulary logits at every position,
the paper's token-set rule at the last one. Both see the same prompts and token sets. The roofline
is the fewest FLOPs any method must spend (every uncached query token through the decoder layers'
weights, plus one unembedding row per label token) divided by the bf16 matmul peak measured here;
a second column adds the attention each query token must do over the keys it sees (causal, within
the sliding window), which no exact method avoids either.

The matmul peak (best of 20 square bf16 matmuls) is measured before and after the runs and the
higher reading kept. Besides agreeing predictions it counts items whose scores are bitwise equal.

Where bf16 predictions differ, the items are scored again by the naive loop in fp32 to show which
side the exact answer takes (in fp32 the two methods agree within 1e-5: tests/test_scoring.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil
import torch

from polyalign import languages
from polyalign.data import load_data
from polyalign.models import load_model
from polyalign.engine.model_parts import unwrap
from polyalign.evaluation.scoring import Scorer, decide, naive_scores
from polyalign.tasks import load_task


class PeakRSS:
    """Samples this process's RSS in a thread; `.peak` is the maximum since the last reset."""
    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def reset(self):
        self.peak = self.proc.memory_info().rss


def matmul_peak(dtype, device, reps=20) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def layer_params(model) -> int:
    m = unwrap(model)
    emb = m.get_input_embeddings().weight.numel()
    head = m.get_output_embeddings().weight
    total = sum(p.numel() for p in m.parameters())
    return total - emb - (0 if head is m.get_input_embeddings().weight else head.numel())


def attention_flops(model, groups) -> int:
    """QK^T and AV for every uncached query token over the keys it sees, summed over layers."""
    cfg = unwrap(model).config
    cfg = getattr(cfg, "text_config", cfg)
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    total = 0
    for g in groups:
        for p in g.items:
            for pos in range(p.cached_len, len(p.ids) + len(g.plan.common)):
                for kind in kinds:
                    keys = pos + 1 if kind != "sliding_attention" or not window else min(pos + 1, window)
                    total += 4 * keys * width
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="amazon_polarity")
    ap.add_argument("--langs", default="all")
    ap.add_argument("--items", type=int, default=25)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/paper-release"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    rss = PeakRSS()
    lm = load_model(args.model, args.dtype, args.device)
    task = load_task(args.task)
    langs = languages.parse_langs(args.langs)
    data = load_data(task, langs, args.data, args.items)
    scorer = Scorer(lm.model, lm.tokenizer, "paper", args.batch_tokens)
    groups = [scorer.prepare(task, lang, "english", data.items[lang]) for lang in langs]
    n_items = sum(len(g.items) for g in groups)

    # The peak is measured before and after the runs and the higher kept: a low reading would
    # flatter the roofline shares.
    device = next(lm.model.parameters()).device
    peak_before = matmul_peak(lm.dtype, device)

    # --- polyalign
    rss.reset()
    t = time.perf_counter()
    fast = {}
    for g in groups:
        for batch in scorer.batches(g):
            for i, res in zip(batch, scorer.score(g, batch)):
                fast[(g.lang, i)] = res["scores"]
    t_fast = time.perf_counter() - t
    rss_fast = rss.peak

    # --- naive
    naive, t_naive, rss_naive = {}, float("nan"), 0
    if not args.skip_naive:
        rss.reset()
        t = time.perf_counter()
        for g in groups:
            for i, p in enumerate(g.items):
                naive[(g.lang, i)] = naive_scores(lm.model, lm.tokenizer, g.plan, p.text, "paper")
        t_naive = time.perf_counter() - t
        rss_naive = rss.peak

    peak = max(peak_before, matmul_peak(lm.dtype, device))
    n_layer = layer_params(lm.model)
    hidden = unwrap(lm.model).config.hidden_size
    query_tokens = sum(len(p.suffix) + len(g.plan.common) for g in groups for p in g.items)
    label_rows = sum(sum(len(s) for s in g.plan.sets) for g in groups for _ in g.items)
    roofline_s = (2 * n_layer * query_tokens + 2 * hidden * label_rows) / peak
    roofline_attn_s = roofline_s + attention_flops(lm.model, groups) / peak
    prefix_tokens = sum(len(g.prefix_ids) for g in groups)

    agree, verdict = "n/a", ""
    if naive:
        differ = [k for k in fast if decide(fast[k])[0] != decide(naive[k])[0]]
        diff = max(max(abs(a - b) for a, b in zip(fast[k], naive[k])) for k in fast)
        same = sum(fast[k] == naive[k] for k in fast)
        agree = f"{len(fast) - len(differ)}/{len(fast)} (max |Δscore| {diff:.2e}; bitwise-equal scores {same}/{len(fast)})"
        if differ and args.dtype != "fp32":
            exact = load_model(args.model, "fp32", args.device)
            by_lang = {g.lang: g for g in groups}
            sides = {"polyalign": 0, "naive": 0}
            for lang, i in differ:
                g = by_lang[lang]
                ref = decide(naive_scores(exact.model, exact.tokenizer, g.plan, g.items[i].text, "paper"))[0]
                sides["polyalign" if ref == decide(fast[(lang, i)])[0] else "naive"] += 1
            margins = [(lambda t: t[0] - t[1])(sorted(naive[k], reverse=True)) for k in differ]
            verdict = (f"; of the {len(differ)} that differ (naive's top-two margin ≤ {max(margins):.3f}), "
                       f"the fp32 forward sides with polyalign on {sides['polyalign']} and with naive on {sides['naive']}")

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"model {args.model} {lm.dtype} on {where}; {args.task}, {len(langs)} langs × "
          f"{args.items} items = {n_items}; {query_tokens} uncached query tokens, {prefix_tokens} prefix tokens")
    print(f"{args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s; decoder-layer params {n_layer / 1e6:.1f}M; "
          f"roofline {roofline_s:.2f} s = {n_items / roofline_s:.1f} items/s "
          f"({roofline_attn_s:.2f} s = {n_items / roofline_attn_s:.1f} items/s with attention)")
    print()
    print("| method | seconds | items/s | speed-up | roofline share | with attention | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    if naive:
        print(f"| naive loop (batch 1, full logits) | {t_naive:.1f} | {n_items / t_naive:.2f} | 1.00× | "
              f"{roofline_s / t_naive:.0%} | {roofline_attn_s / t_naive:.0%} | {rss_naive / 2**20:.0f} |")
    print(f"| polyalign (packed, prefix cache) | {t_fast:.1f} | {n_items / t_fast:.2f} | "
          f"{(t_naive / t_fast) if naive else float('nan'):.2f}× | {roofline_s / t_fast:.0%} | "
          f"{roofline_attn_s / t_fast:.0%} | {rss_fast / 2**20:.0f} |")
    print()
    print(f"paper-mode predictions identical: {agree}{verdict}")


if __name__ == "__main__":
    sys.exit(main())
