"""What the search loop hands to an executor: evaluation jobs, and the executor interface.

The search decides *what* is evaluated (a batch of `EvalJob`s: recipe + the items to score) and
logs what comes back; an executor (evomerge/execution/, named in its registry) decides *where*: in
this process (`LocalExecutor`) or on Ray workers (`RayExecutor`), which finish jobs in any order.

Background work (``run(jobs, background=...)``): work that does not change the search's decisions
(the full-dev re-scoring of the current top candidates, the test-split scores of a new best) is
handed out by a `BackgroundWork` object. A pipelined executor gives it to workers that the batch
leaves idle, while the batch runs, and may still be running it when ``run`` returns; its results
go to ``background.done`` (never through ``run``'s iterator). ``run([], background=...)`` runs the
background work until there is none left and nothing is in flight (a barrier).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from evomerge.evaluation.fitness import Samples
from evomerge.evaluation.trial import TrialResult
from evomerge.recipes.layer_path import AnyRecipe
from evomerge.search.records import RecordKind

TEST_KEY = "test-split"  # the settings key of a test-split job (its items: each task's whole test split)


class SearchStopped(Exception):
    """SIGTERM or SIGINT arrived; every finished candidate is in the log. ``signum``: which."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@dataclass(frozen=True)
class EvalJob:
    kind: RecordKind  # reference, candidate, rescore or test: the kind of the record it makes
    generation: int
    index: int
    genome: tuple[float, ...]
    recipe: AnyRecipe
    samples: Samples  # task -> item indices (None: the whole split)
    eval_key: str  # FitnessFunction.settings_key of the samples and the evaluation settings
    stage: int | None = None  # racing stage (None: no racing)


class BackgroundWork(Protocol):
    def next(self) -> EvalJob | None:
        """The next background job, or None when there is none now."""
        ...

    def done(self, job: EvalJob, result: TrialResult) -> None:
        """A background job's result (the driver logs it)."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Everything the search loop uses of an executor."""

    pipelined: bool  # True: background work runs in idle slots during batches; False: only at barriers
    # set by the search: True once a stop signal arrived (a worker that dies then is not the candidate's fault)
    should_stop: Callable[[], bool]

    def run(self, jobs: Sequence[EvalJob], *, background: BackgroundWork | None = None
            ) -> Iterator[tuple[EvalJob, TrialResult]]:
        """Scores every job once; yields each (job, result) as it finishes, in any order. With no
        jobs, runs ``background`` until it is exhausted."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ExecutorFactory(Protocol):
    """Everything start-up (runs/start.py) and the loop use of an executor before it exists; made by
    the executors' registry (execution/registry.py)."""

    uses_ray: bool  # True: a search's background work defaults on (``background: null``)

    def check(self, cfg) -> None:
        """The executor's own checks of a config (Ray: its address and CPUs), before a run folder
        is written."""
        ...

    def __call__(self, cfg, fitness, tokenizer) -> Executor:
        """The executor of a search (once its fitness and tokenizer exist)."""
        ...
