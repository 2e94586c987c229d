"""Executors: where candidates are built and scored.

The driver decides *what* is evaluated (a batch of `EvalJob`s: recipe + the items to score) and
writes what comes back to the log; an executor decides *where*. `LocalExecutor` builds and scores
in this process, one job after another. A distributed executor (Ray workers) implements the same
two calls and may finish jobs in any order: the driver logs each result as it arrives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from evomerge.dataflow.recipe import AnyRecipe
from evomerge.fitness import FitnessFunction, Samples
from evomerge.trial import CandidateBuilder, TrialResult, run_trial, test_metrics


@dataclass(frozen=True)
class EvalJob:
    kind: str  # "reference", "candidate" or "rescore": the log record's type
    generation: int
    index: int
    genome: tuple[float, ...]
    recipe: AnyRecipe
    samples: Samples  # task -> item indices (None: the whole split)
    eval_key: str  # FitnessFunction.settings_key of the samples and the evaluation settings
    stage: int | None = None  # racing stage (None: no racing)


class Executor(Protocol):
    def run(self, jobs: Sequence[EvalJob]) -> Iterator[tuple[EvalJob, TrialResult]]:
        """Scores every job once; yields each (job, result) as it finishes, in any order."""
        ...

    def test_metrics(self, recipe: AnyRecipe) -> dict[str, dict[str, float]]:
        """The recipe's metrics on each task's test split (reports only)."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Builds and scores in this process, in job order (``--workers 0``)."""

    def __init__(self, builder: CandidateBuilder, fitness: FitnessFunction, tokenizer, *, penalty: float,
                 batch_size: int):
        self.builder, self.fitness, self.tokenizer = builder, fitness, tokenizer
        self.penalty, self.batch_size = penalty, batch_size

    def run(self, jobs: Sequence[EvalJob]) -> Iterator[tuple[EvalJob, TrialResult]]:
        for job in jobs:
            yield job, run_trial(job.recipe, self.builder, self.fitness, self.tokenizer, job.samples, self.penalty)

    def test_metrics(self, recipe: AnyRecipe) -> dict[str, dict[str, float]]:
        return test_metrics(recipe, self.builder, self.fitness.tasks, self.tokenizer, self.batch_size)

    def close(self) -> None:
        pass
