"""The executors' factories, made from the registry (`EXECUTORS`, evomerge/execution/__init__.py:
the one place an executor is named; `evomerge search --executor`'s choices come from it).

An `ExecutorFactory` (search/jobs.py) is what start-up and the loop use of an executor before it
exists: its kind's ``uses_ray`` (background work defaults on with Ray workers), its own ``check``
(run before any run folder is written) and the call that makes the `Executor`.
"""

from __future__ import annotations

from collections.abc import Callable

from evomerge.core.errors import ConfigError
from evomerge.execution import EXECUTOR_NAMES, EXECUTORS, ExecutorKind
from evomerge.execution.factory import Factory
from evomerge.search.jobs import Executor


def default_builder(cfg):
    from evomerge.evaluation.trial import make_builder

    return make_builder(cfg)


def in_process(make: Callable[..., Executor]) -> Factory:
    """A factory of in-process executors made by ``make(cfg, fitness, tokenizer)`` (tests, scripts)."""
    return Factory(ExecutorKind.LOCAL, make)


def local_factory(builder_factory=default_builder) -> Factory:
    """Builds and scores in this process."""
    from evomerge.execution.local import LocalExecutor

    return in_process(lambda cfg, fitness, tokenizer: LocalExecutor(
        builder_factory(cfg), fitness, tokenizer, penalty=cfg.penalty_fitness, batch_size=cfg.batch_size))


def executor_kind(executor: str | None, workers: int | str | None, ray_address: str | None) -> ExecutorKind:
    """The executor that ``--executor``, ``--workers`` and ``--ray-address`` name together: Ray when
    workers or an address are given, else in-process; a contradiction is refused."""
    if executor is not None and executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTOR_NAMES)}")
    if workers == 0 and ray_address:
        raise ConfigError("--workers 0 scores in-process; it cannot be combined with --ray-address")
    wants_ray = (workers is not None and workers != 0) or bool(ray_address)
    kind = ExecutorKind(executor) if executor is not None else ExecutorKind.RAY if wants_ray else ExecutorKind.LOCAL
    if kind is ExecutorKind.LOCAL and wants_ray:
        raise ConfigError("--executor local scores in this process; --workers N and --ray-address need --executor ray")
    if kind is ExecutorKind.RAY and workers == 0:
        raise ConfigError("--executor ray needs at least 1 worker (--workers 0 scores in-process)")
    return kind


def make_executor_factory(workers: int | str | None = None, ray_address: str | None = None, *,
                          executor: str | None = None, sources: str = "path", builder_factory=default_builder,
                          pipelined: bool = True) -> Factory:
    """The factory of the executor named (see ``executor_kind``)."""
    if executor_kind(executor, workers, ray_address) is ExecutorKind.LOCAL:
        return local_factory(builder_factory)
    from evomerge.execution.ray import ray_executor

    return ray_executor("auto" if workers is None else workers, address=ray_address, sources=sources,
                        builder_factory=None if builder_factory is default_builder else builder_factory,
                        pipelined=pipelined)
