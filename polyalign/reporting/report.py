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
from polyalign.store import atomic_path, read_jsonl, safe_name, write_atomic, write_csv

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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else 100 * v for v in r] for r in values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cols) + 2.5), max(1.6, 0.5 * len(rows) + 1.2)))
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


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


def build_report(run_dir: str | Path, bootstrap: int | None = None, seed: int | None = None) -> Path:
    run = Path(run_dir)
    mpath = run / "manifest.json"
    if not mpath.exists():
        raise PolyalignError(f"{run} is not a run folder (no manifest.json); create one with `polyalign run`")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise PolyalignError(f"{mpath}: malformed JSON ({e.msg})") from None
    rep_cfg = manifest.get("report") or {}
    n_boot = bootstrap or rep_cfg.get("bootstrap") or 10000
    boot_seed = seed if seed is not None else rep_cfg.get("seed", 0)
    alpha = rep_cfg.get("alpha", 0.05)
    out_dir = run / "report"
    fig_dir = out_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = {s["name"]: s for s in manifest.get("settings", [])}
    setting_order = [s["name"] for s in manifest.get("settings", [])]
    models = [m["label"] for m in manifest.get("models", [])]
    steps = manifest.get("steps", [])
    broken = {label: problem for label, (_, problem) in broken_steps(run, steps).items()}
    for label, problem in broken.items():   # info: `polyalign report` then fails with this as its one error line
        log.info("%s: %s; rerun `polyalign run` to rebuild it", label, problem)
    done = [s for s in steps if s["label"] not in broken
            and (s.get("status") == "done" or (run / s["dir"] / "done.json").exists())]
    pending = [s for s in steps if s not in done]
    ev_cfg = manifest.get("eval") or {}
    scoring = ev_cfg.get("scoring", "paper")

    doc = Doc()
    title = rep_cfg.get("title") or f"polyalign report: {manifest.get('name', run.name)}"
    doc.h(1, title)
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
    if pending:
        facts.append(f"**Incomplete run**: {len(pending)} of {len(steps)} steps are not finished "
                     f"({', '.join(s['label'] for s in pending[:6])}{'…' if len(pending) > 6 else ''}); "
                     "rerun `polyalign run` to finish them")
    if broken:
        facts.append("**Broken steps**, left out below: " + "; ".join(f"{label}: {problem}"
                                                                      for label, problem in broken.items()))
    doc.ul(facts)

    # ---- evaluations
    evals = [e for e in (_load_eval(s, run, scoring) for s in done if s["kind"] == "eval") if e]
    summary_lines: list[str] = []
    results_blocks = Doc()
    exported: list[Table] = []
    lang_order = {code: i for i, code in enumerate(languages.ALL)}
    for model in models or sorted({e.model for e in evals}):
        for task in dict.fromkeys(e.task for e in evals if e.model == model):
            mine = {e.setting: e for e in evals if e.model == model and e.task == task}
            base = mine.get(None)
            modes = list(dict.fromkeys(mode for e in mine.values() for mode, _ in e.outcomes))
            for mode in modes:
                _results_section(results_blocks, summary_lines, exported, model, task, mode, base, mine,
                                 settings, setting_order, lang_order, scoring, n_boot, boot_seed, alpha, fig_dir,
                                 multi=len(models) > 1 or len(modes) > 1)
    doc.h(2, "Summary")
    if summary_lines:
        doc.ul(summary_lines)
    else:
        doc.p("No finished evaluation yet.")
    doc.blocks += results_blocks.blocks
    # ---- alignment or calibration? (issue 12; its sentences join the summary above)
    from polyalign.reporting.alignment import alignment_sections, geometry_summaries
    alignment_sections(doc, summary_lines, exported, evals, geometry_summaries(run, done), settings, setting_order,
                       lang_order, n_boot, boot_seed, fig_dir, multi=len(models) > 1)

    # ---- training
    trains = [s for s in done if s["kind"] == "train"]
    if trains:
        doc.h(2, "Training")
        rows, images = [], []
        for s in trains:
            folder = run / s["dir"]
            summ = {}
            if (folder / "summary.json").exists():
                try:
                    summ = json.loads((folder / "summary.json").read_text("utf-8"))
                except json.JSONDecodeError:
                    summ = {}
            rows.append(_train_row(s, folder, summ))
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

    # ---- lens
    lens_steps = [s for s in done if s["kind"] in ("lens", "tuned_lens")]   # tuned_lens: both lenses side by side
    if lens_steps:
        doc.h(2, "Logit lens")
        doc.p("Per layer, the residual at the answer position is decoded with the model's own final norm and "
              "unembedding (Wendler et al.'s logit lens). Curves show the probability of the correct answer in "
              "the prompt's language, of its English twin, and the entropy; the overlay compares the base model "
              "with the trained adapter. Samples whose English and target token sets overlap are excluded "
              "(counted below).")
        for s in lens_steps:
            folder = run / s["dir"]
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

    # ---- geometry
    geo_steps = [s for s in done if s["kind"] == "geometry"]
    if geo_steps:
        doc.h(2, "Representation geometry")
        doc.p("Hidden states of parallel items, mean-pooled over the prompt (the paper's choice unless set "
              "otherwise), per layer. Pearson r of the 1-D PCA scores between two languages measures how "
              "alike their representations are; the alignment metrics compare the cosine similarity of "
              "parallel and non-parallel items and test whether an item's nearest English item is its own "
              "translation.")
        for s in geo_steps:
            folder = run / s["dir"]
            pear = _read_csv(folder / "pearson.csv")
            if pear:
                t = _pearson_table(pear, s, folder)
                if t:
                    doc.table(t)
                    exported.append(t)
            align = _read_csv(folder / "alignment.csv")
            if align:
                t = _alignment_table(align, s, folder)
                if t:
                    doc.table(t)
                    exported.append(t)

            def order(p: Path):
                m = re.search(r"(\d+)", p.stem)
                kind = 0 if p.stem.startswith("alignment") else 1 if p.stem.startswith("pearson") else 2
                return (kind, int(m.group(1)) if m else -1, p.name)
            for png in sorted(folder.glob("*.png"), key=order):
                doc.img(png, f"{s['label']}: {png.stem.replace('_', ' ')}")

    # ---- language neurons (reporting/neurons.py)
    from polyalign.reporting.neurons import neurons_section
    neurons_section(doc, run, [s for s in done if s["kind"] == "neurons"], settings, exported)

    # ---- run facts
    timed = [s for s in steps if s.get("seconds")]
    if timed:
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

    # ---- write
    for t in exported:
        if t.name:
            write_table_csv(out_dir / f"{t.name}.csv", t)
            write_atomic(out_dir / f"{t.name}.tex", render_tex(t))
    write_atomic(run / "report.md", render_md(doc, run))
    out = run / "report.html"
    write_atomic(out, render_html(doc, title))
    return out


