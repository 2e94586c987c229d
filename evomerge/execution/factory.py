"""`Factory`: an `ExecutorFactory` (search/jobs.py) of a registered kind (evomerge/execution/__init__.py),
in a module of its own so that the executors' modules and the registry both import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from evomerge.execution import EXECUTORS, ExecutorKind
from evomerge.search.jobs import Executor


def _no_check(cfg) -> None:
    pass


@dataclass(frozen=True)
class Factory:
    """An `ExecutorFactory` of a registered kind: ``make(cfg, fitness, tokenizer)`` builds the
    executor, ``check(cfg)`` is its own check before a run folder is written."""

    kind: ExecutorKind
    make: Callable[..., Executor]
    check: Callable[..., None] = _no_check

    @property
    def uses_ray(self) -> bool:
        return EXECUTORS[self.kind].uses_ray

    def __call__(self, cfg, fitness, tokenizer) -> Executor:
        return self.make(cfg, fitness, tokenizer)
