"""What calibration adds to evaluation time (issue 12's target: at most +5% on 500 items).

    .venv/bin/python benchmarks/bench_calibration.py [--langs en,zh,sw] [--items 500] [--model gemma-3-270m]
        [--data ../shared/data/paper-release] [--device cpu|cuda] [--dtype auto]

Per language, one model and one fresh Scorer each way: the items scored alone, then the reference
prompts (three content-free, one answer cue) scored first as `evaluate --calibration` does, then the
items. After an untimed warm-up, each mode runs --repeats times in alternating order and the fastest
run is kept. Prints a table of seconds and the relative extra time.
"""
from __future__ import annotations

import argparse
import os
import time

from polyalign import languages
from polyalign.data import load_data
from polyalign.evaluation.calibration import reference_distributions
from polyalign.evaluation.scoring import Scorer
from polyalign.models import load_model
from polyalign.tasks import load_task


def score_all(scorer: Scorer, group) -> None:
    for batch in scorer.batches(group):
        scorer.score(group, batch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="amazon_polarity")
    ap.add_argument("--langs", default="en,zh,sw")
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/paper-release"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scoring", default="paper")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode; the fastest is kept")
    args = ap.parse_args()
    task = load_task(args.task)
    langs = languages.parse_langs(args.langs)
    data = load_data(task, langs, args.data if os.path.exists(args.data) else None, args.items).items
    lm = load_model(args.model, args.dtype, args.device)
    print(f"{'lang':<5} {'items':>5} {'plain s':>8} {'calibrated s':>13} {'refs s':>7} {'extra':>7}")
    total_plain = total_cal = 0.0
    # Warm-up (thread pools, allocator, first-call kernels), untimed: else the first mode pays it.
    warm = Scorer(lm.model, lm.tokenizer, args.scoring)
    score_all(warm, warm.prepare(task, langs[0], "english", data[langs[0]][:8]))
    for lang in langs:
        times = {"plain": float("inf"), "calibrated": float("inf"), "refs": float("inf")}
        for r in range(args.repeats):
            for mode in (("plain", "calibrated") if r % 2 == 0 else ("calibrated", "plain")):
                scorer = Scorer(lm.model, lm.tokenizer, args.scoring)       # fresh: no prefix cached yet
                group = scorer.prepare(task, lang, "english", data[lang])
                t0 = time.perf_counter()
                if mode == "calibrated":
                    reference_distributions(scorer, group)
                    times["refs"] = min(times["refs"], time.perf_counter() - t0)
                score_all(scorer, group)
                times[mode] = min(times[mode], time.perf_counter() - t0)
        total_plain += times["plain"]
        total_cal += times["calibrated"]
        print(f"{lang:<5} {len(data[lang]):>5} {times['plain']:>8.2f} {times['calibrated']:>13.2f} "
              f"{times['refs']:>7.2f} {100 * (times['calibrated'] / times['plain'] - 1):>+6.1f}%")
    print(f"{'all':<5} {'':>5} {total_plain:>8.2f} {total_cal:>13.2f} {'':>7} "
          f"{100 * (total_cal / total_plain - 1):>+6.1f}%")


if __name__ == "__main__":
    main()
