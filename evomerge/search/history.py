"""A run's history: the typed records of its log, with the views every reader needs.

Like Optuna's ``study.trials`` / ``best_trial``: the records in log order, by kind
(`records.RecordKind`), the reference, the final record, the candidates and the best candidate
so far by the one ranking rule (search/ranking.py). It grows record by record (``add``), so a
reader that follows a live log (runs.RunFolder reads from a byte offset) never parses a line twice,
and the loop, `evomerge status`, export, the progress display and the mirrors all read one view.
"""

from __future__ import annotations

from collections.abc import Iterable

from evomerge.search import ranking
from evomerge.search.records import EvalRecord, FinalRecord, Record, RecordKind


class RunHistory:
    def __init__(self, records: Iterable[Record] = ()):
        self.records: list[Record] = []
        self._by_kind: dict[RecordKind, list[Record]] = {k: [] for k in RecordKind}
        self.reference: EvalRecord | None = None  # the first one (a log holds one)
        self.final: FinalRecord | None = None  # the last one (a raised budget adds another)
        self.best: EvalRecord | None = None  # the best candidate so far (ranking.better)
        self.extend(records)

    def add(self, r: Record) -> None:
        kind = RecordKind(r.type)
        self.records.append(r)
        self._by_kind[kind].append(r)
        if kind is RecordKind.REFERENCE and self.reference is None:
            self.reference = r
        elif kind is RecordKind.FINAL:
            self.final = r
        elif kind is RecordKind.CANDIDATE and (self.best is None or ranking.better(r, self.best)):
            self.best = r

    def extend(self, records: Iterable[Record]) -> None:
        for r in records:
            self.add(r)

    def __len__(self) -> int:
        return len(self.records)

    def of(self, *kinds: RecordKind) -> list[Record]:
        """The records of these kinds, in log order."""
        if len(kinds) == 1:
            return list(self._by_kind[kinds[0]])
        return [r for r in self.records if r.type in kinds]

    @property
    def candidates(self) -> list[EvalRecord]:
        """Candidate records (with racing: one per stage reached), in log order."""
        return self._by_kind[RecordKind.CANDIDATE]

    @property
    def generations(self) -> list:
        return self._by_kind[RecordKind.GENERATION]

    def evaluations(self) -> list[EvalRecord]:
        """Every scored recipe: the reference, the candidates and the re-scores."""
        return [r for r in self.records if RecordKind(r.type).evaluation]

    def search_items(self, but: RecordKind | None = None) -> int:
        """Items scored by the search's own evaluations (RecordKind.search_items); ``but``: leaving
        that kind's out (the steady engine adds its candidates' as it tells them)."""
        return sum(sum((getattr(r, "items_scored", None) or {}).values()) for r in self.records
                   if RecordKind(r.type).search_items and r.type != but)
