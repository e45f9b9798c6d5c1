"""Calibrated scoring: is a gain in accuracy a better reading of the input, or a moved label prior?

Two reference distributions over the classes, scored for every (task, language, label mode) with
the same demos as the test items, through the same Scorer (so they reuse the demos' KV cache and
cost one extra forward of a few short rows per group):

- contextual (Zhao et al. 2021, "Calibrate Before Use"): the test item replaced by content-free
  inputs (the empty string, `N/A`, a mask-like token), each rendered through the task's template in
  the item's language. p_cf is the mean of their class distributions (each normalised over the
  classes first, as the paper's code does); the calibrated score of class c is p(c) / p_cf(c),
  renormalised (the paper's diagonal W with b = 0).
- pmi (domain-conditional PMI, Holtzman et al. 2021): log p(c | item) − log p(c | the answer cue
  alone, after the demos). Stored, like contextual, as the renormalised exp of that difference,
  i.e. p(c) / p(c | cue) renormalised: the same ordering, and both methods on one scale.

Class "probabilities" p(c) are the scoring rule's own numbers: the token-set or first-token
probability (`paper`, `first-token`), or exp of the label's log-likelihood (`sequence`).
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path

from polyalign.engine.prompts import Prompt, common_prefix_len
from polyalign.errors import PolyalignError
from polyalign.store import write_json

CALIBRATIONS = ("none", "contextual", "pmi")
METHODS = CALIBRATIONS[1:]            # what a calibrated run stores (all of them: one shared forward)
CONTENT_FREE = ("", "N/A", "[MASK]")   # Zhao et al.'s content-free inputs
FILE_VERSION = 1


def check_calibration(method: str) -> None:
    if method not in CALIBRATIONS:
        raise PolyalignError(f"unknown calibration {method!r}; use one of {', '.join(CALIBRATIONS)}")


# ----------------------------------------------------------------------------- the reference prompts
def answer_cue(task, lang: str) -> str:
    """The template's text after its last field (e.g. 'Answer: "'), leading whitespace dropped:
    the domain premise of Holtzman et al., which every test prompt ends with."""
    template = task.lang(lang).template
    tail = list(string.Formatter().parse(template))[-1]
    text = tail[0] if tail[1] is None else ""
    return text.lstrip() or task.cue


def reference_texts(task, lang: str, prefix_text: str) -> dict[str, list[str]]:
    """The prompts (demos included) whose class distributions calibrate the items of one group."""
    fields = task.fields
    contextual = [prefix_text + task.query(lang, {f: cf for f in fields}) for cf in CONTENT_FREE]
    return {"contextual": contextual, "pmi": [prefix_text + answer_cue(task, lang)]}


def _prompts(tokenizer, texts: list[str], prefix_ids: list[int]) -> list[Prompt]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = []
    for i, (text, row) in enumerate(zip(texts, ids)):
        q = common_prefix_len(row, prefix_ids)
        out.append(Prompt(i, {}, text, row, min(q, len(row) - 1), q, False))
    return out


def class_distribution(scores: list[float], rule: str) -> list[float]:
    """The rule's scores as a distribution over the classes (sequence: softmax of log-likelihoods)."""
    if rule == "sequence":
        top = max(scores)
        w = [math.exp(s - top) for s in scores]
    else:
        w = [max(float(s), 0.0) for s in scores]
    total = sum(w)
    if not total > 0:
        return [1.0 / len(scores)] * len(scores)
    return [x / total for x in w]


