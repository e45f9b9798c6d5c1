"""Benchmark: polyalign's trainer against a plain transformers Trainer + peft baseline, in one process.

    .venv/bin/python benchmarks/bench_train.py                     # 256 pairs, 1 epoch (about 15 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --pairs 16 --val 4  # smoke run (one optimizer step each)

Both train Gemma-3-270M (the embedded default; --model to change) on the same question-alignment pairs
from ../shared/data/paper-release/snli (zh,de => en), with the same weights and dtype (bf16 base, fp32
LoRA, bf16 autocast), the same LoRA (r=8, alpha=16, q_proj/v_proj, same initial values), the same
hyperparameters (lr 5e-5, cosine, 10% warmup, effective batch 16 = 4 x 4 accumulation, grad-norm clip
1.0, AdamW) and the same examples per epoch:

1. polyalign (`polyalign.training.train.train`): each step's 16 examples sorted by length into micro-batches of 4,
   no attention mask (right padding is causal-safe), the vocabulary projection only at target positions
   in chunks, gradients of the head computed chunk by chunk.
2. baseline: `transformers.Trainer` with `DataCollatorForSeq2Seq` (batches of 4 padded to the longest
   with an attention mask, labels -100 on the input side), full logits, Trainer's per-token loss over the
   accumulated batch (num_items_in_batch). By default it walks the very same random order as polyalign
   (so every optimizer step averages over the same 16 examples and the final losses should agree to
   rounding); `--baseline-order own` lets Trainer shuffle with its own sampler instead.

The validation loss of both final models is computed by one function (the model's own forward with
labels, per target token). Peak RSS is sampled during each phase. On a shared CPU, OpenMP threads that
busy-wait slow everything down several-fold, so the script sets OMP_WAIT_POLICY=PASSIVE unless it is set.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper-release"


class PeakRSS:
    """Samples this process's RSS in a thread; .peak_mb after the with-block."""

    def __init__(self, every: float = 0.05):
        import psutil
        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self.start_mb = self.proc.memory_info().rss / 2**20
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = self.peak / 2**20


def val_loss(model, examples, dtype) -> float:
    """Loss per target token of `model` on `examples`, from the model's own forward with labels."""
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for ex in examples:
            ids = torch.tensor([ex.ids])
            labels = torch.tensor([[-100] * ex.start + ex.ids[ex.start:]])
            loss = model(input_ids=ids, labels=labels).loss
            total += float(loss) * ex.n_target
            n += ex.n_target
    return total / n


def run_polyalign(args, data: Path, work: Path) -> dict:
    from polyalign.training.train import TrainConfig, train

    started = time.time()
    s = train(TrainConfig(data=str(data), output=str(work / "polyalign"), model=args.model, dtype=args.dtype,
                          progress=False,
                          overrides=[f"epochs={args.epochs}", "eval_steps=100000", "save_steps=100000",
                                     f"logging_steps={args.logging_steps}", f"seed={args.seed}",
                                     f"threads={args.threads}"]))
    return {"summary": s, "train_seconds": s["seconds"], "cpu_seconds": s["cpu_seconds"],
            "tokens": s["train_tokens"], "wall_seconds": time.time() - started}


