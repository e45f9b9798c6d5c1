"""Logit-lens speed: the lens vs a plain forward over the same prompts, in one process.

    .venv/bin/python benchmarks/bench_lens.py [--langs zh,ja,ru] [--items 16] [--repeats 3]
        [--data ../shared/data/paper-release] [--naive] [--threads N]

plain   = what the evaluator does: the demos' KV cache once per language, items batched and
          right-padded, the head applied at the answer position only, softmax, the paper's sets.
lens    = `polyalign.analysis.lens.run_group`: the same forward with every layer's hidden states, the final
          norm and the head at the answer position of every layer (L+1 rows per item), softmax,
          entropy and the token-set sums.
forward = the lens' forward pass alone (hidden states on, no unembedding): where the lens' time goes.
naive   = (with --naive) batch 1, the whole prompt through the CausalLM, logits at every position.
Each method gets a fresh runner per language (so each pays for the demos' cache once); per
language the methods run back to back, so that load from other processes hits them alike, and the
best of --repeats counts for each (method, language). Wall and process CPU time are both shown
(CPU time is the steadier figure on a shared machine). Target: lens <= 1.5 x plain.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from polyalign import languages
from polyalign.data import load_data
from polyalign.analysis.lens import batch_groups, lens_sets, prepare_prompts, run_group
from polyalign.models import load_model
from polyalign.engine.runner import PrefixRunner
from polyalign.engine.model_parts import max_context, unembed, unwrap
from polyalign.tasks import load_task


@torch.inference_mode()
def plain(model, runner, ps, sets):
    cols = [torch.tensor(c) for c in sets.columns()]
    for group in batch_groups(runner, ps.prompts):
        prefix = runner.prefix(ps.prefix_ids[:group[0].cached_len])
        suffixes = [p.suffix for p in group]
        last, _ = runner.forward(prefix, suffixes)
        pos = torch.tensor([len(s) - 1 for s in suffixes])
        probs = torch.softmax(unembed(model, last[torch.arange(len(group)), pos]), -1)
        torch.stack([probs[:, c].sum(-1) for c in cols], -1).tolist()


@torch.inference_mode()
def forward_only(model, runner, ps, sets):
    for group in batch_groups(runner, ps.prompts):
        prefix = runner.prefix(ps.prefix_ids[:group[0].cached_len])
        runner.forward(prefix, [p.suffix for p in group], hidden_states=True)


@torch.inference_mode()
def naive(model, runner, ps, sets):
    for p in ps.prompts:
        model(input_ids=torch.tensor([p.ids])).logits[0, -1].float().softmax(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="amazon_polarity")
    ap.add_argument("--langs", default="zh,ja,ru")
    ap.add_argument("--labels", default="native")
    ap.add_argument("--items", type=int, default=16, help="items per language (balanced)")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/paper-release"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive", action="store_true", help="also time a batch-1 full forward without cache")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 is steadier on a machine shared with other work")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    lm = load_model(args.model, args.dtype, "cpu")
    task = load_task(args.task)
    langs = languages.parse_langs(args.langs)
    items = load_data(task, langs, args.data if os.path.exists(args.data) else None, args.items).items
    limit = max_context(lm.model, lm.tokenizer)
    groups = [(prepare_prompts(lm.tokenizer, task, lang, args.labels, items[lang], limit),
               lens_sets(lm.tokenizer, task, lang)) for lang in langs]
    n_items = sum(len(ps.prompts) for ps, _ in groups)
    n_tokens = sum(len(p.ids) for ps, _ in groups for p in ps.prompts)
    n_suffix = sum(len(p.suffix) for ps, _ in groups for p in ps.prompts)
    cfg = unwrap(lm.model).config
    print(f"model {args.model} ({str(lm.dtype).replace('torch.', '')}, cpu, {torch.get_num_threads()} threads, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}); {len(langs)} languages ({','.join(langs)}), "
          f"{n_items} items, {n_tokens} prompt tokens of which {n_suffix} after the demos' cache")

    methods = {"plain": plain, "forward": forward_only,
               "lens": lambda m, r, ps, s: run_group(m, r, ps, s)}
    if args.naive:
        methods["naive"] = naive
    # warm-up (allocators, kernels), not timed
    ps0, s0 = groups[0]
    small = type(ps0)(ps0.task, ps0.lang, ps0.mode, ps0.prefix_text, ps0.prefix_ids, ps0.prompts[:2])
    for fn in methods.values():
        fn(lm.model, PrefixRunner(lm.model, lm.tokenizer, args.batch_tokens), small, s0)

    # Per language, every method back to back; the best repeat of each (method, language) counts,
    # which filters out bursts of load from other processes better than timing whole passes.
    wall = {k: [float("inf")] * len(groups) for k in methods}
    cpu = {k: [float("inf")] * len(groups) for k in methods}
    for _ in range(args.repeats):
        for g, (ps, sets) in enumerate(groups):
            for name, fn in methods.items():
                runner = PrefixRunner(lm.model, lm.tokenizer, args.batch_tokens)
                t, c = time.perf_counter(), time.process_time()
                fn(lm.model, runner, ps, sets)
                wall[name][g] = min(wall[name][g], time.perf_counter() - t)
                cpu[name][g] = min(cpu[name][g], time.process_time() - c)

    total = {k: sum(v) for k, v in wall.items()}
    total_cpu = {k: sum(v) for k, v in cpu.items()}
    print(f"{'method':<8} {'wall s':>8} {'items/s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8}")
    for name in methods:
        print(f"{name:<8} {total[name]:>8.2f} {n_items / total[name]:>8.2f} {total[name] / total['plain']:>8.2f} "
              f"{total_cpu[name]:>8.2f} {total_cpu[name] / total_cpu['plain']:>8.2f}")
    ratio = total["lens"] / total["plain"]
    print(f"lens / plain = {ratio:.2f} wall, {total_cpu['lens'] / total_cpu['plain']:.2f} CPU "
          f"(target <= 1.5): {'OK' if ratio <= 1.5 else 'OVER'}")


if __name__ == "__main__":
    main()
