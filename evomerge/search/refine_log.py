"""A refined genome (search/refine.py) logged into its run like any candidate.

The refined genome is scored by the run's evaluator through the search's own path
(`search.loop.Search`: the executor, the item store, the cache, the journal): a ``candidate``
record on the items of the run's last generation (so its subset fitness compares with that
generation's candidates), a ``rescore`` on the whole search split and its ``test`` scores
(reported, never decided on). Refined candidates take generation ``REFINED`` (the reference is
-1), index k for the run's k-th refine. When the rescore beats the run's winner by the one
ranking rule (`search.ranking.pick_winner`; a tie keeps the winner), a new ``final`` record names
it and best.yaml is rewritten, so ``export`` and ``materialize`` take it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from evomerge.core.errors import RunFolderError
from evomerge.search import ranking
from evomerge.search.history import RunHistory
from evomerge.search.loop import Search
from evomerge.search.records import EvalRecord, FinalRecord, RecordKind

REFINED = -2  # the generation of refined candidates


@dataclass(frozen=True)
class Logged:
    candidate: EvalRecord  # on the last generation's items
    rescore: EvalRecord  # on the whole search split
    winner: EvalRecord  # the run's winner before (its rescore)
    test: dict  # the refined candidate's test-split scores (reported only)
    final: FinalRecord | None  # the new final record, when the refined candidate won


def winner_of(hist: RunHistory) -> EvalRecord:
    """A finished run's winner: the rescore record its (last) final record names."""
    final = hist.final
    if final is None:
        raise RunFolderError("the run has not finished (no final record): resume it to the end first")
    return next(r for r in reversed(hist.of(RecordKind.RESCORE)) if r.recipe_hash == final.recipe_hash)


class RefineLog(Search):
    """A search session that logs one genome from outside the optimizer."""

    def add(self, evaluators, genome: np.ndarray, note: str) -> Logged:
        hist = RunHistory(self.run.records())
        self._setup(evaluators, hist.records)
        win = winner_of(hist)
        self._open(hist)
        try:
            index = sum(1 for r in hist.of(RecordKind.RESCORE) if r.generation == REFINED)
            last = max((r.generation for r in hist.generations), default=0)
            cand = self._evaluate([self.job(RecordKind.CANDIDATE, REFINED, index, genome, last)])[(REFINED, index)]
            full = self._evaluate([self.job(RecordKind.RESCORE, REFINED, index, genome, None)])[(REFINED, index)]
            test = self._test_metrics(full) if full.ok else {}
            if not full.ok or full.fitness == win.fitness or ranking.pick_winner([win, full]) is win:
                return Logged(cand, full, win, test, None)
            old = hist.final
            self._write_best(np.array(full.genome), f"winner: refined candidate {index} ({note}), "
                             f"full-dev fitness {full.fitness:.4f}")
            final = FinalRecord(generations=old.generations, evaluations=old.evaluations, generation=REFINED,
                                index=index, recipe_hash=full.recipe_hash, fitness=full.fitness,
                                metrics=full.metrics, test_metrics=test, time=time.time(),
                                elapsed_s=old.elapsed_s)
            self._append(final)
            return Logged(cand, full, win, test, final)
        finally:
            self.executor.close()
