"""Save a randomly initialised model with the shapes (config) and tokenizer of a model folder.

    python benchmarks/random_model.py SRC_FOLDER OUT_FOLDER [--dtype bf16]

For timing on a machine the real weights cannot reach (e.g. a GPU box with no network): speed
depends on the shapes alone. Predictions of such a model mean nothing.
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src), dtype=dtype)
    model.save_pretrained(args.out)
    for f in Path(args.src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, Path(args.out) / f.name)
    print(f"{args.out}: random {model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")


if __name__ == "__main__":
    main()
