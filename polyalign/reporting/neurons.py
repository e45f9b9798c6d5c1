"""The report's "Language neurons" section: what the experiment's `neurons` steps found.

Per step (one per model): language-specific neurons per layer (all languages together), per
language the base model's and each setting's counts with the Jaccard overlap of the two sets, the
deactivation matrices (language neurons zeroed, and the random control) when the step ran them,
the step's figures, and per setting one sentence, written by the rules below from those numbers, on
whether alignment changed the neurons of the languages the setting saw in training and of the others.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from polyalign.reporting.report import DAGGER, Cell, Doc, Table, _slug

# A group's neurons count as "largely unchanged" when their mean Jaccard (base vs trained) is at
# least STABLE; seen and unseen languages changed "alike" when their means differ by less than MARGIN.
STABLE = 0.8
MARGIN = 0.1
# Deactivation: an effect is "clearer than the random control" when it is at least EFFECT points lower.
EFFECT = 1.0


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _num(text) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def neurons_section(doc: Doc, run: Path, steps: list[dict], settings: dict[str, dict], exported: list[Table]) -> None:
    """Append the section for the finished `neurons` steps (nothing without one)."""
    if not steps:
        return
    doc.h(2, "Language neurons")
    doc.p("Language-specific FFN neurons (LAPE, Tang et al. 2024): for each neuron, the share of a language's "
          "tokens on which its activation is positive; the neurons with the lowest entropy of those shares "
          "across languages are assigned to the languages where they fire most. Overlap is the Jaccard index "
          f"of a language's neuron set in the base model and in the trained one. {DAGGER} marks the languages "
          "a setting saw in training.")
    for s in steps:
        folder = run / s["dir"]
        try:
            summary = json.loads((folder / "summary.json").read_text("utf-8"))
        except (OSError, ValueError):
            continue
        langs, models = summary.get("langs", []), list(summary.get("models", {}))
        name = _slug(s.get("model") or "", "neurons")
        t = _layer_table(_rows(folder / "counts.csv"), models, s["label"], name)
        if t:
            doc.table(t)
            exported.append(t)
        compare = summary.get("compare") or {}
        t = _language_table(summary, langs, models, compare, settings, s["label"], name)
        doc.table(t)
        exported.append(t)
        sentences = [setting_sentence(label, c, langs, (settings.get(label) or {}).get("seen"))
                     for label, c in compare.items()]
        deact = summary.get("deactivation")
        if deact:
            for kind, what in (("change", "language neurons zeroed"), ("random_change", "random control")):
                if deact.get(kind):
                    t = _deactivation_table(deact, kind, f"{s['label']}: accuracy change (points) with the "
                                            f"{what}, deactivated (rows) × evaluated (columns)", f"{name}_{kind}")
                    doc.table(t)
                    exported.append(t)
            sentences.append(deactivation_sentence(deact))
        if sentences:
            doc.ul(sentences)
        for png in sorted(folder.glob("*.png")):
            doc.img(png, f"{s['label']}: {png.stem.replace('_', ' ')}")


def _layer_table(rows: list[dict], models: list[str], label: str, name: str) -> Table | None:
    per: dict[int, dict[str, int]] = {}
    for r in rows:
        layer = int(r["layer"])
        per.setdefault(layer, {}).setdefault(r["model"], 0)
        per[layer][r["model"]] += int(r["neurons"])
    if not per:
        return None
    body = [[Cell(str(layer))] + [Cell(str(per[layer].get(m, 0)), raw=per[layer].get(m, 0)) for m in models]
            for layer in sorted(per)]
    return Table(["layer", *models], body, f"{label}: language-specific neurons per layer (all languages).",
                 f"{name}_layers")


def _language_table(summary: dict, langs: list[str], models: list[str], compare: dict, settings: dict,
                    label: str, name: str) -> Table:
    base = models[0] if models else "base"
    header = ["lang", base]
    for m in compare:
        header += [m, f"overlap {m}"]
    by = {m: {r["lang"]: r for r in c.get("languages", [])} for m, c in compare.items()}
    body = []
    for lang in langs:
        row = [Cell(lang), Cell(str(summary["models"][base]["per_language"].get(lang, 0)))]
        for m in compare:
            r = by[m].get(lang, {})
            seen = (settings.get(m) or {}).get("seen") or []
            j = r.get("jaccard")
            row += [Cell(str(r.get("trained", "—")), mark=DAGGER if lang in seen else "", raw=r.get("trained")),
                    Cell("—" if j is None or (isinstance(j, float) and math.isnan(j)) else f"{j:.2f}", raw=j)]
        body.append(row)
    return Table(header, body, f"{label}: language-specific neurons per language, and the overlap (Jaccard) of "
                 "each language's set in the base and the trained model.", f"{name}_languages")


def _deactivation_table(d: dict, kind: str, caption: str, name: str) -> Table:
    cols = d["eval_langs"]
    body = [[Cell(lang)] + [Cell(f"{100 * d[kind][lang][e]:+.1f}", raw=d[kind][lang][e]) for e in cols]
            for lang in d["deactivated"]]
    return Table(["zeroed", *cols], body, caption, name)


def setting_sentence(setting: str, compare: dict, langs: list[str], seen: list[str] | None) -> str:
    """One sentence, by the rules at the top of this module, on whether alignment with `setting`
    changed the neurons of the languages it saw and of the others."""
    rows = {r["lang"]: r for r in compare.get("languages", [])}
    if seen is None:
        return f"{setting}: which languages it saw is unknown, so seen and unseen languages are not compared."
    groups = {}
    for group, members in (("seen", [lang for lang in langs if lang in seen]),
                           ("unseen", [lang for lang in langs if lang not in seen])):
        if members:
            groups[group] = (members, _mean(_num(rows.get(lang, {}).get("jaccard")) for lang in members),
                             _mean(_num(rows[lang]["trained"]) - _num(rows[lang]["base"])
                                   for lang in members if lang in rows))

    def part(group: str) -> str:
        members, j, change = groups[group]
        if j is None:
            return f"the {group} languages ({', '.join(members)}) have no language-specific neurons in either model"
        return (f"the {group} languages ({', '.join(members)}) share {j:.2f} of their neurons between base and "
                f"trained (Jaccard; {change:+.1f} neurons per language)")

    text = f"{setting}: " + "; ".join(part(g) for g in groups)
    if set(groups) != {"seen", "unseen"}:
        missing = "unseen" if "seen" in groups else "seen"
        return text + f"; no {missing} language was analysed to compare with."
    if groups["seen"][1] is None or groups["unseen"][1] is None:
        return text + "; so the seen and unseen languages cannot be compared."
    js, ju = groups["seen"][1], groups["unseen"][1]
    if js >= STABLE and ju >= STABLE:
        verdict = "alignment left the language-specific neurons of both largely unchanged"
    elif js + MARGIN <= ju:
        verdict = "alignment changed the seen languages' neurons more than the unseen ones'"
    elif ju + MARGIN <= js:
        verdict = "alignment changed the unseen languages' neurons more than the seen ones'"
    else:
        verdict = "alignment changed the seen and the unseen languages' neurons alike"
    return f"{text}: {verdict}."


def deactivation_sentence(d: dict) -> str:
    """Zeroing a language's neurons: its own accuracy, the other languages', and the random control."""
    own = _mean(d["change"][lang][lang] for lang in d["deactivated"] if lang in d["eval_langs"])
    other = _mean(d["change"][lang][e] for lang in d["deactivated"] for e in d["eval_langs"] if e != lang)
    control = _mean(d["random_change"][lang][lang] for lang in d["deactivated"] if lang in d["eval_langs"]) \
        if d.get("random_change") else None
    if own is None:
        return "Deactivation: no deactivated language was also evaluated."
    text = f"Deactivation: zeroing a language's neurons changed its own accuracy by {100 * own:+.1f} points on average"
    if other is not None:
        text += f" (the other languages': {100 * other:+.1f})"
    if control is None:
        return text + "."
    text += f"; zeroing as many random neurons changed it by {100 * control:+.1f}"
    clearer = own * 100 <= control * 100 - EFFECT
    return text + (": the language neurons matter more to their language than random ones." if clearer
                   else f": no effect {EFFECT:.0f} point or more beyond the random control.")
