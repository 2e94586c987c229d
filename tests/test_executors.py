"""The executors' registry (evomerge/execution/__init__.py, execution/registry.py): it names the
executors the CLI offers and makes the factories start-up uses; both executors and both factories
have every member the loop and runs/start.py use (search/jobs.py's protocols)."""

from __future__ import annotations

import argparse

import pytest

from evomerge.cli.main import build_parser
from evomerge.core.errors import ConfigError
from evomerge.execution import EXECUTOR_NAMES, EXECUTORS, ExecutorKind
from evomerge.execution.local import LocalExecutor
from evomerge.execution.registry import executor_kind, make_executor_factory
from evomerge.search.jobs import Executor, ExecutorFactory


def _search_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["search"]


def test_the_registry_names_the_clis_executors():
    executor = next(a for a in _search_parser()._actions if a.dest == "executor")
    assert tuple(executor.choices) == EXECUTOR_NAMES == tuple(k.value for k in ExecutorKind)
    assert all(EXECUTORS[name].help in executor.help for name in EXECUTOR_NAMES)


@pytest.mark.parametrize(("executor", "workers", "address", "kind"), [
    (None, None, None, ExecutorKind.LOCAL), (None, 0, None, ExecutorKind.LOCAL),
    (None, 2, None, ExecutorKind.RAY), (None, None, "auto", ExecutorKind.RAY),
    ("ray", None, None, ExecutorKind.RAY), ("local", None, None, ExecutorKind.LOCAL)])
def test_the_executor_is_the_one_the_options_name(executor, workers, address, kind):
    assert executor_kind(executor, workers, address) is kind
    factory = make_executor_factory(workers, address, executor=executor)
    assert factory.kind is kind and factory.uses_ray is EXECUTORS[kind].uses_ray


@pytest.mark.parametrize(("executor", "workers", "address", "error"), [
    ("local", 2, None, "--executor local"), ("local", None, "auto", "--executor local"),
    ("ray", 0, None, "at least 1 worker"), (None, 0, "auto", "--workers 0"), ("dask", None, None, "unknown executor")])
def test_contradicting_executor_options_are_refused(executor, workers, address, error):
    with pytest.raises(ConfigError, match=error):
        executor_kind(executor, workers, address)


def test_both_factories_have_what_start_up_uses():
    for kind in ExecutorKind:
        factory = make_executor_factory(executor=kind.value, workers=1 if kind is ExecutorKind.RAY else None)
        assert isinstance(factory, ExecutorFactory)
        factory.check(_Cfg())  # the local check passes anything; Ray's: 1 worker, 1 thread fits this machine


class _Cfg:
    threads = 1


def test_the_local_executor_has_what_the_loop_uses():
    ex = LocalExecutor(None, None, None, penalty=-1.0, batch_size=1)
    assert isinstance(ex, Executor)
    assert ex.pipelined is False and ex.should_stop() is False
    assert list(ex.run([])) == []
