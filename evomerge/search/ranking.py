"""How candidates rank: one rule for the best so far, the top-k to re-score, the winner and export.

A candidate's standing is its score at the deepest racing stage it reached (more items outrank
fewer; without racing every candidate is at stage 0), then that score; ties go to the earlier
candidate. Re-scored candidates (the full dev split) rank by that score above every other; the
winner is the best of them.
"""

from __future__ import annotations

from collections.abc import Iterable

from evomerge.search.records import EvalRecord, RecordKind


def standing(r: EvalRecord) -> tuple[float, float, int, int]:
    """Sort key, best first: deeper stage, higher score, earlier generation, lower index."""
    return (-r.depth, -r.fitness, r.generation, r.index)


def better(a: EvalRecord, b: EvalRecord) -> bool:
    """Whether ``a`` outranks ``b``: a successful candidate outranks a failed one (whatever its
    penalty fitness), then the standing decides."""
    if a.ok != b.ok:
        return a.ok
    return standing(a) < standing(b)


def best_of(records: Iterable[EvalRecord]) -> EvalRecord:
    """The best successful candidate (any candidate when all failed: each has the penalty)."""
    best = None
    for r in records:
        if best is None or better(r, best):
            best = r
    if best is None:
        raise ValueError("best_of: no candidate")
    return best


def top_candidates(records: Iterable[EvalRecord], k: int) -> list[EvalRecord]:
    """The ``k`` best distinct successful recipes, each by its best record."""
    ranked, seen = [], set()
    for r in sorted(records, key=standing):
        if r.ok and r.recipe_hash not in seen:
            seen.add(r.recipe_hash)
            ranked.append(r)
    return ranked[:k]


def pick_winner(rescored: Iterable[EvalRecord]) -> EvalRecord:
    """The best full-dev score; ties go to the earlier candidate."""
    return min(rescored, key=lambda r: (-r.fitness, r.generation, r.index))


def ranked_candidates(records: Iterable, winner_hash: str | None = None) -> list[EvalRecord]:
    """Distinct successful recipes, best first: those re-scored on the full dev split (the winner
    first, then by that score), then the others by their standing. ``records`` may hold any
    record types; only candidate and rescore records are read."""
    records = list(records)
    rescored = {r.recipe_hash: r for r in records if r.type == RecordKind.RESCORE and r.ok}
    top = sorted(rescored.values(), key=lambda r: (r.recipe_hash != winner_hash, -r.fitness, r.generation,
                                                   r.index))
    rest = [r for r in top_candidates((r for r in records if r.type == RecordKind.CANDIDATE), len(records))
            if r.recipe_hash not in rescored]
    return top + rest
