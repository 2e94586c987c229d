"""A search's budget read against its log: how many generations it may run, and whether a
finished run has budget left (the loop's resume and `evomerge status` ask the same question)."""

from __future__ import annotations

import math

from evomerge.search.records import FinalRecord, RecordKind


def max_generations(budget, popsize: int | None) -> float:
    """Generations allowed by ``generations`` and ``evaluations`` at a fixed population size
    (rounded up to whole generations; not counted while the population size is unknown); inf for
    a time budget only. An estimate for progress displays: with CMA-ES restarts or a seed
    population the size changes, and ``generations_left`` decides."""
    limits = [math.inf]
    if budget.generations:
        limits.append(budget.generations)
    if budget.evaluations and popsize:
        limits.append(math.ceil(budget.evaluations / popsize))
    return min(limits)


def generations_left(budget, generations: int, asked: int) -> bool:
    """Whether another generation may start after ``generations`` generations of ``asked``
    candidates in all: an evaluations budget counts the candidates the optimizer asked (the last
    generation may overshoot it, so a fixed population runs ceil(evaluations / popsize))."""
    if budget.generations and generations >= budget.generations:
        return False
    return not (budget.evaluations and asked >= budget.evaluations)


def spent_s(records: list) -> float:
    """Search time of the sessions so far, as the last generation or final record counted it."""
    return max((r.elapsed_s for r in records if r.type in (RecordKind.GENERATION, RecordKind.FINAL) and r.elapsed_s is not None),
               default=0.0)


def finished(final: FinalRecord | None, budget, spent: float) -> bool:
    """A final record exists and no budget is left: its generations or candidates reached the
    budget, or its time budget was spent (a final record from before the time was logged counts
    as having spent it)."""
    if final is None:
        return False
    if (budget.generations or budget.evaluations) and not generations_left(budget, final.generations, final.evaluations):
        return True
    limit = budget.time_limit_s
    return limit is not None and (final.elapsed_s is None or spent >= limit)
