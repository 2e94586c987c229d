"""The in-process executor (``--workers 0``, the default): candidates built and scored in this
process, in job order; background work runs only when the search drains it at a barrier.
The interface it implements (`EvalJob`, `Executor`, `BackgroundWork`): evomerge/search/jobs.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch

from evomerge.evaluation.fitness import FitnessFunction
from evomerge.evaluation.trial import (
    CandidateBuilder,
    TrialResult,
    result_of,
    run_trial,
    test_metrics,
)
from evomerge.search.jobs import BackgroundWork, EvalJob
from evomerge.search.records import RecordKind


def run_job(job: EvalJob, builder: CandidateBuilder, fitness: FitnessFunction, tokenizer, *, penalty: float,
            batch_size: int) -> TrialResult:
    """One job, in this process: a trial, or (kind "test") the recipe's test-split metrics, whose
    ``fitness`` is the weighted sum over the tasks (NaN when a task has no test split). A non-finite
    metric makes it a failed job, with that metric left out of its (JSON-safe) metrics."""
    if job.kind != RecordKind.TEST:
        return run_trial(job.recipe, builder, fitness, tokenizer, job.samples, penalty)
    h = job.recipe.hash()
    t0 = time.perf_counter()
    try:
        metrics = test_metrics(job.recipe, builder, fitness.tasks, tokenizer, batch_size)
    except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
        return TrialResult(h, math.nan, "failed", f"{type(e).__name__}: {e}", eval_s=time.perf_counter() - t0)
    total = sum(t.weight * metrics[t.name][t.metric] if t.name in metrics else math.nan for t in fitness.tasks)
    return result_of(h, total, metrics, {}, math.nan, needs_fitness=False, eval_s=time.perf_counter() - t0)


class LocalExecutor:
    """Builds and scores in this process, in job order (``--workers 0``)."""

    pipelined = False

    def __init__(self, builder: CandidateBuilder, fitness: FitnessFunction, tokenizer, *, penalty: float,
                 batch_size: int):
        self.builder, self.fitness, self.tokenizer = builder, fitness, tokenizer
        self.penalty, self.batch_size = penalty, batch_size
        self.should_stop = lambda: False  # in-process, a stop signal is seen between jobs

    def run(self, jobs: Sequence[EvalJob], *, background: BackgroundWork | None = None
            ) -> Iterator[tuple[EvalJob, TrialResult]]:
        for job in jobs:
            yield job, self._run(job)
        if not jobs and background is not None:
            while (job := background.next()) is not None:
                background.done(job, self._run(job))

    def _run(self, job: EvalJob) -> TrialResult:
        return run_job(job, self.builder, self.fitness, self.tokenizer, penalty=self.penalty,
                       batch_size=self.batch_size)

    def close(self) -> None:
        pass
