"""The steady-state engine: an optimizer that takes one candidate at a time (`optimizers.Batch.STEADY`).

The executor pulls candidates from it as workers free up (it is the executor's work source, like
background work: search/jobs.py), so no worker waits for a generation's slowest candidate. The
history stays a function of the seed alone, whatever the workers and timing:

- candidate ``k`` (logged as generation ``k // popsize``, index ``k % popsize``: a block of the
  log, with its item subset and its generation record) is asked only once the result of candidate
  ``k - pending`` is in, and the optimizer is told the results in log order, each one just before
  the ask it may influence (candidate ``j`` before ask ``j + pending``): every ask sees exactly the
  same tells, so a resume replays the asks bit for bit;
- a block is closed as soon as its candidates and every earlier one are scored (not when the
  optimizer is told them, which may be ``pending`` candidates later): its generation record is
  written then, from those candidates only, and the background work it implies (re-scores, the
  test score of the best so far) is queued then, beside the next block's candidates instead of
  after them. The last block's work thus starts with its last result, as a generational search's
  does; the optimizer's checkpoint is written when its tells complete a block;
- a recipe asked again while its first copy is in flight waits for that result and is served from
  it (as a repeat is from the cache), so it is scored once whatever the workers: a failed first
  copy is not reused, and the repeat is then scored itself, as it is in-process.

The search's background work (re-scoring, test scores) is handed out as soon as it is queued,
before the next candidate: it runs beside the candidates instead of piling up for the end, where
it would leave a tail of workers waiting for the last re-scores.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from evomerge.core.errors import ConfigError, RunFolderError
from evomerge.evaluation.trial import TrialResult
from evomerge.search import optimizers
from evomerge.search.history import RunHistory
from evomerge.search.jobs import EvalJob
from evomerge.search.records import EvalRecord, RecordKind


def check_per_item(kind: optimizers.OptimizerKind, means: dict[str, bool]) -> None:
    """An optimizer told per-item scores (M2N2) needs every task's metrics to be item means."""
    bad = [t for t, ok in means.items() if not ok]
    if kind.per_item and bad:
        raise ConfigError(f"optimizer.name: {kind.name} needs per-item scores, and task(s) {', '.join(bad)} "
                          "report a metric that is not a mean over items")