def _results_section(doc: Doc, summary: list[str], exported: list[Table], model: str, task: str, mode: str,
                     base: EvalRun | None, mine: dict, settings: dict, order: list[str], lang_order: dict,
                     scoring: str, n_boot: int, seed: int, alpha: float, fig_dir: Path, multi: bool) -> None:
    rows_keys = ([None] if base else []) + [s for s in order if s in mine]
    if not rows_keys:
        return
    langs = sorted({lang for e in mine.values() for (m, lang) in e.outcomes if m == mode},
                   key=lambda c: lang_order.get(c, 99))
    acc: dict = {}
    nitems: dict = {}
    for key in rows_keys:
        for lang in langs:
            o = mine[key].outcomes.get((mode, lang))
            if o:
                acc[(key, lang)] = sum(o.values()) / len(o)
                nitems[(key, lang)] = len(o)
    tag = _slug(model if multi else "", task, mode)
    heading = f"{task} · {mode} labels" + (f" · {model}" if multi else "")
    doc.h(2, f"Accuracy: {heading}")
    row_label = {None: f"{model} (base)"}
    row_label.update({k: f"{settings.get(k, {}).get('label', k)}" for k in rows_keys if k})

    # ---- Table 1
    best = {}
    for lang in langs:
        vals = [round(100 * acc[(k, lang)], 1) for k in rows_keys if (k, lang) in acc]
        best[lang] = max(vals) if vals else None
    avg_all = {k: _mean([acc[(k, lang)] for lang in langs if (k, lang) in acc]) for k in rows_keys}
    best_avg = max((round(100 * v, 1) for v in avg_all.values() if v is not None), default=None)
    header = ["model / setting", *langs, "Avg"]
    t1_rows, t1_csv = [], []
    for k in rows_keys:
        seen = settings.get(k, {}).get("seen", []) if k else []
        cells = [Cell(row_label[k])]
        for lang in langs:
            v = acc.get((k, lang))
            cells.append(Cell(_pct(v), bold=v is not None and round(100 * v, 1) == best[lang],
                              mark=DAGGER if lang in seen else "", raw=None if v is None else round(v, 4)))
        v = avg_all[k]
        cells.append(Cell(_pct(v), bold=v is not None and round(100 * v, 1) == best_avg,
                          raw=None if v is None else round(v, 4)))
        t1_rows.append(cells)
        t1_csv.append({"row": row_label[k], "setting": k or "base",
                       **{lang: (None if acc.get((k, lang)) is None else round(acc[(k, lang)], 4)) for lang in langs},
                       "avg": None if v is None else round(v, 4),
                       "seen": " ".join(seen)})
    ns = sorted({n for n in nitems.values()})
    n_text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    t1 = Table(header, t1_rows, f"Accuracy (%) on {task}, {mode} labels, `{scoring}` scoring, {n_text} items per "
               f"language. Bold: best per column. {DAGGER}: language seen in training.",
               f"table1_{tag}", t1_csv)
    doc.table(t1)
    exported.append(t1)

    # ---- averages
    av_rows, av_csv = [], []
    for k in rows_keys:
        seen = settings.get(k, {}).get("seen") if k else None
        cells, rec = [Cell(row_label[k])], {"row": row_label[k], "setting": k or "base"}
        for g in GROUPS:
            gl = _group_langs(g, langs, seen)
            v = _mean([acc[(k, lang)] for lang in gl if (k, lang) in acc]) if gl else None
            cells.append(Cell(_pct(v) + (f" ({len(gl)})" if g in ("seen", "unseen") and gl else ""),
                              raw=None if v is None else round(v, 4)))
            rec[g] = None if v is None else round(v, 4)
            rec[f"{g}_langs"] = len(gl)
        av_rows.append(cells)
        av_csv.append(rec)
    t2 = Table(["model / setting", "All", "Seen", "Unseen", "High", "Low"], av_rows,
               "Average accuracy (%) over language groups (number of languages in brackets for seen/unseen; "
               "the base model has no seen languages).", f"averages_{tag}", av_csv)
    doc.table(t2)
    exported.append(t2)

    if base is None:
        doc.p("No base-model evaluation is finished, so deltas and tests are not available.")
        return
    # ---- deltas with bootstrap CIs, McNemar per language
    d_rows, d_csv, m_cols, m_csv = [], [], [], []
    heat_rows, heat_vals, delta_vals = [row_label[None]], [[acc.get((None, lang)) for lang in langs]], []
    for k in rows_keys:
        if k is None:
            continue
        seen = settings.get(k, {}).get("seen", [])
        paired, idlists = {}, {}
        for lang in langs:
            a, b = base.outcomes.get((mode, lang)), mine[k].outcomes.get((mode, lang))
            if a and b:
                ids = [i for i in a if i in b]
                if ids:
                    paired[lang] = ([a[i] for i in ids], [b[i] for i in ids])
                    idlists[lang] = ids
        # Parallel test sets (the same item ids in every language): resample items across languages.
        parallel = len({tuple(v) for v in idlists.values()}) == 1
        cells, rec = [Cell(row_label[k])], {"setting": k, "label": row_label[k]}
        verdict = None
        for g in GROUPS:
            gl = [lang for lang in _group_langs(g, langs, seen) if lang in paired]
            if not gl:
                cells.append(Cell("—"))
                continue
            d, lo, hi = paired_bootstrap_delta([paired[lang][0] for lang in gl], [paired[lang][1] for lang in gl],
                                               n_boot=n_boot, seed=seed, clustered=parallel)
            sig = lo > 0 or hi < 0
            cells.append(Cell(f"{_pct(d, True)} [{_pct(lo, True)}, {_pct(hi, True)}]", bold=sig))
            rec.update({f"{g}_delta": round(d, 4), f"{g}_ci_low": round(lo, 4), f"{g}_ci_high": round(hi, 4),
                        f"{g}_langs": len(gl)})
            if g == "all":
                verdict = (d, lo, hi, len(gl))
        d_rows.append(cells)
        d_csv.append(rec)
        # McNemar
        pvals, counts = [], []
        for lang in langs:
            if lang in paired:
                bc = discordant(*paired[lang])
                counts.append(bc)
                pvals.append(mcnemar_from_counts(*bc))
            else:
                counts.append(None)
                pvals.append(None)
        present = [p for p in pvals if p is not None]
        adj_iter = iter(holm(present)) if present else iter([])
        adjusted = [next(adj_iter) if p is not None else None for p in pvals]
        mcells = []
        gains = losses = 0
        for lang, p, padj, bc in zip(langs, pvals, adjusted, counts):
            if p is None:
                mcells.append(Cell("—"))
                continue
            b, c = bc
            sig = padj < alpha
            if sig:
                gains += c > b
                losses += b > c
            delta = (c - b) / len(paired[lang][0])
            mcells.append(Cell(f"{_pct(delta, True)} ({_p(p)}{'*' if sig else ''})", bold=sig,
                               mark=DAGGER if lang in seen else ""))
            m_csv.append({"setting": k, "lang": lang, "n": len(paired[lang][0]), "base_only": b, "setting_only": c,
                          "delta": round(delta, 4), "p_exact": p, "p_mid": mcnemar_from_counts(b, c, True),
                          "p_holm": padj, "significant": sig})
        m_cols.append(mcells)
        heat_rows.append(row_label[k])
        heat_vals.append([acc.get((k, lang)) for lang in langs])
        delta_vals.append([(acc[(k, lang)] - acc[(None, lang)]) if (k, lang) in acc and (None, lang) in acc
                           else None for lang in langs])
        if verdict:
            d, lo, hi, nl = verdict
            base_avg, set_avg = avg_all[None], avg_all[k]
            if lo > 0:
                what = "a gain: the 95% CI lies above zero"
            elif hi < 0:
                what = "a loss: the 95% CI lies below zero"
            else:
                what = "no clear change: the 95% CI includes zero"
            line = (f"{task}, {mode} labels{f', {model}' if multi else ''}: **{row_label[k]}** moves the average "
                    f"over {nl} languages from {_pct(base_avg)} to {_pct(set_avg)} ({_pct(d, True)} points, 95% CI "
                    f"[{_pct(lo, True)}, {_pct(hi, True)}]), {what}. Per language, McNemar finds "
                    f"{gains} significant gain{'s' if gains != 1 else ''} and {losses} significant "
                    f"loss{'es' if losses != 1 else ''} among {len(present)} (Holm-corrected, α = {alpha}).")
            if "seen_delta" in rec and "unseen_delta" in rec:
                line += (f" On its {rec['seen_langs']} seen languages: {_pct(rec['seen_delta'], True)} "
                         f"[{_pct(rec['seen_ci_low'], True)}, {_pct(rec['seen_ci_high'], True)}]; on the "
                         f"{rec['unseen_langs']} unseen ones: {_pct(rec['unseen_delta'], True)} "
                         f"[{_pct(rec['unseen_ci_low'], True)}, {_pct(rec['unseen_ci_high'], True)}] points.")
            summary.append(line)
    t3 = Table(["setting", "Δ All", "Δ Seen", "Δ Unseen", "Δ High", "Δ Low"], d_rows,
               "Accuracy change against the base model in points, with a paired bootstrap 95% CI; bold where the "
               "CI excludes zero.", f"deltas_{tag}", d_csv)
    doc.table(t3)
    exported.append(t3)
    m_rows = [[Cell(lang)] + [col[i] for col in m_cols] for i, lang in enumerate(langs)]
    t4 = Table(["lang", *[row_label[k] for k in rows_keys if k is not None]], m_rows,
               f"Per-language change against the base model in points, with the exact McNemar p-value; * and "
               f"bold: p < {alpha} after Holm correction over the {len(langs)} languages of a setting. "
               f"{DAGGER}: seen in training.", f"mcnemar_{tag}", m_csv)
    doc.table(t4)
    exported.append(t4)
    doc.img(_heatmap(fig_dir / f"heatmap_{tag}.png", heat_rows, langs, heat_vals,
                     f"Accuracy (%): {task}, {mode} labels"), f"Accuracy heat map, {heading}")
    if delta_vals:
        doc.img(_heatmap(fig_dir / f"delta_{tag}.png", heat_rows[1:], langs, delta_vals,
                         f"Change against the base (points): {task}, {mode} labels", diverging=True),
                f"Accuracy change against the base model, {heading}")


