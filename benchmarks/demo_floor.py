"""The least time a run's evaluation and training steps can take on a CPU: their matmul FLOPs (read from
the run's own records) divided by the fp32 (or bf16) matmul peak. A lower bound: it leaves out attention,
element-wise work, the validation passes, padding, the lens, loading and installing.

    .venv/bin/python benchmarks/demo_floor.py runs/demo [--peak 69]      (GFLOP/s; default: measured here)

Per token, a decoder-layer weight matrix costs 2 FLOPs per parameter forward; training adds the same
again backward for the input gradient (the base is frozen: no weight gradients but LoRA's, which are
negligible). The vocabulary head costs 2 * hidden * vocab per scored position forward, and as much again
backward in training. Evaluation scores one answer position per item (calibration's few reference
prompts per language are left out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_eval import layer_params, matmul_peak

from polyalign.engine.model_parts import unwrap


def shapes(model: str) -> tuple[int, int, int]:
    """(decoder-layer parameters, hidden size, vocabulary) of a model, counted as bench_eval counts them."""
    from polyalign.models import load_model
    m = unwrap(load_model(model, "fp32", "cpu", progress=False).model)
    head = m.get_output_embeddings().weight
    return layer_params(m), head.shape[1], head.shape[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a `polyalign run` folder")
    ap.add_argument("--peak", type=float, default=None, help="matmul peak in GFLOP/s (default: measure fp32 here)")
    ap.add_argument("--model", default="gemma-3-270m", help="the model the run used")
    args = ap.parse_args()
    params, hidden, vocab = shapes(args.model)
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
