"""The `polyalign` command: a thin shell over the commands' config dataclasses and work functions.

A command is a config dataclass (its options, see polyalign.config), a work function taking that
config and returning a result, and an entry in COMMANDS. The arguments are generated from the
dataclass; what a command prints when it is done is written here (the library prints nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import sys
from typing import NamedTuple

from polyalign import config
from polyalign.errors import PolyalignError


class Command(NamedTuple):
    module: str
    help: str
    config: str         # the config dataclass, in `module`
    work: str           # the work function, in `module`: work(cfg) -> result

    def load(self):
        """(config class, work function)."""
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.work)


COMMANDS = {
    "evaluate": Command("polyalign.evaluation.evaluate", "few-shot multilingual evaluation with constrained decoding",
                        "EvalConfig", "evaluate"),
    "lens": Command("polyalign.analysis.lens",
                    "logit lens at the answer position: latent English vs target language, per layer",
                    "LensConfig", "run_lens"),
    "geometry": Command("polyalign.analysis.geometry",
                        "hidden-state geometry: PCA, Pearson of parallel items, cross-lingual alignment",
                        "GeometryConfig", "run_geometry"),
    # issue 13: language neurons and the tuned lens
    "neurons": Command("polyalign.analysis.neurons",
                       "language-specific FFN neurons (LAPE): counts, overlaps, base vs adapter, deactivation",
                       "NeuronsConfig", "run_neurons"),
    "tune-lens": Command("polyalign.analysis.tuned_lens",
                         "train a multilingual tuned lens (one affine translator per layer)",
                         "TuneLensConfig", "tune_lens"),
    "run": Command("polyalign.experiment.run",
                   "run an experiment file end to end (resumable): eval, prepare, train, analyses, report",
                   "RunConfig", "run"),
    "report": Command("polyalign.reporting.report",
                      "paper-style report (Markdown, self-contained HTML, CSV, LaTeX) of a run folder",
                      "ReportConfig", "run_report"),
    "prepare": Command("polyalign.training.prepare",
                       "question-alignment training pairs (X -> target) from parallel or translated questions",
                       "PrepareConfig", "prepare"),
    "train": Command("polyalign.training.train",
                     "LoRA instruction tuning on question-alignment pairs (resumable, DDP-ready)",
                     "TrainConfig", "train"),
}


# ----------------------------------------------------------------------------- what a finished command prints
def _show_prepare(cfg, manifest) -> None:
    from polyalign.training.prepare import summary_line
    print(summary_line(cfg, manifest))


def _show_report(cfg, result) -> None:
    print(f"report: {result.markdown}")
    print(str(result.html))
    problem = result.problem()
    if problem:
        raise PolyalignError(problem)


def _show_neurons(cfg, result) -> None:
    print(result.table())


def _show_tune_lens(cfg, result) -> None:
    if result is None:      # a process other than rank 0 of a torchrun launch
        return
    print(f"tune-lens: KL (bits, mean over layers) {result['kl_first']:.4f} -> {result['kl_last']:.4f}; "
          f"lens in {result.lens_file}")


SHOW = {"prepare": _show_prepare, "report": _show_report, "neurons": _show_neurons, "tune-lens": _show_tune_lens}


# ----------------------------------------------------------------------------- the shell
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="polyalign", description="Multilingual alignment research on LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        cls, _ = command.load()
        config.add_arguments(p, cls)
    return parser


class ConsoleHandler(logging.Handler):
    """What the library logs, shown as the commands always showed it: INFO (tables, per-language
    lines, where the results went) on stdout, warnings (data issues) and status lines logged with
    extra={"stderr": True} (train's) on stderr, the bare message.
    Written through tqdm so that a progress bar on screen is not torn; streams are looked up at
    each record, so that a redirected sys.stdout (pytest's capsys) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm
            err = record.levelno >= logging.WARNING or getattr(record, "stderr", False)
            stream = sys.stderr if err else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()    # progress lines show at once in a log file too
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


@contextlib.contextmanager
def console_logging():
    """Show polyalign's log records on the console for the duration of one command, then undo it
    (the library itself installs no handler: a notebook decides what it sees)."""
    logger = logging.getLogger("polyalign")
    handler, level = ConsoleHandler(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with console_logging():
            cls, work = COMMANDS[args.command].load()
            cfg = config.from_args(cls, args)
            result = work(cfg)
            if args.command in SHOW:
                SHOW[args.command](cfg, result)
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
