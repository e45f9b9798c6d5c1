"""PrefixRunner's batch planner: a valid cover of the items, and the cheapest cut (checked by brute force)."""
import itertools
import random

import pytest

from polyalign.runner import PrefixRunner


def planner(budget, forward_cost):
    r = PrefixRunner.__new__(PrefixRunner)       # the planner needs no model
    r.token_budget, r.forward_cost = budget, forward_cost
    return r


def cost(batches, lengths, forward_cost):
    return sum(forward_cost + len(b) * max(lengths[i] for i in b) for b in batches)


def brute_force(lengths, budget, forward_cost):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=len(order) - 1):
        batches, cur = [], [order[0]]
        for c, i in zip(cuts, order[1:]):
            if c:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        if all(len(b) == 1 or len(b) * lengths[b[0]] <= budget for b in batches):
            best = min(best, cost(batches, lengths, forward_cost))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_batches_are_the_cheapest_valid_cut(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 11))]
    budget, fc = rng.choice([40, 100, 400]), rng.choice([0, 8, 64])
    batches = planner(budget, fc).batches(lengths)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))                      # every item once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)    # longest first
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    assert cost(batches, lengths, fc) == brute_force(lengths, budget, fc)


def test_batches_less_padding_than_filling_to_the_budget():
    lengths = [300, 280, 250, 120, 110, 100, 90, 40, 35, 30, 25, 20]
    batches = planner(2048, 64).batches(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    greedy = 6 * 300 + 6 * 90            # fill each batch up to 2048 tokens, longest first
    assert padded - sum(lengths) < (greedy - sum(lengths)) / 3
