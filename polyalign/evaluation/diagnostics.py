"""Label-bias diagnostics of one (task, language, label mode, model): does it answer one class?

On a balanced test set a model that always answers one class scores exactly 1/k, whatever it
understood; a change in its label prior alone then changes the accuracy. These numbers show it:
the share of predictions per class, the entropy of that distribution in bits, the mean margin (top
minus runner-up class probability, the rule's scores normalised over the classes) and a flag when
one class takes at least ONE_CLASS_SHARE of the predictions on a balanced set.
"""
from __future__ import annotations

import math
from collections import Counter

from polyalign.evaluation.calibration import METHODS, class_distribution

ONE_CLASS_SHARE = 0.9


def _classes(samples: list[dict]) -> list[str]:
    """The classes seen in gold labels or predictions (raw or calibrated), in order of first appearance."""
    seen = dict.fromkeys(s["gold"] for s in samples)
    for s in samples:
        for pred in [s["pred"], *s.get("pred_calibrated", {}).values()]:
            seen.setdefault(pred, None)
    return list(seen)


def is_balanced(golds: list[str], classes: list[str]) -> bool:
    counts = Counter(golds)
    per = [counts.get(c, 0) for c in classes]
    return len([c for c in per if c]) >= 2 and max(per) - min(per) <= 1


def bias(preds: list[str], golds: list[str], distributions: list[list[float]], classes: list[str]) -> dict:
    """Shares per class, entropy (bits), mean margin, majority class and the one-class flag."""
    n = len(preds)
    counts = Counter(preds)
    shares = {c: counts.get(c, 0) / n for c in classes} if n else {c: float("nan") for c in classes}
    entropy = -sum(p * math.log2(p) for p in shares.values() if p > 0) if n else float("nan")
    margins = [sorted(d, reverse=True)[0] - sorted(d, reverse=True)[1] for d in distributions if len(d) > 1]
    majority = max(classes, key=lambda c: (shares[c], -classes.index(c))) if n else None
    balanced = is_balanced(golds, classes)
    return {"shares": shares, "majority_class": majority, "majority_share": shares[majority] if n else float("nan"),
            "entropy_bits": entropy, "mean_margin": sum(margins) / len(margins) if margins else float("nan"),
            "balanced": balanced,
            # Only meaningful on a balanced set: on a skewed one, answering the majority is no bias.
            "answers_one_class": (shares[majority] >= ONE_CLASS_SHARE) if balanced and n else None}


def summary_fields(samples: list[dict], rule: str) -> dict:
    """The fields a results.json row gains: `bias` (raw scores) and, for a calibrated run,
    `bias_calibrated` per method."""
    classes = _classes(samples)
    golds = [s["gold"] for s in samples]
    out = {"bias": bias([s["pred"] for s in samples], golds,
                        [class_distribution(s["scores"], rule) for s in samples if s.get("scores")], classes)}
    if samples and all("calibrated" in s for s in samples):
        out["bias_calibrated"] = {m: bias([s["pred_calibrated"][m] for s in samples], golds,
                                          [s["calibrated"][m] for s in samples], classes) for m in METHODS}
    return out