class SteadyState:
    """The `search.jobs.BackgroundWork` that hands out candidates (and the search's background work)."""

    def __init__(self, search, logged: dict, candidates: dict, done_gens: set[int]):
        self.s = search
        self.opt = search.optimizer
        self.popsize = self.opt.popsize
        self.pending = self.opt.pending
        self.logged, self.candidates, self.done_gens = logged, candidates, done_gens
        self.asked = 0
        self.told = 0  # candidates told to the optimizer (in log order, just before the asks they may influence)
        self.closed = 0  # candidates scored with every earlier one: their blocks are closed
        self.results: dict[int, tuple[np.ndarray, EvalRecord]] = {}  # k -> its genome and record, once scored
        self.flight: dict[tuple[int, int], tuple[int, np.ndarray]] = {}  # (generation, index) -> k, genome
        # (recipe hash, settings key) in flight -> the repeats of it asked meanwhile: (k, genome, job)
        self.waiting: dict[tuple[str, str], list[tuple[int, np.ndarray, EvalJob]]] = {}
        self.again: deque[EvalJob] = deque()  # repeats whose first copy failed: scored themselves
        self.closed_records: dict[tuple[int, int], EvalRecord] = {}
        # the generation records' item count: the candidates' items are added as they are closed
        self.items = RunHistory(search.run.records()).search_items(but=RecordKind.CANDIDATE)
        # an optimizer told per-item scores (M2N2) compares candidates item by item: one subset for all
        self.per_item = search.kind.per_item
        self.fixed_items = search.fitness.samples(0) if self.per_item else None
        check_per_item(search.kind, search.items.reusable)

    def _may_ask(self, k: int) -> bool:
        g = k // self.popsize
        cfg = self.s.cfg.budget
        if cfg.generations and g >= cfg.generations or cfg.evaluations and k >= cfg.evaluations:
            return False
        # logged candidates are replayed whatever the time left; a time budget runs at least one block
        return (g, k % self.popsize, 0) in self.logged or g == 0 or self.s._time_left()

    # ------------------------------------------------------------------ BackgroundWork
    def next(self) -> EvalJob | None:
        if self.again:
            return self.again.popleft()
        if (bg := self._background()) is not None:
            return bg
        while True:
            k = self.asked
            if not self._may_ask(k):
                if not self.flight:
                    self._tell_upto(self.asked)  # the end: every result told
                    return self._background()  # the last block's
                return None
            if not self._ready(k - self.pending + 1):
                return None  # a result this ask must see is not in yet
            self._tell_upto(k - self.pending + 1)
            x = self.opt.ask(1)[0]
            self.asked += 1
            g, i = divmod(k, self.popsize)
            rec = self.logged.get((g, i, 0))
            if rec is not None:
                if [float(v) for v in x] != rec.genome:
                    raise RunFolderError(f"resume: the optimizer does not reproduce the logged genome of "
                                         f"generation {g}, candidate {i}; the code, the config or the platform "
                                         "changed, so this run cannot continue exactly")
                self._scored(k, x, rec)
                continue
            job = self.s.job(RecordKind.CANDIDATE, g, i, x, 0 if self.per_item else g)
            ck = (job.recipe.hash(), job.eval_key)
            hit = self.s.cache.get(ck)
            if hit is not None:
                self._scored(k, x, self.s.log(job, self.s.cached(hit), hit))
                continue
            if ck in self.waiting:  # its first copy is in flight: wait for that result
                self.waiting[ck].append((k, x, job))
                continue
            self.waiting[ck] = []
            self.flight[(g, i)] = (k, x)
            return job

    def done(self, job: EvalJob, result: TrialResult) -> None:
        if job.kind != RecordKind.CANDIDATE:  # background work
            self.s.background.done(job, result)
            return
        k, x = self.flight.pop((job.generation, job.index))
        rec = self.s.log(job, result, None)
        self._scored(k, x, rec)
        repeats = self.waiting.pop((job.recipe.hash(), job.eval_key))
        if rec.ok:
            for k2, x2, job2 in repeats:
                self._scored(k2, x2, self.s.log(job2, self.s.cached(rec), rec))
        elif repeats:  # not reused: the first repeat is scored, the others wait for it
            (k2, x2, job2), rest = repeats[0], repeats[1:]
            self.waiting[(job2.recipe.hash(), job2.eval_key)] = rest
            self.flight[(job2.generation, job2.index)] = (k2, x2)
            self.again.append(job2)
        self.s.check_stop()

    def _background(self) -> EvalJob | None:
        bg = self.s.background
        return bg.next() if bg is not None else None

    # ------------------------------------------------------------------ closing and telling, in log order
    def _scored(self, k: int, x: np.ndarray, rec: EvalRecord) -> None:
        self.results[k] = (x, rec)
        self.candidates[(rec.generation, rec.index)] = rec
        while self.closed in self.results:
            r = self.results[self.closed][1]
            self.closed_records[(r.generation, r.index)] = r
            self.items += sum((r.items_scored or {}).values())
            self.closed += 1
            if self.closed % self.popsize == 0:
                self._close_block(self.closed // self.popsize - 1)

    def _ready(self, n: int) -> bool:
        """Candidates told..n-1 are scored."""
        return self.closed >= n

    def _tell_upto(self, n: int) -> None:
        """Tells the results of candidates told..n-1 (all of them scored), in log order."""
        while self.told < n:
            x, rec = self.results.pop(self.told)
            if self.per_item:
                self.opt.tell_items(x, *self.s.items.vector(rec.recipe_hash if rec.ok else None, self.fixed_items))
            else:
                self.opt.tell(x[None, :], np.array([rec.fitness]))
            self.told += 1
            g = self.told // self.popsize - 1
            if self.told % self.popsize == 0 and g + 1 not in self.done_gens:  # else a later one overwrites it
                self.s.run.write_optimizer(self.opt.state_dict())

    def _close_block(self, g: int) -> None:
        """Block ``g`` is scored: its generation record, the best so far, and its background work."""
        if g not in self.done_gens:
            block = [self.closed_records[(g, i)] for i in range(self.popsize)]
            self.s._end_generation(g, block, [r.fitness for r in block], self.closed_records, None,
                                   items=self.items, optimizer=False)
        elif g + 1 not in self.done_gens:  # the last logged block: its best.yaml may be stale
            self.s._checkpoint(self.closed_records, optimizer=False)
        if self.s.background is not None:
            self.s.background.plan(g, self.closed_records)


def run_steady(search, logged: dict, candidates: dict, done_gens: set[int]) -> int:
    """Runs the steady-state engine on the search's executor to the budget; returns the blocks closed."""
    engine = SteadyState(search, logged, candidates, done_gens)
    for _ in search._run([], background=engine):
        pass
    return -(-engine.closed // engine.popsize)  # a last, partial block (an evaluations budget) counts
