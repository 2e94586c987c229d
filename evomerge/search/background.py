"""Background work of a search: evaluations that do not change its decisions.

After each generation (``plan``), the top ``rescore_top_k`` distinct recipes so far (by subset
fitness) are queued for re-scoring on the full dev split (``rescore`` records, the same ones the
final re-scoring needs), and once those are in, the recipe that would win if the search stopped
now is queued for its test-split scores (a ``test`` record). The queue is a function of the
history alone, so the set of background records is too; only *when* they run depends on the
executor (in slots that the generation barrier leaves idle, or at a barrier), which is why
``run.history`` sorts these record types into their own section.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from evomerge.evaluation.trial import TrialResult
from evomerge.search.jobs import EvalJob

if TYPE_CHECKING:
    from evomerge.search.loop import Search

TEST_KEY = "test-split"


def top_candidates(records, k: int, rank=None) -> list[dict]:
    """The k best distinct recipes among candidate records (failed ones excluded), by ``rank(record)``
    (default: the fitness)."""
    rank = rank or (lambda r: r["fitness"])
    ranked, seen = [], set()
    for r in sorted(records, key=lambda r: (-rank(r), r["generation"], r["index"])):
        if r["status"] == "ok" and r["recipe_hash"] not in seen:
            seen.add(r["recipe_hash"])
            ranked.append(r)
    return ranked[:k]


def pick_winner(rescored: list[dict]) -> dict:
    return max(rescored, key=lambda r: (r["fitness"], -r["generation"], -r["index"]))


class SearchBackground:
    """The `executor.BackgroundWork` of one search: queues, hands out and logs background jobs."""

    def __init__(self, search: Search, records: list[dict]):
        self.search = search
        self.k = search.cfg.rescore_top_k
        self.rescored = {r["recipe_hash"]: r for r in records if r["type"] == "rescore"}
        self.tested = {r["recipe_hash"]: r for r in records if r["type"] == "test"}
        self.queued: set[tuple[str, str]] = set()
        self.queue: deque[EvalJob] = deque()
        self.triggers: list[list[str]] = []  # top-k hashes whose winner gets a test evaluation

    def plan(self, generation: int, candidates: dict) -> None:
        """Queues the background work that generation ``generation`` (told) implies."""
        top = self.search.top_candidates([r for r in candidates.values() if r["generation"] <= generation])
        for r in top:
            h = r["recipe_hash"]
            if h not in self.rescored and ("rescore", h) not in self.queued:
                self.queued.add(("rescore", h))
                self.queue.append(self.search._job("rescore", r["generation"], r["index"], np.array(r["genome"]),
                                                   None))
        self.triggers.append([r["recipe_hash"] for r in top])
        self._resolve()

    def _resolve(self) -> None:
        waiting = []
        for hashes in self.triggers:
            if not all(h in self.rescored for h in hashes):
                waiting.append(hashes)
                continue
            if not hashes:
                continue
            win = pick_winner([self.rescored[h] for h in hashes])
            h = win["recipe_hash"]
            if h not in self.tested and ("test", h) not in self.queued:
                self.queued.add(("test", h))
                job = self.search._job("test", win["generation"], win["index"], np.array(win["genome"]), None)
                self.queue.append(EvalJob("test", job.generation, job.index, job.genome, job.recipe, {}, TEST_KEY))
        self.triggers = waiting

    @property
    def pending(self) -> bool:
        return bool(self.queue or self.triggers)

    def next(self) -> EvalJob | None:
        self._resolve()
        while self.queue:
            job = self.queue.popleft()
            if job.kind == "rescore":
                hit = self.search.cache.get((job.recipe.hash(), job.eval_key))
                if hit is not None:  # e.g. the starting point, scored on the full dev split
                    self._log(job, self.search._cached(hit), hit)
                    continue
            return job
        return None

    def done(self, job: EvalJob, result: TrialResult) -> None:
        self._log(job, result, None)

    def _log(self, job: EvalJob, result: TrialResult, hit: dict | None) -> None:
        if job.kind == "test":
            self.tested[result.recipe_hash] = self.search._test_record(job, result)
        else:
            self.rescored[result.recipe_hash] = self.search._record(job, result, hit)
        self._resolve()
        self.search._check_stop()
