"""Neuron counting speed: `count_activations` vs a plain forward over the same tokens, in one process.

    .venv/bin/python benchmarks/bench_neurons.py [--model gemma-3-270m] [--langs en,zh,sw]
        [--tokens 20000] [--repeats 3] [--dtype auto] [--device auto] [--threads N]

plain    = the same runner, the same batches and the same prefix, the decoder forward alone.
counting = `polyalign.analysis.activations.count_activations`: that forward with a hook on every
           layer's gate projection (> 0, summed over tokens in cache-sized row chunks).
Per language the two run back to back (so load from other processes hits them alike) and the best
of --repeats counts for each. Wall and process CPU time are both shown. Target: counting <= 1.2 x plain.
"""
from __future__ import annotations

import argparse
import time

import torch

from polyalign import languages
from polyalign.analysis.activations import count_activations, language_texts, shared_prefix, token_sequences
from polyalign.engine.runner import PrefixRunner
from polyalign.models import load_model


@torch.inference_mode()
def plain(model, runner, prefix_ids, sequences):
    prefix = runner.prefix(list(prefix_ids))
    for batch in runner.batches([len(s) for s in sequences]):
        runner.forward(prefix, [sequences[i] for i in batch])


def counting(model, runner, prefix_ids, sequences):
    count_activations(model, runner, prefix_ids, sequences)


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--langs", default="en,zh,sw")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens per language")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.dtype, args.device, progress=False)
    langs = languages.parse_langs(args.langs)
    texts = language_texts(langs)
    prefix = shared_prefix(lm.tokenizer)
    print(f"{lm.name} on {lm.device} ({str(lm.dtype).replace('torch.', '')}), {torch.get_num_threads()} threads")
    print(f"{'lang':<5} {'tokens':>7} {'plain s':>9} {'count s':>9} {'ratio':>6} {'plain cpu':>10} {'count cpu':>10}")
    total = {"plain": [0.0, 0.0], "counting": [0.0, 0.0]}
    for lang in langs:
        seqs = token_sequences(lm.tokenizer, texts[lang], args.tokens, 512)
        best = {}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("counting", counting)):
                runner = PrefixRunner(lm.model, lm.tokenizer)          # a fresh prefix cache for each
                w, c = timed(fn, lm.model, runner, prefix, seqs)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], w), min(old[1], c))
        for name in total:
            total[name][0] += best[name][0]
            total[name][1] += best[name][1]
        n = sum(map(len, seqs))
        print(f"{lang:<5} {n:>7} {best['plain'][0]:>9.3f} {best['counting'][0]:>9.3f} "
              f"{best['counting'][0] / best['plain'][0]:>6.2f} {best['plain'][1]:>10.3f} {best['counting'][1]:>10.3f}")
    print(f"{'all':<5} {'':>7} {total['plain'][0]:>9.3f} {total['counting'][0]:>9.3f} "
          f"{total['counting'][0] / total['plain'][0]:>6.2f} {total['plain'][1]:>10.3f} {total['counting'][1]:>10.3f}")


if __name__ == "__main__":
    main()
