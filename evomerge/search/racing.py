"""Racing: successive halving within one generation (config section ``racing``).

Every candidate of a generation is scored on stage 0's items; the better ``keep`` fraction
(rounded up, at least one; failed candidates are never promoted; ties go to the lower index) is
scored on stage 1's items, and so on; the survivors of the last stage get its items (usually the
whole dev split). A stage's items are the first ``n_k`` of one seeded permutation per (seed,
generation, task) (``FitnessFunction.stage_samples``), so a later stage's items contain the earlier
ones and the items already scored are reused (evomerge/items.py): stage k costs only its new items.

The optimizer is told one value per candidate (``told_values``), rank-preserving across stages:
a candidate that reached the last stage is told its last-stage score; the candidates eliminated at
stage k are told their stage-k scores, all lowered by one common amount (the least that puts the
best of them ``MARGIN`` below every candidate that went further, zero when they already are).
Elimination and the told order therefore agree: everyone who went further ranks higher, and among
the candidates eliminated at one stage the order of their scores is kept. Rank-based optimizers
(CMA-ES) see exactly the race's ranking.
"""

from __future__ import annotations

import math

MARGIN = 1e-6


def n_keep(n: int, keep: float) -> int:
    """How many of ``n`` candidates a stage promotes."""
    return max(1, math.ceil(keep * n - 1e-9))


def promote(results: dict[int, tuple[str, float]], keep: float) -> list[int]:
    """The indices promoted from one stage: ``results`` maps candidate index -> (status, stage
    score). The best ``n_keep`` successful ones; ties broken by the lower index."""
    ok = sorted(((i, f) for i, (status, f) in results.items() if status == "ok"), key=lambda t: (-t[1], t[0]))
    return sorted(i for i, _ in ok[: n_keep(len(results), keep)])


def told_values(reached: dict[int, int], last_score: dict[int, float], n_stages: int) -> dict[int, float]:
    """The value told to the optimizer per candidate: ``reached`` is the last stage a candidate
    was scored on, ``last_score`` its score there (see the module docstring)."""
    told: dict[int, float] = {}
    floor = math.inf  # the lowest value told to a candidate that went further
    for k in reversed(range(n_stages)):
        at_k = sorted(i for i, s in reached.items() if s == k)
        if not at_k:
            continue
        top = max(last_score[i] for i in at_k)
        shift = max(0.0, top - floor + MARGIN) if math.isfinite(floor) else 0.0
        for i in at_k:
            told[i] = last_score[i] - shift
        floor = min(floor, *(told[i] for i in at_k))
    return told


def stage_cost(popsize: int, stages: list[int], keep: float) -> int:
    """Items per task scored in one generation (with reuse, no repeated recipes)."""
    alive, done, total = popsize, 0, 0
    for n in stages:
        total += alive * (n - done)
        done = n
        alive = n_keep(alive, keep)
    return total
