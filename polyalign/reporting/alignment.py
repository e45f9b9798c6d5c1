"""The report's "Alignment or calibration?" section (issue 12), one per setting.

A few-shot classifier's accuracy also rises when training merely moves its prior over the label
words; on a balanced set that alone changes accuracy. Per setting against the base model this
section shows: Δ accuracy raw and under each calibration (paired bootstrap CIs), the change in the
base model's majority-class share, Δ MEXA per language (from the geometry step), the correlation of
Δ MEXA with Δ accuracy across languages, and one sentence written by rules from those CIs.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from polyalign.analysis.mexa import correlation
from polyalign.evaluation.calibration import METHODS
from polyalign.evaluation.diagnostics import summary_fields
from polyalign.reporting.report import DAGGER, Cell, Doc, EvalRun, Table, _group_langs, _pct, _slug
from polyalign.stats import paired_bootstrap_delta
from polyalign.store import read_jsonl

SCORINGS = ("raw", *METHODS)
GROUPS = ("all", "seen", "unseen")


# ----------------------------------------------------------------------------- reading
def _samples(run: EvalRun, task: str, mode: str, lang: str) -> dict[str, dict]:
    return {str(s["id"]): s for s in read_jsonl(run.folder / "samples" / task / mode / f"{lang}.jsonl")}


def _correct(s: dict, scoring: str) -> bool | None:
    if scoring == "raw":
        return bool(s["correct"])
    pred = (s.get("pred_calibrated") or {}).get(scoring)
    return None if pred is None else pred == s["gold"]


def geometry_summaries(run: Path, steps: list[dict]) -> list[dict]:
    """The summary.json of every finished geometry step (their `mexa` entries)."""
    out = []
    for s in steps:
        path = run / s["dir"] / "summary.json"
        if s["kind"] == "geometry" and path.exists():
            try:
                out.append(json.loads(path.read_text("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue     # broken_steps has already named it
    return out


def _mexa_delta(geo_summaries: list[dict], setting: str) -> dict[str, float]:
    """lang -> Δ MEXA (mean over layers) of a setting's adapter against the base, from geometry's summary."""
    label = re.sub(r"[^\w.+-]+", "_", setting) or "adapter"   # geometry's label of the setting's adapter copy
    for summ in geo_summaries:
        for key, per_lang in ((summ.get("mexa") or {}).get("delta") or {}).items():
            if key.split("-minus-")[0] == label:
                return {lang: v["mean"] for lang, v in per_lang.items()}
    return {}


# ----------------------------------------------------------------------------- the sentence
def _ci(d: tuple) -> str:
    return f"{_pct(d[0], True)} [{_pct(d[1], True)}, {_pct(d[2], True)}]"


def verdict(raw: tuple, calibrated: tuple | None, method: str, where: str) -> str:
    """One sentence from the CIs of the raw and the calibrated Δ accuracy (each (Δ, low, high)).
    The rules: a CI above zero is a gain, below zero a loss, else no clear change; a raw gain that
    calibration turns into no clear change or less than half of it is (mostly) a shift of the label
    prior; a gain that only calibration shows was hidden by it."""
    r = f"the raw change {where} is {_ci(raw)} points"
    if calibrated is None:
        return f"{r[0].upper()}{r[1:]}; no calibrated scores were computed (eval.calibration: none), so it cannot be told apart from a shift of the label prior."
    c = f"after {method} calibration it is {_ci(calibrated)}"
    raw_gain, raw_loss = raw[1] > 0, raw[2] < 0
    cal_gain, cal_loss = calibrated[1] > 0, calibrated[2] < 0
    if raw_gain:
        if cal_gain and calibrated[0] >= 0.5 * raw[0]:
            tail = "the gain survives calibration, so it is not a shift of the label prior"
        elif cal_gain:
            tail = "a gain remains, but less than half of the raw one: part of it is a shift of the label prior"
        elif cal_loss:
            tail = "the raw gain is a shift of the label prior"
        elif calibrated[0] < raw[0]:
            tail = "most of the raw gain is a shift of the label prior"
        else:
            tail = "the calibrated change is too uncertain to tell the two apart"
    elif raw_loss:
        if cal_loss:
            tail = "the loss survives calibration"
        elif cal_gain:
            tail = "the raw loss is a shift of the label prior that hides a gain"
        else:
            tail = "the raw loss is mostly a shift of the label prior"
    else:
        if cal_gain:
            tail = "calibration reveals a gain that the label prior hid"
        elif cal_loss:
            tail = "calibration reveals a loss that the label prior hid"
        else:
            tail = "neither the raw nor the calibrated accuracy changes clearly"
    return f"{r[0].upper()}{r[1:]}; {c}: {tail}."


def mexa_sentence(corr: dict | None) -> str:
    if not corr or corr.get("spearman") != corr.get("spearman"):
        return ""
    lo, hi = corr["spearman_ci"]
    stat = f"Spearman ρ = {corr['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}] over {corr['n_langs']} languages"
    if lo > 0:
        return f" Languages whose MEXA rose more gained more accuracy ({stat})."
    if hi < 0:
        return f" Languages whose MEXA rose more gained less accuracy ({stat})."
    return f" Δ MEXA does not clearly predict Δ accuracy across languages ({stat})."


# ----------------------------------------------------------------------------- the figure
def _figure(path: Path, langs: list[str], d_mexa: dict, d_acc: dict[str, dict], title: str) -> Path:
    """Δ accuracy per language, raw and calibrated: against Δ MEXA where the geometry step has it,
    else as bars. A matplotlib Figure (no pyplot state), written atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    markers = {"raw": "o", "contextual": "s", "pmi": "^"}
    with_mexa = [lang for lang in langs if lang in d_mexa]
    if with_mexa:
        for scoring, per in d_acc.items():
            pts = [(d_mexa[lang], 100 * per[lang], lang) for lang in with_mexa if lang in per]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[scoring], label=scoring, alpha=0.8)
                if scoring == "raw":
                    for x, y, lang in pts:
                        ax.annotate(lang, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("Δ MEXA (mean over layers)")
    else:
        width = 0.8 / max(1, len(d_acc))
        for i, (scoring, per) in enumerate(d_acc.items()):
            ax.bar([j + i * width for j in range(len(langs))], [100 * per.get(lang, float("nan")) for lang in langs],
                   width, label=scoring)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs, fontsize=7)
        ax.set_xlabel("language")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("Δ accuracy (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the section
def alignment_sections(doc: Doc, summary: list[str], exported: list[Table], evals: list[EvalRun],
                       geo_summaries: list[dict], settings: dict, order: list[str], lang_order: dict,
                       n_boot: int, seed: int, fig_dir: Path, multi: bool) -> None:
    """One sub-section per (model, task, label mode, setting) that has a base evaluation."""
    first = True
    for model in dict.fromkeys(e.model for e in evals):
        for task in dict.fromkeys(e.task for e in evals if e.model == model):
            mine = {e.setting: e for e in evals if e.model == model and e.task == task}
            base = mine.get(None)
            if base is None:
                continue
            for mode in dict.fromkeys(m for m, _ in base.outcomes):
                for k in [s for s in order if s in mine]:
                    if first:
                        doc.h(2, "Alignment or calibration?")
                        doc.p(INTRO)
                        first = False
                    _setting_section(doc, summary, exported, model, task, mode, base, mine[k], k,
                                     settings.get(k, {}), geo_summaries, lang_order, n_boot, seed, fig_dir, multi)


INTRO = ("Accuracy can rise because the model reads the input better or because training moved its prior over "
         "the label words; on a balanced set the second alone changes accuracy. Contextual calibration (Zhao et "
         "al. 2021) divides each class probability by its probability for content-free inputs (the empty "
         "string, `N/A`, `[MASK]`) after the same demos; PMI (Holtzman et al. 2021) by its probability after "
         "the answer cue alone. A gain that survives calibration is not a shift of the prior. The majority "
         "share is the share of predictions that go to the base model's most predicted class; MEXA "
         "(Kargaran et al. 2024) is the share of parallel items whose English translation is their nearest "
         "neighbour both ways, averaged over layers.")


def _setting_section(doc, summary, exported, model, task, mode, base, other, key, setting, geo_summaries,
                     lang_order, n_boot, seed, fig_dir, multi) -> None:
    label = setting.get("label", key)
    seen = setting.get("seen", [])
    langs = sorted({lang for m, lang in base.outcomes if m == mode} & {lang for m, lang in other.outcomes if m == mode},
                   key=lambda c: lang_order.get(c, 99))
    paired: dict[str, dict] = {}        # lang -> {scoring: (base outcomes, setting outcomes)}
    bias: dict[str, tuple[dict, dict]] = {}
    for lang in langs:
        a, b = _samples(base, task, mode, lang), _samples(other, task, mode, lang)
        ids = [i for i in a if i in b]
        if not ids:
            continue
        per = {}
        for scoring in SCORINGS:
            x, y = [_correct(a[i], scoring) for i in ids], [_correct(b[i], scoring) for i in ids]
            if None not in x and None not in y:
                per[scoring] = (x, y)
        paired[lang] = per
        bias[lang] = (summary_fields([a[i] for i in ids], base.scoring)["bias"],
                      summary_fields([b[i] for i in ids], other.scoring)["bias"])
    if not paired:
        return
    scorings = [s for s in SCORINGS if all(s in per for per in paired.values())]
    idlists = {lang: len(paired[lang]["raw"][0]) for lang in paired}
    parallel = len(set(idlists.values())) == 1
    tag = _slug(model if multi else "", task, mode, key)
    doc.h(3, f"{label}: {task} · {mode} labels" + (f" · {model}" if multi else ""))

    # Δ accuracy per scoring and language group
    rows, csv_rows, deltas = [], [], {}
    for scoring in scorings:
        cells, rec = [Cell(scoring)], {"setting": key, "scoring": scoring}
        for g in GROUPS:
            gl = [lang for lang in _group_langs(g, list(paired), seen if seen else None)]
            if not gl:
                cells.append(Cell("—"))
                continue
            d = paired_bootstrap_delta([paired[lang][scoring][0] for lang in gl],
                                       [paired[lang][scoring][1] for lang in gl],
                                       n_boot=n_boot, seed=seed, clustered=parallel)
            deltas[(scoring, g)] = d
            cells.append(Cell(_ci(d), bold=d[1] > 0 or d[2] < 0))
            rec.update({f"{g}_delta": round(d[0], 4), f"{g}_ci_low": round(d[1], 4), f"{g}_ci_high": round(d[2], 4),
                        f"{g}_langs": len(gl)})
        rows.append(cells)
        csv_rows.append(rec)
    t = Table(["scoring", "Δ All", "Δ Seen", "Δ Unseen"], rows,
              f"{label} minus the base model: accuracy change in points with a paired bootstrap 95% CI, raw and "
              "after each calibration; bold where the CI excludes zero.", f"calibration_{tag}", csv_rows)
    doc.table(t)
    exported.append(t)

    # per language: bias, Δ accuracy, Δ MEXA
    d_mexa = _mexa_delta(geo_summaries, key)
    d_acc = {s: {lang: (sum(paired[lang][s][1]) - sum(paired[lang][s][0])) / len(paired[lang][s][0])
                 for lang in paired} for s in scorings}
    header = ["lang", "base majority (share)", f"{label} share", "Δ share", *[f"Δ acc {s}" for s in scorings],
              "Δ MEXA"]
    rows, csv_rows = [], []
    for lang in paired:
        b0, b1 = bias[lang]
        cls = b0["majority_class"]
        share1 = b1["shares"].get(cls, 0.0)
        flag = " ⚠" if b0.get("answers_one_class") else ""
        cells = [Cell(lang, mark=DAGGER if lang in seen else ""),
                 Cell(f"{cls} ({_pct(b0['majority_share'])}){flag}"),
                 Cell(_pct(share1) + (" ⚠" if b1.get("answers_one_class") else "")),
                 Cell(_pct(share1 - b0["majority_share"], True), raw=round(share1 - b0["majority_share"], 4))]
        cells += [Cell(_pct(d_acc[s][lang], True), raw=round(d_acc[s][lang], 4)) for s in scorings]
        cells.append(Cell(f"{d_mexa[lang]:+.3f}" if lang in d_mexa else "—", raw=d_mexa.get(lang)))
        rows.append(cells)
        csv_rows.append({"lang": lang, "seen": lang in seen, "base_majority_class": cls,
                         "base_majority_share": b0["majority_share"], "setting_share": share1,
                         "base_answers_one_class": b0.get("answers_one_class"),
                         "setting_answers_one_class": b1.get("answers_one_class"),
                         **{f"d_acc_{s}": d_acc[s][lang] for s in scorings}, "d_mexa": d_mexa.get(lang)})
    t = Table(header, rows, f"Per language: the base model's most predicted class and its share of the "
              f"predictions, that class's share under {label}, the change in accuracy (points) and in MEXA. "
              "⚠: one class takes at least 90% of the predictions on a balanced set.", f"bias_{tag}", csv_rows)
    doc.table(t)
    exported.append(t)

    # Δ MEXA vs Δ accuracy across languages
    corr = {}
    both = [lang for lang in paired if lang in d_mexa]
    if len(both) >= 3:
        crow, ccsv = [], []
        for s in scorings:
            c = correlation([d_mexa[lang] for lang in both], [d_acc[s][lang] for lang in both], n_boot=n_boot,
                            seed=seed)
            corr[s] = c
            crow.append([Cell(s), Cell(f"{c['pearson']:+.2f} [{c['pearson_ci'][0]:+.2f}, {c['pearson_ci'][1]:+.2f}]"),
                         Cell(f"{c['spearman']:+.2f} [{c['spearman_ci'][0]:+.2f}, {c['spearman_ci'][1]:+.2f}]"),
                         Cell(str(c["n_langs"]))])
            ccsv.append({"scoring": s, **{k: v for k, v in c.items() if not k.endswith("_ci")},
                         "pearson_ci_low": c["pearson_ci"][0], "pearson_ci_high": c["pearson_ci"][1],
                         "spearman_ci_low": c["spearman_ci"][0], "spearman_ci_high": c["spearman_ci"][1]})
        t = Table(["Δ accuracy", "Pearson r [95% CI]", "Spearman ρ [95% CI]", "languages"], crow,
                  "Correlation across languages of Δ MEXA with Δ accuracy (bootstrap CI over languages).",
                  f"mexa_corr_{tag}", ccsv)
        doc.table(t)
        exported.append(t)
    elif not d_mexa:
        doc.p("No MEXA for this setting: the run has no geometry step comparing it with the base model "
              "(or its languages lack English).")

    # the sentence
    group = "unseen" if ("raw", "unseen") in deltas and seen else "all"
    where = "on the unseen languages" if group == "unseen" else "over all languages"
    method = next((m for m in METHODS if (m, group) in deltas), None)
    sentence = verdict(deltas[("raw", group)], deltas.get((method, group)) if method else None, method or "",
                       where)
    ones = [lang for lang in paired if bias[lang][0].get("answers_one_class")]
    if ones:
        sentence += (f" The base model answers one class in {len(ones)} of {len(paired)} languages "
                     f"({', '.join(ones)}).")
    sentence += mexa_sentence(corr.get("raw"))
    doc.p(f"**{sentence}**")
    summary.append(f"{task}, {mode} labels, **{label}** — alignment or calibration? {sentence}")
    doc.img(_figure(fig_dir / f"calibration_{tag}.png", list(paired), d_mexa, d_acc,
                    f"{label}: Δ accuracy per language, raw and calibrated"),
            f"Δ accuracy per language, raw and calibrated{', against Δ MEXA' if d_mexa else ''}: {label}")
