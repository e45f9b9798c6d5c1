"""Few-shot prompts tokenized for the prefix cache, shared by evaluate, lens and geometry.

Every prompt of one (task, language, label mode) starts with the same demos. A prompt's
`cached_len` leading tokens are served by the demos' KV cache (usually all of the demos; one token
less where the tokenizer merges across the boundary) and its `suffix` runs per item. A prompt longer
than the budget is cut inside the test item's longest field, never in the demos or the answer cue.
"""
from __future__ import annotations

from dataclasses import dataclass

from polyalign.errors import PolyalignError
from polyalign.tasks import Task


@dataclass
class Prompt:
    index: int
    item: dict
    text: str
    ids: list[int]
    cached_len: int       # leading tokens served by the demos' KV cache
    query_start: int      # first token of the test item (the demos end before it)
    truncated: bool

    @property
    def suffix(self) -> list[int]:
        return self.ids[self.cached_len:]


@dataclass
class PromptSet:
    task: Task
    lang: str
    mode: str
    prefix_text: str
    prefix_ids: list[int]
    prompts: list[Prompt]


def check_lengths(batch_tokens: int | None, max_length: int | None) -> None:
    """--batch-tokens and --max-length are token counts: unset (None) or positive, never silently 0."""
    for flag, value in (("--batch-tokens", batch_tokens), ("--max-length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise PolyalignError(f"{flag} must be a positive number of tokens, got {value!r}")


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prepare_prompts(tokenizer, task: Task, lang: str, mode: str, items: list[dict], budget: int) -> PromptSet:
    """Tokenize the prompts as a model sees them (special tokens on), fitting each into `budget` tokens."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=True)["input_ids"]  # noqa: E731
    prefix_text = task.demo_prefix(lang, mode)
    prefix_ids = encode([prefix_text])[0]
    if len(prefix_ids) + 1 > budget:
        raise PolyalignError(f"{task.name}/{lang}: the few-shot demos alone take {len(prefix_ids)} tokens; "
                             f"the context holds {budget}")
    texts = [prefix_text + task.query(lang, it) for it in items]
    prompts = []
    for i, (it, text, ids) in enumerate(zip(items, texts, encode(texts) if texts else [])):
        truncated = len(ids) > budget
        if truncated:
            it, text, ids = _fit(tokenizer, task, lang, it, prefix_text, budget, encode)
        q = common_prefix_len(ids, prefix_ids)
        prompts.append(Prompt(i, it, text, ids, min(q, len(ids) - 1), q, truncated))
    return PromptSet(task, lang, mode, prefix_text, prefix_ids, prompts)


def _fit(tokenizer, task: Task, lang: str, item: dict, prefix_text: str, budget: int, encode):
    """Shorten the longest field of the test item until the prompt fits."""
    item = dict(item)
    for _ in range(50):
        text = prefix_text + task.query(lang, item)
        ids = encode([text])[0]
        excess = len(ids) - budget
        if excess <= 0:
            return item, text, ids
        toks = {f: tokenizer(item[f], add_special_tokens=False)["input_ids"] for f in task.fields}
        f = max(task.fields, key=lambda k: len(toks[k]))
        if not toks[f]:
            break
        item[f] = tokenizer.decode(toks[f][: max(0, len(toks[f]) - excess - 1)])
    raise PolyalignError(f"{task.name}/{lang}: cannot fit item {item.get('id')} into {budget} tokens")


def by_cache(prompts: list[Prompt], batch: list[int]) -> list[list[Prompt]]:
    """Split one batch (indices into `prompts`) by cached length: each part shares one prefix cache."""
    parts: dict[int, list[Prompt]] = {}
    for i in batch:
        parts.setdefault(prompts[i].cached_len, []).append(prompts[i])
    return list(parts.values())


def batch_groups(runner, prompts: list[Prompt]):
    """The runner's length-sorted batches over `prompts`, each split by cached length."""
    for batch in runner.batches([len(p.suffix) for p in prompts]):
        yield from by_cache(prompts, batch)
