"""The least time a run's evaluation and training steps can take on a CPU: their matmul FLOPs (read from
the run's own records) divided by the fp32 (or bf16) matmul peak. A lower bound: it leaves out attention,
element-wise work, the validation passes, padding, the lens, loading and installing.

    .venv/bin/python benchmarks/demo_floor.py runs/demo [--peak 69]      (GFLOP/s; default: measured here)

Per token, a decoder-layer weight matrix costs 2 FLOPs per parameter forward; training adds the same
again backward for the input gradient (the base is frozen: no weight gradients but LoRA's, which are
negligible). The vocabulary head costs 2 * hidden * vocab per scored position forward, and as much again
backward in training. Evaluation scores one answer position per item and reference prompt.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_eval import matmul_peak


def shapes(model_dir: str) -> tuple[int, int, int]:
    """(decoder-layer parameters, hidden size, vocabulary) from a Hugging Face config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * hd * (2 * heads + 2 * kv) + 3 * h * inter      # q, o; k, v; gate, up, down
    return layers * per_layer, h, cfg["vocab_size"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a `polyalign run` folder")
    ap.add_argument("--peak", type=float, default=None, help="matmul peak in GFLOP/s (default: measure fp32 here)")
    ap.add_argument("--model-dir", default=None, help="the model's folder (default: the embedded Gemma's cache)")
    args = ap.parse_args()
    if args.model_dir is None:
        from polyalign.models import embedded_gemma_path
        args.model_dir = str(embedded_gemma_path())
    params, hidden, vocab = shapes(args.model_dir)
    if args.peak is None:
        import torch
        args.peak = matmul_peak(torch.float32, torch.device("cpu")) / 1e9
    rows = []
    for step in sorted(Path(args.run, "steps").iterdir()):
        if step.name.startswith("eval-") and (step / "results.json").is_file():
            t = json.loads((step / "results.json").read_text())["timing"]
            tokens = t["tokens_per_s"] * t["scoring_s"]
            flops = 2 * params * tokens + 2 * hidden * vocab * t["items_scored"]
            rows.append((step.name, f"{t['items_scored']} items, {tokens:,.0f} tokens", flops, t["scoring_s"]))
        elif step.name.startswith("train-") and (step / "summary.json").is_file():
            s = json.loads((step / "summary.json").read_text())
            flops = 4 * params * s["train_tokens"] + 4 * hidden * vocab * s["target_tokens"]
            rows.append((step.name, f"{s['steps']} steps, {s['train_tokens']:,} tokens, {s['target_tokens']:,} targets",
                         flops, s["seconds"]))
    print(f"decoder-layer parameters {params / 1e6:.1f}M, hidden {hidden}, vocabulary {vocab:,}; "
          f"matmul peak {args.peak:.0f} GFLOP/s\n")
    print("| step | work | TFLOP | floor s | measured s | share of peak |")
    print("|---|---|---:|---:|---:|---:|")
    total_f = total_m = 0.0
    for name, work, flops, measured in rows:
        floor = flops / (args.peak * 1e9)
        total_f, total_m = total_f + flops, total_m + measured
        print(f"| {name} | {work} | {flops / 1e12:.2f} | {floor:.0f} | {measured:.0f} | {floor / measured:.0%} |")
    floor = total_f / (args.peak * 1e9)
    print(f"| **all** | | **{total_f / 1e12:.2f}** | **{floor:.0f}** | {total_m:.0f} | {floor / max(total_m, 1e-9):.0%} |")


if __name__ == "__main__":
    main()
