"""Constrained decoding: score each class of an item under one of three rules.

- paper:       one softmax at the answer position; a class scores the summed probability of its
               label's token set (see labels.paper_token_set), as the paper's release does.
- first-token: the probability of the label's first token.
- sequence:    the label's full log-likelihood (summed; per UTF-8 byte as a second score), as
               lm-evaluation-harness does.
When all labels share leading tokens, they are appended to the prompt and the labels are told
apart at the first differing position (labels.LabelPlan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polyalign.errors import PolyalignError
from polyalign.labels import LabelPlan, label_plan
from polyalign.engine.prompts import Prompt, by_cache, prepare_prompts
from polyalign.engine.runner import PrefixRunner
from polyalign.engine.model_parts import max_context, unembed
from polyalign.tasks import Task

RULES = ("paper", "first-token", "sequence")


@dataclass
class Group:
    """Everything needed to score one (task, language, label mode)."""
    task: Task
    lang: str
    mode: str
    plan: LabelPlan
    prefix_ids: list[int]
    items: list[Prompt]


class Scorer:
    def __init__(self, model, tokenizer, rule: str = "paper", token_budget: int | None = None,
                 max_length: int | None = None):
        if rule not in RULES:
            raise PolyalignError(f"unknown scoring rule {rule!r}; use one of {', '.join(RULES)}")
        self.model, self.tokenizer, self.rule = model, tokenizer, rule
        self.runner = PrefixRunner(model, tokenizer, token_budget)
        self.max_length = min(max_length or 1 << 30, max_context(model, tokenizer))

    def prepare(self, task: Task, lang: str, mode: str, items: list[dict]) -> Group:
        words = task.label_words(lang, mode)
        plan = label_plan(self.tokenizer, task.classes, [words[c] for c in task.classes])
        # Room for the shared label tokens (and, for `sequence`, the longest label) after the prompt.
        extra = len(plan.common) + (max(len(c) for c in plan.cont) if self.rule == "sequence" else 0)
        ps = prepare_prompts(self.tokenizer, task, lang, mode, items, self.max_length - extra)
        return Group(task, lang, mode, plan, ps.prefix_ids, ps.prompts)

    # ------------------------------------------------------------------ scoring
    def rows(self, group: Group, p: Prompt) -> list[list[int]]:
        """Token rows that one item needs after the cache: one, or one per class for `sequence`."""
        if self.rule == "sequence":
            return [p.suffix + c for c in group.plan.cont]
        return [p.suffix + group.plan.common]

    def batches(self, group: Group) -> list[list[int]]:
        k = len(group.plan.classes) if self.rule == "sequence" else 1
        lengths = [max(len(r) for r in self.rows(group, p)) * k for p in group.items]
        return self.runner.batches(lengths)

    @torch.inference_mode()
    def score(self, group: Group, batch: list[int], states=None) -> list[dict]:
        """Scores for the items at `batch` indices: [{"scores": [...], "scores_per_byte"?: [...]}].
        `states` (a geometry.StatesCollector): also pool the hidden states of the items it wants from
        these forwards. Causal attention keeps an item's suffix positions unchanged by the label
        tokens appended after them, so they are the states of the prompt alone."""
        plan, out = group.plan, []
        results: dict[int, dict] = {}
        for part in by_cache(group.items, batch):
            idx = [p.index for p in part]
            pool = states is not None and states.wants(part)
            # The demos' states come from the prefix forward (the KV cache is the same either way):
            # asked for in every batch of a pooled group, so that the group's prefix runs once.
            prefix = self.runner.prefix(group.prefix_ids[:part[0].cached_len],
                                        hidden_states=states is not None and states.pooler.prefix_states)
            rows, spans = [], []
            for p in part:
                r = self.rows(group, p)
                spans.append((len(rows), len(r)))
                rows.extend(r)
            hidden, layers = self.runner.forward(prefix, rows, hidden_states=pool)
            if pool:
                states.add(prefix, layers, part, [start for start, _ in spans])
            if self.rule == "sequence":
                per_row = self._sequence(group, idx, rows, hidden)
                nbytes = [len(w.encode("utf-8")) for w in plan.words]
                for (start, n), i in zip(spans, idx):
                    ll = per_row[start:start + n]
                    results[i] = {"scores": ll, "scores_per_byte": [x / b for x, b in zip(ll, nbytes)]}
            else:
                last = torch.tensor([len(r) - 1 for r in rows], device=hidden.device)
                h = hidden[torch.arange(len(rows), device=hidden.device), last]
                probs = torch.softmax(unembed(self.model, h), dim=-1)
                for row, i in enumerate(idx):
                    if self.rule == "paper":
                        s = [float(probs[row, ids].sum()) for ids in plan.sets]
                    else:
                        s = [float(probs[row, t]) for t in plan.first]
                    results[i] = {"scores": s}
        for i in batch:
            out.append(results[i])
        return out

    def _sequence(self, group: Group, idx: list[int], rows: list[list[int]], hidden) -> list[float]:
        positions, targets, owner = [], [], []
        k = len(group.plan.classes)
        for r, row in enumerate(rows):
            item = group.items[idx[r // k]]
            cont = group.plan.cont[r % k]
            start = len(item.suffix) - 1
            for t, tok in enumerate(cont):
                positions.append((r, start + t))
                targets.append(tok)
                owner.append(r)
        rr = torch.tensor([p[0] for p in positions], device=hidden.device)
        cc = torch.tensor([p[1] for p in positions], device=hidden.device)
        logp = torch.log_softmax(unembed(self.model, hidden[rr, cc]), dim=-1)
        tok_ll = logp[torch.arange(len(targets), device=hidden.device), torch.tensor(targets, device=hidden.device)]
        sums = [0.0] * len(rows)
        for o, v in zip(owner, tok_ll.tolist()):
            sums[o] += v
        return sums


def decide(scores: list[float], where: str = "an item") -> tuple[int, bool]:
    """Argmax with ties broken towards the first class (deterministic); returns (index, tied).
    A NaN score (the model's numbers overflowed) is refused: it would make any class the prediction."""
    if any(math.isnan(s) for s in scores):
        raise PolyalignError(f"{where}: the model gave a NaN score ({scores}); its numbers overflowed in this "
                             "dtype; try --dtype fp32 or bf16")
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return winners[0], len(winners) > 1


@torch.inference_mode()
def naive_scores(model, tokenizer, plan: LabelPlan, prompt: str, rule: str) -> list[float]:
    """Reference: one full forward per prompt (per label for `sequence`), full logits, no cache."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    dev = next(model.parameters()).device
    if rule == "sequence":
        out = []
        for cont in plan.cont:
            full = torch.tensor([ids + cont], device=dev)
            logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
            out.append(sum(float(logp[len(ids) - 1 + t, tok]) for t, tok in enumerate(cont)))
        return out
    full = torch.tensor([ids + plan.common], device=dev)
    probs = torch.softmax(model(input_ids=full).logits[0, -1].float(), dim=-1)
    if rule == "paper":
        return [float(probs[s].sum()) for s in plan.sets]
    return [float(probs[t]) for t in plan.first]
