"""`polyalign report RUN_DIR`: a paper-style report of a run folder written by `polyalign run`.

Writes `RUN_DIR/report.md`, a self-contained `RUN_DIR/report.html` (images embedded as base64),
and `RUN_DIR/report/` with the tables as CSV and LaTeX and the figures drawn here. The report
reads only artefacts: `manifest.json` and the step folders it names (evaluation samples, training
logs, the lens and geometry outputs), so it can be rebuilt at any time, also for a partial run.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from polyalign import languages
from polyalign.config import option
from polyalign.errors import PolyalignError
from polyalign.stats import discordant, holm, mcnemar_from_counts, paired_bootstrap_delta
from polyalign.store import read_jsonl, safe_name, write_atomic, write_csv
from polyalign.training.train import TrainSummary

log = logging.getLogger(__name__)

GROUPS = ("all", "seen", "unseen", "high", "low")
DAGGER = "†"


# ----------------------------------------------------------------------------- a tiny document model
@dataclass
class Cell:
    text: str
    bold: bool = False
    mark: str = ""          # a superscript marker such as †
    raw: object = None      # the number behind the text, for CSV


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    name: str = ""          # file stem for CSV/LaTeX exports ("" = not exported)
    csv_rows: list[dict] | None = None   # a richer CSV than the displayed cells


@dataclass
class Doc:
    blocks: list = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, t: Table) -> None:
        self.blocks.append(("table", t))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))


def _cell_md(c: Cell) -> str:
    t = c.text.replace("|", "\\|").replace("*", "\\*")
    if c.bold and t:
        t = f"**{t}**"
    return t + c.mark


def _inline_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _cell_html(c: Cell) -> str:
    t = html.escape(c.text)
    if c.bold and t:
        t = f"<b>{t}</b>"
    if c.mark:
        t += f"<sup>{html.escape(c.mark)}</sup>"
    return t


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
        "⇒": r"$\Rightarrow$", "−": "$-$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "α": r"$\alpha$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def _cell_tex(c: Cell) -> str:
    t = _tex(c.text)
    if c.bold and t:
        t = f"\\textbf{{{t}}}"
    if c.mark == DAGGER:
        t += r"$^\dagger$"
    elif c.mark:
        t += f"$^{{{_tex(c.mark)}}}$"
    return t


def render_md(doc: Doc, root: Path) -> str:
    out = []
    for b in doc.blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif b[0] == "table":
            t: Table = b[1]
            lines = ["| " + " | ".join(h.replace("|", "\\|") for h in t.header) + " |",
                     "|" + "|".join(["---"] + ["---:"] * (len(t.header) - 1)) + "|"]
            lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in t.rows]
            if t.caption:
                lines.append("")
                lines.append(f"*{t.caption}*")
            out.append("\n".join(lines))
        elif b[0] == "img":
            rel = Path(b[1]).resolve().relative_to(root.resolve()) if _inside(b[1], root) else b[1]
            out.append(f"![{b[2]}]({rel})\n\n*{b[2]}*")
    return "\n\n".join(out) + "\n"


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1500px;
     padding:0 1.5em;color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:1em 0;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.caption{font-size:12px;color:#555;margin:-.6em 0 1.2em 0;max-width:60em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#555} code{background:#f3f3f3;padding:0 3px}
.scroll{overflow-x:auto}
"""


