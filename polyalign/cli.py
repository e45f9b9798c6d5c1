"""The `polyalign` command. Each subcommand lives in its own module with add_arguments() and main()."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from polyalign.errors import PolyalignError

COMMANDS = {
    "evaluate": ("polyalign.evaluation.evaluate", "few-shot multilingual evaluation with constrained decoding"),
    "lens": ("polyalign.analysis.lens", "logit lens at the answer position: latent English vs target language, per layer"),
    "geometry": ("polyalign.analysis.geometry", "hidden-state geometry: PCA, Pearson of parallel items, cross-lingual alignment"),
    # issue 13: language neurons and the tuned lens
    "neurons": ("polyalign.analysis.neurons", "language-specific FFN neurons (LAPE): counts, overlaps, base vs adapter, deactivation"),
    "tune-lens": ("polyalign.analysis.tuned_lens", "train a multilingual tuned lens (one affine translator per layer)"),
    "run": ("polyalign.experiment.run", "run an experiment file end to end (resumable): eval, prepare, train, analyses, report"),
    "report": ("polyalign.reporting.report", "paper-style report (Markdown, self-contained HTML, CSV, LaTeX) of a run folder"),
    "prepare": ("polyalign.training.prepare", "question-alignment training pairs (X -> target) from parallel or translated questions"),
    "train": ("polyalign.training.train", "LoRA instruction tuning on question-alignment pairs (resumable, DDP-ready)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="polyalign", description="Multilingual alignment research on LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        importlib.import_module(args._module).main(args)
    except PolyalignError as e:
        message = " ".join(str(e).split())  # always one line
        print(f"polyalign {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"polyalign {args.command}: error: disk full while writing {e.filename or ''}; "
                  "free space and rerun to resume", file=sys.stderr)
            return 2
        if e.filename:  # a file the user named or may fix (read-only, missing, not a folder, ...)
            other = f" -> {e.filename2}" if e.filename2 else ""
            message = " ".join(f"{e.strerror or e}: {e.filename}{other}".split())
            print(f"polyalign {args.command}: error: {message}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"polyalign {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