def _p(p: float) -> str:
    if p < 0.001:
        return "p<.001"
    return f"p={p:.3f}".replace("0.", ".", 1)


def _train_row(step: dict, folder: Path, summ: dict) -> dict:
    row = {"step": step["label"], "model": step.get("model") or "", "setting": step.get("setting") or ""}
    log = read_jsonl(folder / "train_log.jsonl")
    train_losses = [r for r in log if "loss" in r and "eval_loss" not in r]
    evals = [r for r in log if "eval_loss" in r]
    if train_losses:
        row["first loss"] = f"{float(train_losses[0]['loss']):.3f}"
        row["final loss"] = f"{float(train_losses[-1]['loss']):.3f}"
        row["steps"] = train_losses[-1].get("step", len(train_losses))
        if "epoch" in train_losses[-1]:
            row["epochs"] = f"{float(train_losses[-1]['epoch']):.2f}"
    if evals:
        row["final eval loss"] = f"{float(evals[-1]['eval_loss']):.3f}"
    for key, name in (("train_examples", "train pairs"), ("n_train", "train pairs"), ("train_pairs", "train pairs"),
                      ("seconds", "seconds"), ("train_seconds", "seconds"), ("wall_s", "seconds")):
        if key in summ and name not in row:
            v = summ[key]
            row[name] = f"{v:.0f}" if isinstance(v, float) else v
    if "final eval loss" not in row:
        for key in ("eval_loss", "final_eval_loss", "best_eval_loss"):
            if isinstance(summ.get(key), (int, float)):
                row["final eval loss"] = f"{summ[key]:.3f}"
                break
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
