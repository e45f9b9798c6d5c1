"""A polyalign session from Python: load Gemma-3-270M, evaluate two languages in memory, draw a lens.

    python examples/python_api.py                                   # the embedded Gemma-3-270M
    python examples/python_api.py --model Qwen/Qwen1.5-0.5B --langs en,sw --limit 16 --figure lens.png

In a notebook, run the lines of `session` one by one: `result.to_pandas()` shows the accuracies as
a table and `lens.figure("zh")` displays inline (a matplotlib Figure, no pyplot state).
"""
from __future__ import annotations

import argparse
import logging

import polyalign as pa


def session(model: str = "gemma-3-270m", langs=("en", "de"), lens_langs=("zh",), limit: int = 8,
            figure: str | None = None, keep_overlapping: bool = False, progress: bool = True) -> dict:
    # One load, shared by every step below (a loaded model is used as it is, on its device).
    lm = pa.load_model(model)

    # Two languages, two label modes, in memory: nothing is written (pass output="runs/x" to keep
    # the samples and results.json and resume after an interruption).
    result = pa.evaluate(lm, langs=list(langs), labels=["english", "native"], limit=limit, progress=progress)
    print(result.table())
    for avg in result.averages:
        print(f"average {avg.task}/{avg.labels} over {avg.langs}: {avg.acc:.3f}")

    # The logit lens at the answer position: does the English answer lead in the middle layers?
    lens = pa.logit_lens(lm, langs=list(lens_langs), limit=limit, keep_overlapping=keep_overlapping,
                         progress=progress)
    for lang, reading in lens["reading"]["base"].items():
        print(f"lens {lang}: n={reading['n']}, latent English: {reading.get('latent_english')}")
    fig = lens.figure(lens_langs[0])
    if figure:
        fig.savefig(figure, bbox_inches="tight")
        print(f"lens figure: {figure}")
    return {"model": lm, "eval": result, "lens": lens, "figure": fig}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="HF id, local folder, or the embedded gemma-3-270m")
    p.add_argument("--langs", default="en,de", help="two (or more) languages to evaluate, comma list")
    p.add_argument("--lens-langs", default="zh", help="languages for the logit lens, comma list")
    p.add_argument("--limit", type=int, default=8, help="items per language")
    p.add_argument("--figure", default=None, help="also save the lens figure here (PNG, PDF, SVG)")
    p.add_argument("--keep-overlapping", action="store_true",
                   help="lens: keep samples whose English and target token sets overlap")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")   # data issues, if any
    return session(args.model, args.langs.split(","), args.lens_langs.split(","), args.limit, args.figure,
                   args.keep_overlapping, args.progress)


if __name__ == "__main__":
    try:
        main()
    except pa.PolyalignError as e:
        raise SystemExit(f"error: {e}")
