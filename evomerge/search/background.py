"""Background work of a search: evaluations that do not change its decisions.

After each generation (``plan``), the top ``rescore_top_k`` distinct recipes so far (search.ranking)
are queued for re-scoring on the full dev split (``rescore`` records, the same ones the final
re-scoring needs), and once those are in, the recipe that would win if the search stopped now is
queued for its test-split scores (a ``test`` record). The queue is a function of the history
alone, so the set of background records is too; only *when* they run depends on the executor (in
slots that the generation barrier leaves idle, or at a barrier), which is why ``runs.folder.history``
sorts these record types into their own section.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from evomerge.evaluation.trial import TrialResult
from evomerge.search.jobs import EvalJob
from evomerge.search.ranking import pick_winner
from evomerge.search.records import EvalRecord, RecordKind, TestRecord


class BackgroundHost(Protocol):
    """What background work needs from the search (search.loop.Search)."""

    cache: dict[tuple[str, str | None], EvalRecord]

    def job(self, kind: str, generation: int, index: int, genome, subset_generation: int | None) -> EvalJob: ...

    def cached(self, hit: EvalRecord) -> TrialResult: ...

    def log(self, job: EvalJob, res: TrialResult, hit: EvalRecord | None) -> EvalRecord: ...

    def log_test(self, job: EvalJob, res: TrialResult) -> TestRecord: ...

    def test_job(self, r: EvalRecord) -> EvalJob: ...

    def top_candidates(self, records) -> list[EvalRecord]: ...

    def check_stop(self) -> None: ...


class SearchBackground:
    """The `search.jobs.BackgroundWork` of one search: queues, hands out and logs background jobs."""

    def __init__(self, search: BackgroundHost, records: list):
        self.search = search
        self.rescored = {r.recipe_hash: r for r in records if r.type == RecordKind.RESCORE}
        self.tested = {r.recipe_hash: r for r in records if r.type == RecordKind.TEST}
        self.queued: set[tuple[str, str]] = set()
        self.queue: deque[EvalJob] = deque()
        self.triggers: list[list[str]] = []  # top-k hashes whose winner gets a test evaluation

    def plan(self, generation: int, candidates: dict) -> None:
        """Queues the background work that generation ``generation`` (told) implies."""
        top = self.search.top_candidates([r for r in candidates.values() if r.generation <= generation])
        for r in top:
            h = r.recipe_hash
            if h not in self.rescored and (RecordKind.RESCORE, h) not in self.queued:
                self.queued.add((RecordKind.RESCORE, h))
                self.queue.append(self.search.job(RecordKind.RESCORE, r.generation, r.index, r.genome, None))
        self.triggers.append([r.recipe_hash for r in top])
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
            h = win.recipe_hash
            if h not in self.tested and (RecordKind.TEST, h) not in self.queued:
                self.queued.add((RecordKind.TEST, h))
                self.queue.append(self.search.test_job(win))
        self.triggers = waiting

    @property
    def pending(self) -> bool:
        return bool(self.queue or self.triggers)

    def next(self) -> EvalJob | None:
        self._resolve()
        while self.queue:
            job = self.queue.popleft()
            if job.kind == RecordKind.RESCORE:
                hit = self.search.cache.get((job.recipe.hash(), job.eval_key))
                if hit is not None:  # e.g. the starting point, scored on the full dev split
                    self._log(job, self.search.cached(hit), hit)
                    continue
            return job
        return None

    def done(self, job: EvalJob, result: TrialResult) -> None:
        self._log(job, result, None)

    def _log(self, job: EvalJob, result: TrialResult, hit: EvalRecord | None) -> None:
        if job.kind == RecordKind.TEST:
            self.tested[result.recipe_hash] = self.search.log_test(job, result)
        else:
            self.rescored[result.recipe_hash] = self.search.log(job, result, hit)
        self._resolve()
        self.search.check_stop()