def reference_distributions(scorer, group) -> dict:
    """{method: p_ref over the classes, "texts": {method: [prompts]}} for one group, computed
    through `scorer` with the group's demos (their KV cache is the items' cache)."""
    from polyalign.evaluation.scoring import Group

    texts = reference_texts(group.task, group.lang, _prefix_text(scorer, group))
    flat = [t for m in METHODS for t in texts[m]]
    refs = Group(group.task, group.lang, group.mode, group.plan, group.prefix_ids,
                 _prompts(scorer.tokenizer, flat, group.prefix_ids))
    scored = scorer.score(refs, list(range(len(flat))))   # one batch: a handful of short rows
    out, at = {"texts": texts, "rule": scorer.rule, "classes": list(group.task.classes)}, 0
    for m in METHODS:
        dists = [class_distribution(s["scores"], scorer.rule) for s in scored[at:at + len(texts[m])]]
        out[m] = [sum(col) / len(dists) for col in zip(*dists)]
        out[f"{m}_scores"] = [s["scores"] for s in scored[at:at + len(texts[m])]]
        at += len(texts[m])
    return out


def _prefix_text(scorer, group) -> str:
    return group.task.demo_prefix(group.lang, group.mode)


def reference_path(output: Path, task: str, mode: str, lang: str) -> Path:
    return output / "calibration" / task / mode / f"{lang}.json"


def load_or_compute(scorer, group, output: Path | None, write: bool) -> dict:
    """The group's reference distributions: the saved ones where this folder has them for the same
    prompts and rule (a resumed run then calibrates its remaining items with the same numbers), else
    computed (and saved by the writing process; with no output folder, only computed)."""
    if output is None:
        return {"version": FILE_VERSION, **reference_distributions(scorer, group)}
    path = reference_path(output, group.task.name, group.mode, group.lang)
    want = reference_texts(group.task, group.lang, _prefix_text(scorer, group))
    if path.exists():
        try:
            saved = json.loads(path.read_text("utf-8"))
            if saved.get("version") == FILE_VERSION and saved.get("texts") == want and saved.get("rule") == scorer.rule:
                return saved
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    refs = {"version": FILE_VERSION, **reference_distributions(scorer, group)}
    if write:
        write_json(path, refs)
    return refs


def group_references(refs: dict | None, output: Path | None, task: str, mode: str, lang: str) -> dict | None:
    """{method: reference distribution} of one group for its results.json row: this run's, or the
    ones the folder saved when the group was scored earlier."""
    if refs is None and output is not None:
        path = reference_path(output, task, mode, lang)
        try:
            refs = json.loads(path.read_text("utf-8")) if path.exists() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            refs = None
    return {m: refs[m] for m in METHODS} if refs else None


# ----------------------------------------------------------------------------- calibrated scores
def calibrate(scores: list[float], reference: list[float], rule: str) -> list[float]:
    """p(c) / p_ref(c), renormalised over the classes; computed in log space so that a `sequence`
    log-likelihood of -900 does not underflow. A zero reference probability is floored at the
    smallest positive double (its class then wins unless the item gives it zero too)."""
    if rule == "sequence":
        logp = [float(s) for s in scores]
    else:
        logp = [math.log(s) if s > 0 else -math.inf for s in scores]
    logr = [math.log(max(r, 2.2250738585072014e-308)) for r in reference]
    z = [a - b for a, b in zip(logp, logr)]
    top = max(z)
    if top == -math.inf:
        return [1.0 / len(z)] * len(z)
    w = [math.exp(x - top) for x in z]
    total = sum(w)
    return [x / total for x in w]


def calibrated_fields(scores: list[float], refs: dict, classes: list[str], rule: str, where: str) -> dict:
    """A sample line's calibrated scores and predictions, every method."""
    from polyalign.evaluation.scoring import decide

    calibrated = {m: calibrate(scores, refs[m], rule) for m in METHODS}
    return {"calibrated": calibrated,
            "pred_calibrated": {m: classes[decide(v, f"{where} ({m})")[0]] for m, v in calibrated.items()}}


def accuracy_calibrated(samples: list[dict]) -> dict | None:
    """{method: accuracy} over samples that carry calibrated predictions (None where none do)."""
    have = [s for s in samples if "pred_calibrated" in s]
    if not have or len(have) != len(samples):
        return None
    return {m: sum(s["pred_calibrated"][m] == s["gold"] for s in have) / len(have) for m in METHODS}