def render_html(doc: Doc, title: str) -> str:
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in doc.blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            t: Table = b[1]
            rows = "".join("<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in t.rows)
            cap = f"<p class=\"caption\">{_inline_html(t.caption)}</p>" if t.caption else ""
            head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
            out.append(f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
                       f"<tbody>{rows}</tbody></table></div>{cap}")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b[2])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def render_tex(t: Table) -> str:
    cols = "l" + "r" * (len(t.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(_cell_tex(c) for c in row) + r" \\" for row in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.caption:
        lines.append(rf"\caption{{{_tex(t.caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table_csv(path: Path, t: Table) -> None:
    """The table's numbers (`csv_rows`, or each cell's raw value, else its text) as CSV."""
    if t.csv_rows is not None:
        keys = list(dict.fromkeys(k for r in t.csv_rows for k in r))
        write_csv(path, keys, [[r.get(k, "") for k in keys] for r in t.csv_rows])
    else:
        write_csv(path, t.header, [[c.raw if c.raw is not None else c.text for c in row] for row in t.rows])


# ----------------------------------------------------------------------------- reading the run
@dataclass
class EvalRun:
    """One evaluation step: per (labels, lang), item id -> correct."""
    model: str
    setting: str | None
    task: str
    scoring: str
    folder: Path
    outcomes: dict[tuple[str, str], dict[str, bool]]
    results: dict


def _load_eval(step: dict, run: Path, scoring: str) -> EvalRun | None:
    folder = run / step["dir"]
    res_path = folder / "results.json"
    if not res_path.exists():
        return None
    try:
        results = json.loads(res_path.read_text("utf-8"))
        problem = None if isinstance(results, dict) and isinstance(results.get("rows", []), list) else \
            "not an evaluation's results (no object with `rows`)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"malformed JSON ({getattr(e, 'msg', e)})"
    if problem:
        # Without done.json the step reruns, resuming from its samples, and rewrites results.json.
        raise PolyalignError(f"{res_path}: {problem}; delete {folder / 'done.json'} and rerun `polyalign run` "
                             "to rebuild it from its samples")
    outcomes = {}
    for row in results.get("rows", []):
        if row.get("task") != step["task"]:
            continue
        path = folder / "samples" / row["task"] / row["labels"] / f"{row['lang']}.jsonl"
        samples = read_jsonl(path)
        if not samples:
            continue
        outcomes[(row["labels"], row["lang"])] = {str(s["id"]): bool(s["correct"]) for s in samples}
    return EvalRun(step.get("model") or "", step.get("setting"), step["task"],
                   results.get("config", {}).get("scoring", scoring), folder, outcomes, results)


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None or x != x:
        return "—"
    v = 100 * x
    if sign:
        return ("+" if v >= 0.05 else ("−" if v <= -0.05 else "")) + f"{abs(v):.1f}"
    return f"{v:.1f}"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group_langs(group: str, langs: list[str], seen: list[str] | None) -> list[str]:
    if group == "all":
        return list(langs)
    if group == "high":
        return [lang for lang in langs if lang in languages.HIGH]
    if group == "low":
        return [lang for lang in langs if lang in languages.LOW]
    if seen is None:
        return []
    if group == "seen":
        return [lang for lang in langs if lang in seen]
    return [lang for lang in langs if lang not in seen]


def _slug(*parts: str) -> str:
    return "_".join(safe_name(p, "-", strip=True) for p in parts if p)


# ----------------------------------------------------------------------------- figures
def _heatmap(path: Path, rows: list[str], cols: list[str], values, title: str, diverging: bool = False) -> Path:
    from polyalign.reporting import plots
    fig = heatmap_figure(rows, cols, values, title, diverging)
    return plots.save(fig, path, tight=False)


def heatmap_figure(rows: list[str], cols: list[str], values, title: str, diverging: bool = False):
    """Accuracies (or their changes, `diverging`) in points, one row per model or setting (a Figure; in
    matplotlib's default style, as the report has always drawn it)."""
    import numpy as np
    from matplotlib.figure import Figure

    data = np.array([[np.nan if v is None else 100 * v for v in r] for r in values], dtype=float)
    fig = Figure(figsize=(max(6.0, 0.55 * len(cols) + 2.5), max(1.6, 0.5 * len(rows) + 1.2)))
    ax = fig.subplots()
    if diverging:
        lim = max(1.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
        im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    else:
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            if np.isfinite(v):
                light = (abs(v) > 0.6 * lim) if diverging else v < 55
                ax.text(j, i, f"{v:+.0f}" if diverging else f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="Δ accuracy (points)" if diverging else "accuracy (%)")
    fig.tight_layout()
    return fig


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _float(x) -> float | None:
    try:
        v = float(x)
        return v if v == v else None
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- the report
def broken_steps(run: Path, steps: list[dict]) -> dict[str, tuple[Path, str]]:
    """label -> (folder, problem) of the finished steps whose outputs are missing or do not parse: a
    step is done only while they are there (a deleted results.json would otherwise drop its setting
    from every table without a word)."""
    from polyalign.experiment.plan import outputs_problem
    out = {}
    for s in steps:
        if s.get("status") == "done" or (run / s["dir"] / "done.json").exists():
            problem = outputs_problem(s["kind"], run / s["dir"])
            if problem:
                out[s["label"]] = (run / s["dir"], problem)
    return out


@dataclass
class RunView:
    """What the report reads of a run folder: its manifest, the steps that are finished (and not broken),
    and the report's settings."""
    run: Path
    manifest: dict
    steps: list[dict]
    done: list[dict]
    pending: list[dict]
    broken: dict[str, str]          # step label -> problem
    settings: dict[str, dict]       # setting name -> its manifest entry
    setting_order: list[str]
    models: list[str]               # model labels
    ev_cfg: dict
    scoring: str
    n_boot: int
    seed: int
    alpha: float
    out_dir: Path
    fig_dir: Path

    def finished(self, *kinds: str) -> list[dict]:
        return [s for s in self.done if s["kind"] in kinds]


def read_run(run_dir: str | Path, bootstrap: int | None = None, seed: int | None = None) -> RunView:
    run = Path(run_dir)
    mpath = run / "manifest.json"
    if not mpath.exists():
        raise PolyalignError(f"{run} is not a run folder (no manifest.json); create one with `polyalign run`")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise PolyalignError(f"{mpath}: malformed JSON ({e.msg})") from None
    rep_cfg = manifest.get("report") or {}
    steps = manifest.get("steps", [])
    broken = {label: problem for label, (_, problem) in broken_steps(run, steps).items()}
    done = [s for s in steps if s["label"] not in broken
            and (s.get("status") == "done" or (run / s["dir"] / "done.json").exists())]
    ev_cfg = manifest.get("eval") or {}
    return RunView(run, manifest, steps, done, [s for s in steps if s not in done], broken,
                   settings={s["name"]: s for s in manifest.get("settings", [])},
                   setting_order=[s["name"] for s in manifest.get("settings", [])],
                   models=[m["label"] for m in manifest.get("models", [])], ev_cfg=ev_cfg,
                   scoring=ev_cfg.get("scoring", "paper"), n_boot=bootstrap or rep_cfg.get("bootstrap") or 10000,
                   seed=seed if seed is not None else rep_cfg.get("seed", 0), alpha=rep_cfg.get("alpha", 0.05),
                   out_dir=run / "report", fig_dir=run / "report" / "figures")


def build_report(run_dir: str | Path, bootstrap: int | None = None, seed: int | None = None) -> Path:
    """Write report.md, report.html and report/ (tables, figures) for the run folder; returns report.html.
    Broken steps are left out and listed in the report (and in run_report's result)."""
    view = read_run(run_dir, bootstrap, seed)
    for label, problem in view.broken.items():   # info: `polyalign report` then fails with this as its one error line
        log.info("%s: %s; rerun `polyalign run` to rebuild it", label, problem)
    view.out_dir.mkdir(parents=True, exist_ok=True)
    title = (view.manifest.get("report") or {}).get("title") or \
        f"polyalign report: {view.manifest.get('name', view.run.name)}"
    doc, exported = Doc(), []
    doc.h(1, title)
    _intro(doc, view)
    _evaluation_sections(doc, exported, view)
    _training_section(doc, exported, view)
    _lens_section(doc, exported, view)
    _geometry_section(doc, exported, view)
    from polyalign.reporting.neurons import neurons_section    # (it imports this module's tables)
    neurons_section(doc, view.run, view.finished("neurons"), view.settings, exported)
    _timing_section(doc, exported, view)
    _method_notes(doc, view)
    return _write_report(doc, exported, view, title)


def _intro(doc: Doc, view: RunView) -> None:
    manifest, run, scoring, ev_cfg = view.manifest, view.run, view.scoring, view.ev_cfg
    intro = []
    if manifest.get("description"):
        intro.append(str(manifest["description"]).strip())
    doc.p(" ".join(intro) if intro else "A run of `polyalign run`.")
    model_names = [f"`{m['name']}`" + (f" ({m['label']})" if m["label"] != m["name"] else "")
                   for m in manifest.get("models", [])]
    facts = [f"Models: {', '.join(model_names)}",
             f"Run folder: `{run}`; generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if manifest.get("hardware"):
        facts.append(f"Expected hardware: {manifest['hardware']}")
    for s in manifest.get("settings", []):
        facts.append(f"Setting **{s['label']}** (`{s['name']}`): question translations of {s['task']} from "
                     f"{', '.join(s['sources'])} into {s['target']}"
                     + (f", {s['per_language']} per source language" if s.get("per_language") else "")
                     + f"; seen languages {DAGGER}: {' '.join(s['seen'])}")
    if ev_cfg:
        facts.append(f"Evaluation: {', '.join(ev_cfg.get('tasks', []))}; labels {', '.join(ev_cfg.get('labels', []))}; "
                     f"scoring rule `{scoring}`; data {ev_cfg.get('data') or 'bundled'}"
                     + (f"; at most {ev_cfg['limit']} items per language" if ev_cfg.get("limit") else ""))
    pending, steps = view.pending, view.steps
    if pending:
        facts.append(f"**Incomplete run**: {len(pending)} of {len(steps)} steps are not finished "
                     f"({', '.join(s['label'] for s in pending[:6])}{'…' if len(pending) > 6 else ''}); "
                     "rerun `polyalign run` to finish them")
    if view.broken:
        facts.append("**Broken steps**, left out below: " + "; ".join(f"{label}: {problem}"
                                                                      for label, problem in view.broken.items()))
    doc.ul(facts)


def _evaluation_sections(doc: Doc, exported: list[Table], view: RunView) -> None:
    """The summary (one line per setting), then per model, task and label mode its accuracy section."""
    evals = [e for e in (_load_eval(s, view.run, view.scoring) for s in view.finished("eval")) if e]
    summary_lines: list[str] = []
    results_blocks = Doc()
    models = view.models
    for model in models or sorted({e.model for e in evals}):
        for task in dict.fromkeys(e.task for e in evals if e.model == model):
            mine = {e.setting: e for e in evals if e.model == model and e.task == task}
            modes = list(dict.fromkeys(mode for e in mine.values() for mode, _ in e.outcomes))
            for mode in modes:
                section = EvalSection(model, task, mode, mine.get(None), mine,
                                      multi=len(models) > 1 or len(modes) > 1)
                _results_section(results_blocks, summary_lines, exported, view, section)
    doc.h(2, "Summary")
    if summary_lines:
        doc.ul(summary_lines)
    else:
        doc.p("No finished evaluation yet.")
    doc.blocks += results_blocks.blocks
    # ---- alignment or calibration? (issue 12; its sentences join the summary above)
    from polyalign.reporting.alignment import alignment_sections, geometry_summaries
    lang_order = {code: i for i, code in enumerate(languages.ALL)}
    alignment_sections(doc, summary_lines, exported, evals, geometry_summaries(view.run, view.done), view.settings,
                       view.setting_order, lang_order, view.n_boot, view.seed, view.fig_dir, multi=len(models) > 1)


def _training_section(doc: Doc, exported: list[Table], view: RunView) -> None:
    trains = view.finished("train")
    if not trains:
        return
    doc.h(2, "Training")
    rows, images = [], []
    for s in trains:
        folder = view.run / s["dir"]
        rows.append(_train_row(s, folder, TrainSummary.read(folder)))
        images += [(png, f"{s['label']}: {png.stem.replace('_', ' ')} (from {s['dir']})")
                   for png in sorted(folder.glob("*.png"))]
    keys = ["step", "model", "setting"] + [k for k in ("steps", "epochs", "train pairs", "first loss",
                                                        "final loss", "final eval loss", "seconds")
                                            if any(k in r for r in rows)]
    t = Table(keys, [[Cell(str(r.get(k, "—"))) for k in keys] for r in rows],
              "Training runs (from train_log.jsonl / summary.json).", "training",
              csv_rows=[{k: r.get(k) for k in keys} for r in rows])
    doc.table(t)
    exported.append(t)
    for png, caption in images:
        doc.img(png, caption)


def _lens_section(doc: Doc, exported: list[Table], view: RunView) -> None:
    lens_steps = view.finished("lens", "tuned_lens")   # tuned_lens: both lenses side by side
    if not lens_steps:
        return
    doc.h(2, "Logit lens")
    doc.p("Per layer, the residual at the answer position is decoded with the model's own final norm and "
          "unembedding (Wendler et al.'s logit lens). Curves show the probability of the correct answer in "
          "the prompt's language, of its English twin, and the entropy; the overlay compares the base model "
          "with the trained adapter. Samples whose English and target token sets overlap are excluded "
          "(counted below).")
    for s in lens_steps:
        folder = view.run / s["dir"]
        lens_rows = _read_csv(folder / "lens.csv")
        if lens_rows:
            t = _lens_table(lens_rows, s)
            doc.table(t)
            exported.append(t)
        excl = _read_csv(folder / "excluded.csv")
        dropped = [r for r in excl if (_float(r.get("n_excluded")) or 0) > 0]
        if dropped:
            doc.table(_generic_table(dropped, f"{s['label']}: samples excluded because their English and "
                                     "target-language token sets overlap",
                                     f"lens_excluded_{_slug(s['model'] or '', s['setting'] or 'base')}"))
        elif excl:
            doc.p(f"{s['label']}: no sample was excluded for overlapping token sets "
                  f"({sum(int(_float(r.get('n_total')) or 0) for r in excl)} samples over all models).")
        pngs = sorted(folder.glob("*.png"), key=lambda p: (0 if "overlay" in p.stem else 1, p.name))
        for png in pngs:
            doc.img(png, f"{s['label']}: {png.stem.replace('_', ' ')}")


def _geometry_section(doc: Doc, exported: list[Table], view: RunView) -> None:
    geo_steps = view.finished("geometry")
    if not geo_steps:
        return
    doc.h(2, "Representation geometry")
    doc.p("Hidden states of parallel items, mean-pooled over the prompt (the paper's choice unless set "
          "otherwise), per layer. Pearson r of the 1-D PCA scores between two languages measures how "
          "alike their representations are; the alignment metrics compare the cosine similarity of "
          "parallel and non-parallel items and test whether an item's nearest English item is its own "
          "translation.")

    def order(p: Path):
        m = re.search(r"(\d+)", p.stem)
        kind = 0 if p.stem.startswith("alignment") else 1 if p.stem.startswith("pearson") else 2
        return (kind, int(m.group(1)) if m else -1, p.name)

    for s in geo_steps:
        folder = view.run / s["dir"]
        for name, make in (("pearson.csv", _pearson_table), ("alignment.csv", _alignment_table)):
            rows = _read_csv(folder / name)
            t = make(rows, s, folder) if rows else None
            if t:
                doc.table(t)
                exported.append(t)
        for png in sorted(folder.glob("*.png"), key=order):
            doc.img(png, f"{s['label']}: {png.stem.replace('_', ' ')}")


def _timing_section(doc: Doc, exported: list[Table], view: RunView) -> None:
    timed = [s for s in view.steps if s.get("seconds")]
    if not timed:
        return
    total = sum(float(s["seconds"]) for s in timed)
    doc.h(2, "Run time")
    rows = [[Cell(s["label"]), Cell(s["kind"]), Cell(f"{float(s['seconds']):.1f}", raw=s["seconds"]),
             Cell(f"{100 * float(s['seconds']) / total:.1f}%" if total else "—")] for s in timed]
    rows.append([Cell("total", bold=True), Cell(""), Cell(f"{total:.1f}", bold=True, raw=total), Cell("100%")])
    t = Table(["step", "kind", "seconds", "share"], rows,
              "Wall time of each step when it ran (cached steps keep the time of the run that made them).",
              "timing")
    doc.table(t)
    exported.append(t)


def _method_notes(doc: Doc, view: RunView) -> None:
    n_boot, alpha = view.n_boot, view.alpha
    doc.h(2, "Method notes")
    doc.ul([
        "Accuracy is the share of items whose highest-scoring label is the gold one; ties count as wrong "
        "unless the evaluator broke them (see results.json `ties`).",
        f"Δ is the setting's accuracy minus the base model's on the same items. Its 95% CI is a paired "
        f"percentile bootstrap ({n_boot} resamples; every language weighted equally, as in the Avg column). "
        "When the test sets are parallel (the same item ids in every language), an item is resampled "
        "together with its translations, since they are not independent; otherwise items are resampled "
        "within each language.",
        f"McNemar: an exact two-sided binomial test on the discordant items of each language; * marks p < {alpha} "
        "after Holm correction over the languages of a setting. With ~20 languages, a few uncorrected p < 0.05 "
        "are expected by chance.",
        f"{DAGGER} marks the languages a setting saw in training (its sources and its target). High-resource: "
        f"{' '.join(languages.HIGH)}; low-resource: {' '.join(languages.LOW)} (the paper's grouping).",
    ])


def _write_report(doc: Doc, exported: list[Table], view: RunView, title: str) -> Path:
    for t in exported:
        if t.name:
            write_table_csv(view.out_dir / f"{t.name}.csv", t)
            write_atomic(view.out_dir / f"{t.name}.tex", render_tex(t))
    write_atomic(view.run / "report.md", render_md(doc, view.run))
    out = view.run / "report.html"
    write_atomic(out, render_html(doc, title))
    return out


@dataclass
class EvalSection:
    """One accuracy section: a model's evaluations of one task under one label mode."""
    model: str
    task: str
    mode: str
    base: EvalRun | None
    runs: dict                  # setting name (None = the base model) -> EvalRun
    multi: bool                 # several models or modes: headings and file names name the model


@dataclass
class AccuracyGrid:
    """The accuracies of a section per (row, language); a row is None (the base model) or a setting's name."""
    rows: list
    langs: list[str]
    acc: dict                   # (row, lang) -> accuracy
    nitems: dict                # (row, lang) -> items
    label: dict                 # row -> its label in tables and figures
    tag: str                    # file stem of the exports
    heading: str

    def mean(self, row, langs: list[str]) -> float | None:
        return _mean([self.acc[(row, lang)] for lang in langs if (row, lang) in self.acc])


@dataclass
class GroupDelta:
    """A setting's accuracy change against the base over a language group, with its bootstrap CI."""
    delta: float
    ci_low: float
    ci_high: float
    n_langs: int

    @property
    def significant(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


@dataclass
class LangTest:
    """The exact McNemar test of one language: the base model and a setting on the same items."""
    n: int
    base_only: int              # items only the base got right
    setting_only: int           # items only the setting got right
    p_exact: float
    p_mid: float
    p_holm: float = 1.0         # Holm-adjusted over the setting's languages
    significant: bool = False

    @property
    def delta(self) -> float:
        return (self.setting_only - self.base_only) / self.n


@dataclass
class Comparison:
    """A setting against the base model: deltas per language group, McNemar per language."""
    setting: str
    seen: list[str]
    groups: dict[str, GroupDelta]       # group (GROUPS) -> delta, for the groups with paired languages
    tests: dict[str, LangTest]          # lang -> test, for the languages with paired items


def _results_section(doc: Doc, summary: list[str], exported: list[Table], view: RunView, sec: EvalSection) -> None:
    grid = _accuracy_grid(view, sec)
    if grid is None:
        return
    doc.h(2, f"Accuracy: {grid.heading}")
    for t in (_accuracy_table(view, sec, grid), _averages_table(view, grid)):
        doc.table(t)
        exported.append(t)
    if sec.base is None:
        doc.p("No base-model evaluation is finished, so deltas and tests are not available.")
        return
    comparisons = [_compare(view, sec, grid, k) for k in grid.rows if k is not None]
    summary += [line for c in comparisons if (line := _verdict(view, sec, grid, c))]
    for t in (_delta_table(grid, comparisons), _mcnemar_table(view, grid, comparisons)):
        doc.table(t)
        exported.append(t)
    heat_rows = [grid.label[k] for k in grid.rows]
    heat_vals = [[grid.acc.get((k, lang)) for lang in grid.langs] for k in grid.rows]
    doc.img(_heatmap(view.fig_dir / f"heatmap_{grid.tag}.png", heat_rows, grid.langs, heat_vals,
                     f"Accuracy (%): {sec.task}, {sec.mode} labels"), f"Accuracy heat map, {grid.heading}")
    if comparisons:
        acc = grid.acc
        delta_vals = [[(acc[(c.setting, lang)] - acc[(None, lang)]) if (c.setting, lang) in acc and (None, lang) in acc
                       else None for lang in grid.langs] for c in comparisons]
        doc.img(_heatmap(view.fig_dir / f"delta_{grid.tag}.png", heat_rows[1:], grid.langs, delta_vals,
                         f"Change against the base (points): {sec.task}, {sec.mode} labels", diverging=True),
                f"Accuracy change against the base model, {grid.heading}")


def _accuracy_grid(view: RunView, sec: EvalSection) -> AccuracyGrid | None:
    rows = ([None] if sec.base else []) + [s for s in view.setting_order if s in sec.runs]
    if not rows:
        return None
    lang_order = {code: i for i, code in enumerate(languages.ALL)}
    langs = sorted({lang for e in sec.runs.values() for (m, lang) in e.outcomes if m == sec.mode},
                   key=lambda c: lang_order.get(c, 99))
    acc, nitems = {}, {}
    for key in rows:
        for lang in langs:
            o = sec.runs[key].outcomes.get((sec.mode, lang))
            if o:
                acc[(key, lang)] = sum(o.values()) / len(o)
                nitems[(key, lang)] = len(o)
    label = {None: f"{sec.model} (base)"}
    label.update({k: f"{view.settings.get(k, {}).get('label', k)}" for k in rows if k})
    return AccuracyGrid(rows, langs, acc, nitems, label, tag=_slug(sec.model if sec.multi else "", sec.task, sec.mode),
                        heading=f"{sec.task} · {sec.mode} labels" + (f" · {sec.model}" if sec.multi else ""))


def _accuracy_table(view: RunView, sec: EvalSection, grid: AccuracyGrid) -> Table:
    """Table 1 of the paper: accuracy per language and the average, the best per column in bold."""
    langs, acc = grid.langs, grid.acc
    best = {}
    for lang in langs:
        vals = [round(100 * acc[(k, lang)], 1) for k in grid.rows if (k, lang) in acc]
        best[lang] = max(vals) if vals else None
    avg_all = {k: grid.mean(k, langs) for k in grid.rows}
    best_avg = max((round(100 * v, 1) for v in avg_all.values() if v is not None), default=None)
    rows, csv_rows = [], []
    for k in grid.rows:
        seen = view.settings.get(k, {}).get("seen", []) if k else []
        cells = [Cell(grid.label[k])]
        for lang in langs:
            v = acc.get((k, lang))
            cells.append(Cell(_pct(v), bold=v is not None and round(100 * v, 1) == best[lang],
                              mark=DAGGER if lang in seen else "", raw=None if v is None else round(v, 4)))
        v = avg_all[k]
        cells.append(Cell(_pct(v), bold=v is not None and round(100 * v, 1) == best_avg,
                          raw=None if v is None else round(v, 4)))
        rows.append(cells)
        csv_rows.append({"row": grid.label[k], "setting": k or "base",
                         **{lang: (None if acc.get((k, lang)) is None else round(acc[(k, lang)], 4)) for lang in langs},
                         "avg": None if v is None else round(v, 4),
                         "seen": " ".join(seen)})
    ns = sorted({n for n in grid.nitems.values()})
    n_text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return Table(["model / setting", *langs, "Avg"], rows,
                 f"Accuracy (%) on {sec.task}, {sec.mode} labels, `{view.scoring}` scoring, {n_text} items per "
                 f"language. Bold: best per column. {DAGGER}: language seen in training.",
                 f"table1_{grid.tag}", csv_rows)


def _averages_table(view: RunView, grid: AccuracyGrid) -> Table:
    rows, csv_rows = [], []
    for k in grid.rows:
        seen = view.settings.get(k, {}).get("seen") if k else None
        cells, rec = [Cell(grid.label[k])], {"row": grid.label[k], "setting": k or "base"}
        for g in GROUPS:
            gl = _group_langs(g, grid.langs, seen)
            v = grid.mean(k, gl) if gl else None
            cells.append(Cell(_pct(v) + (f" ({len(gl)})" if g in ("seen", "unseen") and gl else ""),
                              raw=None if v is None else round(v, 4)))
            rec[g] = None if v is None else round(v, 4)
            rec[f"{g}_langs"] = len(gl)
        rows.append(cells)
        csv_rows.append(rec)
    return Table(["model / setting", "All", "Seen", "Unseen", "High", "Low"], rows,
                 "Average accuracy (%) over language groups (number of languages in brackets for seen/unseen; "
                 "the base model has no seen languages).", f"averages_{grid.tag}", csv_rows)


def _compare(view: RunView, sec: EvalSection, grid: AccuracyGrid, setting: str) -> Comparison:
    """Bootstrap deltas per language group and McNemar per language (Holm over the languages)."""
    seen = view.settings.get(setting, {}).get("seen", [])
    paired, idlists = {}, {}
    for lang in grid.langs:
        a, b = sec.base.outcomes.get((sec.mode, lang)), sec.runs[setting].outcomes.get((sec.mode, lang))
        if a and b:
            ids = [i for i in a if i in b]
            if ids:
                paired[lang] = ([a[i] for i in ids], [b[i] for i in ids])
                idlists[lang] = ids
    # Parallel test sets (the same item ids in every language): resample items across languages.
    parallel = len({tuple(v) for v in idlists.values()}) == 1
    groups = {}
    for g in GROUPS:
        gl = [lang for lang in _group_langs(g, grid.langs, seen) if lang in paired]
        if gl:
            d, lo, hi = paired_bootstrap_delta([paired[lang][0] for lang in gl], [paired[lang][1] for lang in gl],
                                               n_boot=view.n_boot, seed=view.seed, clustered=parallel)
            groups[g] = GroupDelta(d, lo, hi, len(gl))
    tests = {}
    for lang in grid.langs:
        if lang in paired:
            b, c = discordant(*paired[lang])
            tests[lang] = LangTest(len(paired[lang][0]), b, c, mcnemar_from_counts(b, c),
                                   mcnemar_from_counts(b, c, True))
    for t, padj in zip(tests.values(), holm([t.p_exact for t in tests.values()]) if tests else []):
        t.p_holm, t.significant = padj, padj < view.alpha
    return Comparison(setting, seen, groups, tests)


def _delta_table(grid: AccuracyGrid, comparisons: list[Comparison]) -> Table:
    rows, csv_rows = [], []
    for c in comparisons:
        cells, rec = [Cell(grid.label[c.setting])], {"setting": c.setting, "label": grid.label[c.setting]}
        for g in GROUPS:
            gd = c.groups.get(g)
            if gd is None:
                cells.append(Cell("—"))
                continue
            cells.append(Cell(f"{_pct(gd.delta, True)} [{_pct(gd.ci_low, True)}, {_pct(gd.ci_high, True)}]",
                              bold=gd.significant))
            rec.update({f"{g}_delta": round(gd.delta, 4), f"{g}_ci_low": round(gd.ci_low, 4),
                        f"{g}_ci_high": round(gd.ci_high, 4), f"{g}_langs": gd.n_langs})
        rows.append(cells)
        csv_rows.append(rec)
    return Table(["setting", "Δ All", "Δ Seen", "Δ Unseen", "Δ High", "Δ Low"], rows,
                 "Accuracy change against the base model in points, with a paired bootstrap 95% CI; bold where the "
                 "CI excludes zero.", f"deltas_{grid.tag}", csv_rows)


def _mcnemar_table(view: RunView, grid: AccuracyGrid, comparisons: list[Comparison]) -> Table:
    columns, csv_rows = [], []
    for c in comparisons:
        cells = []
        for lang in grid.langs:
            t = c.tests.get(lang)
            if t is None:
                cells.append(Cell("—"))
                continue
            cells.append(Cell(f"{_pct(t.delta, True)} ({_p(t.p_exact)}{'*' if t.significant else ''})",
                              bold=t.significant, mark=DAGGER if lang in c.seen else ""))
            csv_rows.append({"setting": c.setting, "lang": lang, "n": t.n, "base_only": t.base_only,
                             "setting_only": t.setting_only, "delta": round(t.delta, 4), "p_exact": t.p_exact,
                             "p_mid": t.p_mid, "p_holm": t.p_holm, "significant": t.significant})
        columns.append(cells)
    rows = [[Cell(lang)] + [col[i] for col in columns] for i, lang in enumerate(grid.langs)]
    return Table(["lang", *[grid.label[c.setting] for c in comparisons]], rows,
                 f"Per-language change against the base model in points, with the exact McNemar p-value; * and "
                 f"bold: p < {view.alpha} after Holm correction over the {len(grid.langs)} languages of a setting. "
                 f"{DAGGER}: seen in training.", f"mcnemar_{grid.tag}", csv_rows)


def _verdict(view: RunView, sec: EvalSection, grid: AccuracyGrid, c: Comparison) -> str | None:
    """The summary's line for a setting: the average's change, its CI, and the significant languages."""
    v = c.groups.get("all")
    if v is None:
        return None
    gains = sum(t.significant and t.setting_only > t.base_only for t in c.tests.values())
    losses = sum(t.significant and t.base_only > t.setting_only for t in c.tests.values())
    if v.ci_low > 0:
        what = "a gain: the 95% CI lies above zero"
    elif v.ci_high < 0:
        what = "a loss: the 95% CI lies below zero"
    else:
        what = "no clear change: the 95% CI includes zero"
    base_avg, set_avg = grid.mean(None, grid.langs), grid.mean(c.setting, grid.langs)
    line = (f"{sec.task}, {sec.mode} labels{f', {sec.model}' if sec.multi else ''}: **{grid.label[c.setting]}** "
            f"moves the average over {v.n_langs} languages from {_pct(base_avg)} to {_pct(set_avg)} "
            f"({_pct(v.delta, True)} points, 95% CI [{_pct(v.ci_low, True)}, {_pct(v.ci_high, True)}]), {what}. "
            f"Per language, McNemar finds {gains} significant gain{'s' if gains != 1 else ''} and {losses} "
            f"significant loss{'es' if losses != 1 else ''} among {len(c.tests)} (Holm-corrected, α = {view.alpha}).")
    seen, unseen = c.groups.get("seen"), c.groups.get("unseen")
    if seen and unseen:       # (from the deltas as the CSV rounds them, as the report always has)
        s_, u_ = ([_pct(round(x, 4), True) for x in (g.delta, g.ci_low, g.ci_high)] for g in (seen, unseen))
        line += (f" On its {seen.n_langs} seen languages: {s_[0]} [{s_[1]}, {s_[2]}]; on the "
                 f"{unseen.n_langs} unseen ones: {u_[0]} [{u_[1]}, {u_[2]}] points.")
    return line


def _p(p: float) -> str:
    if p < 0.001:
        return "p<.001"
    return f"p={p:.3f}".replace("0.", ".", 1)


def _train_row(step: dict, folder: Path, summ: TrainSummary | None) -> dict:
    row = {"step": step["label"], "model": step.get("model") or "", "setting": step.get("setting") or ""}
    train_log = read_jsonl(folder / "train_log.jsonl")
    train_losses = [r for r in train_log if "loss" in r and "eval_loss" not in r]
    evals = [r for r in train_log if "eval_loss" in r]
    if train_losses:
        row["first loss"] = f"{float(train_losses[0]['loss']):.3f}"
        row["final loss"] = f"{float(train_losses[-1]['loss']):.3f}"
        row["steps"] = train_losses[-1].get("step", len(train_losses))
        if "epoch" in train_losses[-1]:
            row["epochs"] = f"{float(train_losses[-1]['epoch']):.2f}"
    if evals:
        row["final eval loss"] = f"{float(evals[-1]['eval_loss']):.3f}"
    if summ is None:
        return row
    if summ.examples is not None:
        row["train pairs"] = summ.examples
    if summ.seconds is not None:
        row["seconds"] = f"{summ.seconds:.0f}" if isinstance(summ.seconds, float) else summ.seconds
    if "final eval loss" not in row and isinstance(summ.final_eval_loss, (int, float)):
        row["final eval loss"] = f"{summ.final_eval_loss:.3f}"
    return row


def _generic_table(rows: list[dict], caption: str, name: str) -> Table:
    keys = list(rows[0])
    return Table(keys, [[Cell(str(r.get(k, ""))) for k in keys] for r in rows[:60]], caption, name)


def _lens_table(rows: list[dict], step: dict) -> Table:
    """Per model and language: where the latent English answer peaks, and the last layer's answers."""
    by: dict = {}
    for r in rows:
        by.setdefault((r.get("model", ""), r.get("lang", "")), {}).setdefault(r.get("measure", ""), []).append(
            (int(float(r.get("layer", 0))), _float(r.get("mean")), r.get("n")))
    out, csv_rows = [], []
    for (model, lang), measures in by.items():
        en = sorted(measures.get("english_answer", []))
        tgt = sorted(measures.get("target_answer", []))
        ent = sorted(measures.get("entropy_bits", []))
        peak = max((x for x in en if x[1] is not None), key=lambda x: x[1], default=None)
        last_t = tgt[-1][1] if tgt else None
        last_e = en[-1][1] if en else None
        n = (tgt or en or [(0, None, "")])[-1][2]
        rec = {"model": model, "lang": lang, "n": n, "english_peak_layer": peak[0] if peak else None,
               "english_peak_p": peak[1] if peak else None, "last_target_p": last_t, "last_english_p": last_e,
               "last_entropy_bits": ent[-1][1] if ent else None}
        csv_rows.append(rec)
        out.append([Cell(str(model)), Cell(str(lang)), Cell(str(n or "")),
                    Cell(f"{peak[1]:.3f} @ {peak[0]}" if peak else "—"),
                    Cell(f"{last_e:.3f}" if last_e is not None else "—"),
                    Cell(f"{last_t:.3f}" if last_t is not None else "—"),
                    Cell(f"{rec['last_entropy_bits']:.2f}" if rec["last_entropy_bits"] is not None else "—")])
    return Table(["model", "lang", "n", "max P(English answer) @ layer", "P(English) last layer",
                  "P(target answer) last layer", "entropy last layer (bits)"], out,
                 f"{step['label']}: logit-lens summary from lens.csv.",
                 f"lens_{_slug(step.get('model') or '', step.get('setting') or 'base')}", csv_rows)


def _drawn_layers(folder: Path, layers: list[int]) -> list[int]:
    """The layers the geometry step drew (pca_layer<L>.png), else the middle, 3/4 and last ones."""
    drawn = sorted({int(m.group(1)) for p in folder.glob("pca_layer*.png")
                    if (m := re.fullmatch(r"pca_layer(\d+)", p.stem))} & set(layers))
    return drawn or sorted({layers[len(layers) // 2], layers[(3 * len(layers)) // 4], layers[-1]})


def _pearson_table(rows: list[dict], step: dict, folder: Path) -> Table | None:
    """Pearson r of English with every other language at the layers drawn, per model."""
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    layers = sorted({int(float(r["layer"])) for r in rows if r.get("layer") not in (None, "")})
    if not layers:
        return None
    shown = _drawn_layers(folder, layers)
    pairs = list(dict.fromkeys((r["lang_a"], r["lang_b"]) for r in rows if "en" in (r.get("lang_a"), r.get("lang_b"))))
    if not pairs:
        pairs = list(dict.fromkeys((r["lang_a"], r["lang_b"]) for r in rows))[:12]
    look = {(r.get("model", ""), int(float(r["layer"])), r["lang_a"], r["lang_b"]): _float(r.get("r")) for r in rows}
    header = ["pair"] + [f"layer {L}" + (f" {m}" if len(models) > 1 else "") for L in shown for m in models]
    out, csv_rows = [], []
    for a, b in pairs:
        cells = [Cell(f"{a}–{b}")]
        for L in shown:
            for m in models:
                v = look.get((m, L, a, b))
                cells.append(Cell(f"{v:.2f}" if v is not None else "—"))
                csv_rows.append({"pair": f"{a}-{b}", "layer": L, "model": m, "r": v})
        out.append(cells)
    return Table(header, out, f"{step['label']}: Pearson r of the 1-D PCA scores between languages (from pearson.csv).",
                 f"pearson_{_slug(step.get('model') or '', step.get('setting') or 'base')}", csv_rows)


def _alignment_table(rows: list[dict], step: dict, folder: Path) -> Table | None:
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    layers = sorted({int(float(r["layer"])) for r in rows if r.get("layer") not in (None, "")})
    if not layers:
        return None
    mid = _drawn_layers(folder, layers)[-1]
    look = {(r.get("model", ""), int(float(r["layer"])), r.get("lang")): r for r in rows}
    langs = list(dict.fromkeys(r.get("lang") for r in rows))
    header = ["lang"] + [f"{what} {m}".strip() for m in (models if len(models) > 1 else [""])
                         for what in ("cos gap", "retrieval")]
    out = []
    for lang in langs:
        cells = [Cell(str(lang))]
        for m in models:
            r = look.get((m, mid, lang))
            if r is None:
                cells += [Cell("—"), Cell("—")]
                continue
            cp, cn, ra = _float(r.get("cos_parallel")), _float(r.get("cos_nonparallel")), _float(r.get("retrieval_acc"))
            cells.append(Cell(f"{cp - cn:+.3f}" if cp is not None and cn is not None else "—"))
            cells.append(Cell(f"{ra:.2f}" if ra is not None else "—"))
        out.append(cells)
    return Table(header, out, f"{step['label']}: alignment at layer {mid} (cos gap = mean cosine of parallel minus "
                 "non-parallel items; retrieval = share of items whose nearest English item is their translation).",
                 f"alignment_{_slug(step.get('model') or '', step.get('setting') or 'base')}",
                 csv_rows=[dict(r) for r in rows])


# ----------------------------------------------------------------------------- the command
@dataclass
class ReportConfig:
    """The options of `polyalign report`."""
    run_dir: str = option("", positional=True, required=True, help="a run folder written by `polyalign run`")
    bootstrap: int | None = option(None, help="bootstrap resamples (default: the experiment's)")
    seed: int | None = option(None, help="bootstrap seed (default: the experiment's)")


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    broken: dict[str, tuple[Path, str]]     # step label -> (folder, what is wrong); the report leaves them out

    def problem(self) -> str | None:
        """One line about the broken steps, or None: the report is written, but a damaged run is no success."""
        if not self.broken:
            return None
        label, (folder, problem) = next(iter(self.broken.items()))
        more = f"; {len(self.broken) - 1} more broken step(s)" if len(self.broken) > 1 else ""
        return (f"{label}: {problem} in {folder} (the report leaves it out); rerun `polyalign run` "
                f"to rebuild it, or delete its done.json" + more)


def run_report(cfg: ReportConfig) -> ReportResult:
    html = build_report(cfg.run_dir, cfg.bootstrap, cfg.seed)
    run = Path(cfg.run_dir)
    broken = broken_steps(run, json.loads((run / "manifest.json").read_text("utf-8")).get("steps", []))
    return ReportResult(run / "report.md", html, broken)