def run_baseline(args, data: Path, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from polyalign.models import load_model
    from polyalign.store import read_jsonl
    from polyalign.training.train import Example, encode_pair

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.dtype, "cpu")
    tok = lm.tokenizer
    train_recs = read_jsonl(data / "train.jsonl")
    train_ex = [Example(*encode_pair(tok, r["input"], r["output"], 2048)[:2]) for r in train_recs]
    model = lm.model
    model.config.use_cache = False
    torch.manual_seed(args.seed)              # the same initial LoRA weights as polyalign's
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    steps_per_epoch = math.ceil(len(train_ex) / 16)
    total = math.ceil(args.epochs * steps_per_epoch)
    if args.baseline_order == "same":
        # polyalign's epoch permutations, in order: every optimizer step sees the same 16 examples.
        order = []
        for e in range(math.ceil(args.epochs)):
            g = torch.Generator().manual_seed(args.seed + e)
            order += torch.randperm(len(train_ex), generator=g).tolist()
        order = order[:total * 16] if args.epochs != int(args.epochs) else order
        epochs = 1
    else:
        order, epochs = list(range(len(train_ex))), args.epochs
    rows = [{"input_ids": train_ex[i].ids, "attention_mask": [1] * len(train_ex[i].ids),
             "labels": [-100] * train_ex[i].start + train_ex[i].ids[train_ex[i].start:]} for i in order]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(rows)

    targs = TrainingArguments(
        output_dir=str(work / "baseline"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_train_epochs=epochs, learning_rate=5e-5, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(total * 0.1), weight_decay=0.0, max_grad_norm=1.0,
        bf16=args.dtype == "bf16", use_cpu=True, logging_steps=args.logging_steps, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)
    cls = InOrder if args.baseline_order == "same" else Trainer
    trainer = cls(model=peft_model, args=targs, train_dataset=Rows(),
                  data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    c0 = time.process_time()
    out = trainer.train()
    cpu = time.process_time() - c0
    assert trainer.state.global_step == total, (trainer.state.global_step, total)
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"model": peft_model, "tokenizer": tok, "train_seconds": out.metrics["train_runtime"],
            "cpu_seconds": cpu, "tokens": tokens, "wall_seconds": time.time() - started,
            "final_train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=256, help="training pairs (half zh, half de)")
    p.add_argument("--val", type=int, default=32, help="validation pairs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--baseline-order", choices=["same", "own"], default="same",
                   help="baseline batches: polyalign's random order (default) or Trainer's own shuffling")
    p.add_argument("--data", default=str(SHARED), help="the paper-release folder")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not Path(args.data, "snli").is_dir():
        print(f"bench_train: {args.data}/snli not found; pass --data", file=sys.stderr)
        return 2
    if args.pairs % 2 or args.val % 2:
        print("bench_train: --pairs and --val must be even (half zh, half de)", file=sys.stderr)
        return 2

    import torch

    from polyalign.models import load_model
    from polyalign.training.prepare import PrepareConfig, prepare
    from polyalign.store import read_jsonl
    from polyalign.training.train import Example, encode_pair

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        data = work / "data"
        per_lang = (args.pairs + args.val) // 2
        m = prepare(PrepareConfig(task="snli", sources="zh,de", target="en", per_language=per_lang,
                                  val_size=args.val, seed=args.seed, data=args.data, output=str(data),
                                  progress=False))
        train_recs = read_jsonl(data / "train.jsonl")
        if len(train_recs) > args.pairs:     # the split holds out whole questions; trim to the exact size
            from polyalign.store import write_jsonl
            write_jsonl(data / "train.jsonl", train_recs[:args.pairs])
        n_train = min(len(train_recs), args.pairs)
        print(f"data: {n_train} train + {m['counts']['val']} val pairs (snli zh,de => en, paper release); "
              f"model {args.model}, {args.dtype}, {args.epochs:g} epoch(s), effective batch 16; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
              f"{os.environ.get('OMP_WAIT_POLICY')}, load average {load_before[0]:.2f}", flush=True)

        # The untrained model's validation loss, for scale.
        lm = load_model(args.model, args.dtype, "cpu")
        val = [Example(*encode_pair(lm.tokenizer, v["input"], v["output"], 2048)[:2])
               for v in read_jsonl(data / "val.jsonl")]
        untrained = val_loss(lm.model, val, dtype)
        del lm
        gc.collect()

        results = {}
        with PeakRSS() as mem:
            r = run_polyalign(args, data, work)
        r["peak_rss_mb"], r["rss_start_mb"] = mem.peak_mb, mem.start_mb
        # The validation loss of both, by one function.
        lm = load_model(args.model, args.dtype, "cpu", adapter=str(work / "polyalign"))
        r["val_loss"] = val_loss(lm.model, val, dtype)
        r["final_train_loss"] = r["summary"]["final_train_loss"]
        del lm
        results["polyalign"] = {k: v for k, v in r.items() if k != "summary"}
        print(f"polyalign done: {r['tokens'] / r['train_seconds']:.1f} tokens/s", flush=True)
        gc.collect()

        with PeakRSS() as mem:
            b = run_baseline(args, data, work)
        b["peak_rss_mb"], b["rss_start_mb"] = mem.peak_mb, mem.start_mb
        b["val_loss"] = val_loss(b.pop("model"), val, dtype)
        b.pop("tokenizer")
        results["baseline"] = b
        print(f"baseline done: {b['tokens'] / b['train_seconds']:.1f} tokens/s", flush=True)

    epochs = args.epochs
    rows = []
    for name in ("polyalign", "baseline"):
        r = results[name]
        r["tokens_per_s"] = r["tokens"] / r["train_seconds"]
        r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
        r["s_per_epoch"] = r["train_seconds"] / epochs
        rows.append((name, r))
    ratio = results["polyalign"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    cpu_ratio = results["polyalign"]["tokens_per_cpu_s"] / results["baseline"]["tokens_per_cpu_s"]
    print()
    print(f"{'trainer':<10} {'tokens/s':>9} {'tokens/CPU-s':>13} {'s/epoch':>9} {'wall s':>8} {'peak RSS MB':>12} "
          f"{'final train loss':>17} {'val loss':>9}")
    for name, r in rows:
        print(f"{name:<10} {r['tokens_per_s']:>9.1f} {r['tokens_per_cpu_s']:>13.1f} {r['s_per_epoch']:>9.1f} "
              f"{r['wall_seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['final_train_loss'] or float('nan'):>17.4f} "
              f"{r['val_loss']:>9.4f}")
    print(f"speed-up: {ratio:.2f}x tokens/s, {cpu_ratio:.2f}x tokens per CPU-second; "
          f"val loss difference (polyalign - baseline): "
          f"{results['polyalign']['val_loss'] - results['baseline']['val_loss']:+.4f}; "
          f"untrained val loss {untrained:.4f}; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "speedup": ratio, "cpu_speedup": cpu_ratio,
                                               "untrained_val_loss": untrained},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
