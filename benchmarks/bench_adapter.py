"""What an unmerged LoRA adapter costs the evaluator: base vs adapter, standalone and after training.

    .venv/bin/python benchmarks/bench_adapter.py [--langs en,de,zh,ja] [--steps 2] [--dtype auto]

Trains a short "zh/de => en" LoRA on the bundled question pool (as the demo does, `steps` optimizer
steps), then scores the same bundled amazon_polarity items three ways, all side by side in this run:
- base: a fresh process, `polyalign evaluate` without the adapter;
- adapter, standalone: a fresh process, `polyalign evaluate --adapter`;
- adapter, in-run: in this process, right after the training, as `polyalign run` does its steps.
Each row is the evaluator's own scoring time (results.json `timing.scoring_s`, model loading excluded).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from polyalign import hardware
from polyalign.evaluation.evaluate import EvalConfig, evaluate
from polyalign.training.prepare import PrepareConfig, prepare
from polyalign.training.train import TrainConfig, train


def cli_eval(out: Path, langs: str, dtype: str, adapter: str | None) -> dict:
    cmd = [sys.executable, "-m", "polyalign", "evaluate", "--langs", langs, "--dtype", dtype, "--device", "cpu",
           "--output", str(out), "--no-progress"] + (["--adapter", adapter] if adapter else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "results.json").read_text("utf-8"))["timing"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--langs", default="en,de,zh,ja")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_adapter_"))
    prepare(PrepareConfig(task="amazon_polarity", sources="zh,de", output=str(tmp / "pairs"), per_language=60,
                          val_size=16, progress=False))
    started = time.time()
    train(TrainConfig(data=str(tmp / "pairs"), output=str(tmp / "adapter"), progress=False,
                      overrides=[f"max_steps={args.steps}", "micro_batch_size=16", "lr=2e-4", f"dtype={args.dtype}"]))
    train_s = time.time() - started
    in_run = evaluate(EvalConfig(langs=args.langs, dtype=args.dtype, device="cpu", adapter=str(tmp / "adapter"),
                                 output=str(tmp / "in-run"), progress=False))["timing"]
    base = cli_eval(tmp / "base", args.langs, args.dtype, None)
    alone = cli_eval(tmp / "alone", args.langs, args.dtype, str(tmp / "adapter"))

    print(f"CPU: {hardware.cpu_model()} ({hardware.cpu_class()}; torch {torch.__version__}, "
          f"kernels {hardware.aten_capability()}); {torch.get_num_threads()} threads; dtype {args.dtype}")
    print(f"items: {base['items_scored']} bundled amazon_polarity ({args.langs}); training: {args.steps} steps, "
          f"{train_s:.0f} s")
    print("| evaluation | scoring s | items/s | vs base |\n|---|---:|---:|---:|")
    for name, t in (("base (own process)", base), ("adapter, standalone (own process)", alone),
                    ("adapter, in-run after training", in_run)):
        print(f"| {name} | {t['scoring_s']:.1f} | {t['items_per_s']:.2f} | {t['scoring_s'] / base['scoring_s']:.2f}× |")


if __name__ == "__main__":
    main()
