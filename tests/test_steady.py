"""The steady-state engine (search/steady.py): one candidate at a time, pulled by the executor as
workers free up, told in log order; its history does not depend on the workers or their timing.

Searches run with test_racing's constructed fitness (FakeExecutor: no model is built or scored)."""

from __future__ import annotations

import numpy as np
import pytest
from test_racing import Crash, FakeExecutor, fake_config

from evomerge.evaluation.trial import TrialResult
from evomerge.execution.registry import in_process
from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.optimizers.random_search import RandomSearch

pytestmark = pytest.mark.slow

STEADY = {"optimizer": {"name": "random_steady", "popsize": 4}, "racing": None, "budget": {"generations": 3}}


class Pipelined(FakeExecutor):
    """A pipelined executor with ``slots`` workers that finish their jobs in an order of their own
    (the last started first, as uneven jobs on Ray may): ``run([], background=source)`` pulls from
    the source whenever a slot is free."""

    pipelined = True
    slots = 3
    asks = 0
    fifo = False  # True: the oldest job finishes first (even jobs)

    def run(self, jobs, background=None):
        yield from super().run(jobs)
        if jobs or background is None:
            return
        flight = []
        while True:
            while len(flight) < Pipelined.slots and (job := background.next()) is not None:
                flight.append(job)
            if not flight:
                return
            job = flight.pop(0 if self.fifo else -1)  # the newest finishes first
            background.done(job, self._job(job))


def search(cfg, executor=FakeExecutor, crash_after=None, **kw):
    FakeExecutor.crash_after = crash_after
    FakeExecutor.jobs_done = 0
    return run_search(cfg, quiet=True, executor_factory=in_process(executor), **kw)


def killed_and_resumed(cfg, run_dir, executor, crashes, check=lambda records: None) -> list:
    """Runs ``cfg`` in ``run_dir``, killed after each of ``crashes`` jobs (``check`` then reads the
    log), each time resumed; then resumed to the end. Returns the log's records."""
    for crash in crashes:
        with pytest.raises(Crash):
            search(cfg, executor, crash_after=crash,
                   **({"resume": True, "run_dir": run_dir} if (run_dir / LOG).is_file() else {}))
        cfg = None
        check(RunFolder.open(run_dir).records())
    search(None, executor, resume=True, run_dir=run_dir)
    return RunFolder.open(run_dir).records()


def test_a_steady_state_search_draws_random_searchs_genomes_one_at_a_time(zoo_dir, tmp_path, monkeypatch):
    from evomerge.search.optimizers.random_search import SteadyRandomSearch

    sizes = []
    ask = SteadyRandomSearch.ask
    monkeypatch.setattr(SteadyRandomSearch, "ask", lambda self, n=None: sizes.append(n) or ask(self, n))
    out = search(fake_config(zoo_dir, tmp_path, **STEADY))
    assert out.finished and out.generations == 3
    records = RunFolder.open(tmp_path / "run").records()
    cands = [r for r in records if r.type == "candidate"]
    assert sizes == [1] * 12 and len(cands) == 12
    gens = [r for r in records if r.type == "generation"]
    assert [(g.generation, g.steady, g.evaluations) for g in gens] == [(0, True, 4), (1, True, 8), (2, True, 12)]
    # the same genomes as generational random search with this seed, row by row
    ref = RandomSearch(np.full(len(cands[0].genome), 0.5), 0.3, 4, 1)
    want = np.concatenate([ref.ask() for _ in range(3)])
    got = sorted(cands, key=lambda r: (r.generation, r.index))
    assert [r.genome for r in got] == [[float(v) for v in x] for x in want]
    # each block is scored on its generation's item subset and told before its record
    assert all(r.eval_key == next(c.eval_key for c in got if c.generation == r.generation) for r in got)


def test_a_pipelined_steady_state_search_has_the_history_of_an_in_process_one(zoo_dir, tmp_path):
    search(fake_config(zoo_dir, tmp_path, "inproc", **STEADY))
    expected = history(RunFolder.open(tmp_path / "inproc").records())
    for slots in (2, 3):
        Pipelined.slots = slots
        search(fake_config(zoo_dir, tmp_path, f"piped{slots}", **STEADY), Pipelined)
        records = RunFolder.open(tmp_path / f"piped{slots}").records()
        order = [(r.generation, r.index) for r in records if r.type == "candidate"]
        assert order != sorted(order)  # out of log order: the executor's own
        assert history(records) == expected


def check_killed_and_resumed(zoo_dir, tmp_path, executor, over: dict, crashes, candidates: int) -> None:
    """A search of ``over`` killed after each of ``crashes`` jobs (never finished meanwhile), then
    resumed, has the uninterrupted run's history: every one of ``candidates`` logged once."""
    search(fake_config(zoo_dir, tmp_path, "ref", **over), executor)
    expected = history(RunFolder.open(tmp_path / "ref").records())

    def unfinished(records):
        assert not any(r.type == "final" for r in records)

    got = killed_and_resumed(fake_config(zoo_dir, tmp_path, "run", **over), tmp_path / "run", executor, crashes,
                             check=unfinished)
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == candidates  # none lost, none scored twice
    assert history(got) == expected


@pytest.mark.parametrize("executor", [FakeExecutor, Pipelined], ids=["in-process", "pipelined"])
def test_a_steady_state_search_killed_and_resumed_equals_uninterrupted(zoo_dir, tmp_path, executor):
    Pipelined.slots = 3
    # killed five times, mid-block (jobs done in each session; 14 in all)
    check_killed_and_resumed(zoo_dir, tmp_path, executor, STEADY, (2, 3, 1, 4, 2), candidates=12)


def _asked_twice(monkeypatch):
    """Each draw of SteadyRandomSearch is asked twice in a row: candidates 2j and 2j + 1 are one
    recipe (in one block, so one settings key), and the second is asked while the first is in flight."""
    from evomerge.search.optimizers.random_search import SteadyRandomSearch

    ask = SteadyRandomSearch.ask

    def twice(self, n=None):
        self.asks = self.__dict__.get("asks", 0) + 1
        if self.asks % 2 == 1:
            self.last = ask(self, n)
        return self.last.copy()

    monkeypatch.setattr(SteadyRandomSearch, "ask", twice)


class Counting(Pipelined):
    scored: list[str] = []

    def score(self, job):
        if job.kind == "candidate":
            Counting.scored.append(job.recipe.hash())
        return super().score(job)


def test_a_recipe_repeated_while_its_first_copy_is_in_flight_is_scored_once(zoo_dir, tmp_path, monkeypatch):
    _asked_twice(monkeypatch)
    search(fake_config(zoo_dir, tmp_path, "inproc", **STEADY))
    expected = history(RunFolder.open(tmp_path / "inproc").records())
    cands = [r for r in RunFolder.open(tmp_path / "inproc").records() if r.type == "candidate"]
    assert len(cands) == 12 and len({r.recipe_hash for r in cands}) == 6
    for slots in (1, 2, 3):
        Pipelined.slots, Counting.scored = slots, []
        search(fake_config(zoo_dir, tmp_path, f"piped{slots}", **STEADY), Counting)
        assert len(Counting.scored) == len(set(Counting.scored)) == 6  # the repeat waited for the first's result
        records = RunFolder.open(tmp_path / f"piped{slots}").records()
        repeats = [r for r in records if r.type == "candidate" and r.index % 2 == 1]
        assert all(r.cached_from == [r.generation, r.index - 1] and r.items_scored == {} for r in repeats)
        assert history(records) == expected
    # killed with repeats waiting, then resumed: the same history
    Pipelined.slots = 3
    cfg = fake_config(zoo_dir, tmp_path, "run", **STEADY)
    assert history(killed_and_resumed(cfg, tmp_path / "run", Counting, (3, 1, 2))) == expected


class Recording(Pipelined):
    handed: list[tuple[str, int]] = []
    fifo = True  # the asks are never held up waiting for a result

    def score(self, job):
        Recording.handed.append((str(job.kind), job.generation))
        return super().score(job)


def test_a_block_is_closed_by_its_last_result_not_by_the_tells_after_it(zoo_dir, tmp_path):
    """A block's generation record and re-scores come as soon as its candidates are scored, though
    the optimizer is told them only before the asks they may influence (up to ``pending`` later):
    no candidate of the next block lands between a block's last result and its record, and its
    re-scores go to the next free worker, beside the next block's candidates (they do not pile up
    behind the last block, a tail of workers waiting for the last re-scores)."""
    tasks = [{"name": "zoo_add", "weight": 0.5, "limit": 16}, {"name": "zoo_sub", "weight": 0.5, "limit": 16}]
    search(fake_config(zoo_dir, tmp_path, "inproc", background=True, tasks=tasks, **STEADY))
    expected = history(RunFolder.open(tmp_path / "inproc").records())
    Pipelined.slots, Recording.handed = 2, []
    search(fake_config(zoo_dir, tmp_path, "piped", background=True, tasks=tasks, **STEADY), Recording)
    records = RunFolder.open(tmp_path / "piped").records()
    for g in range(3):
        at = next(n for n, r in enumerate(records) if r.type == "generation" and r.generation == g)
        last = max(n for n, r in enumerate(records) if r.type == "candidate" and r.generation == g)
        assert [r.type for r in records[last + 1:at]] == [], (g, [(r.type, r.generation) for r in records])
    # block 0's re-scores go to the next free worker after its last result (fifo: handed = scored),
    # not ``pending`` asks later, when the optimizer is told it
    handed = Recording.handed
    assert handed.index(("rescore", 0)) < [n for n, h in enumerate(handed) if h == ("candidate", 1)][1], handed
    assert history(records) == expected


class FailsFirst(Counting):
    """Fails the scoring of candidate (0, 0): its repeat (0, 1) cannot be served from it."""

    def score(self, job):
        if job.kind == "candidate" and (job.generation, job.index) == (0, 0):
            Counting.scored.append(job.recipe.hash())
            return TrialResult(job.recipe.hash(), -1.0, "failed", "RuntimeError: out of memory")
        return super().score(job)


def test_a_repeat_whose_first_copy_failed_is_scored_itself(zoo_dir, tmp_path, monkeypatch):
    _asked_twice(monkeypatch)
    Pipelined.slots, Counting.scored = 1, []  # one job at a time: as in-process
    search(fake_config(zoo_dir, tmp_path, "inproc", **STEADY), FailsFirst)
    expected = history(RunFolder.open(tmp_path / "inproc").records())
    Pipelined.slots, Counting.scored = 3, []
    search(fake_config(zoo_dir, tmp_path, "piped", **STEADY), FailsFirst)
    records = RunFolder.open(tmp_path / "piped").records()
    first, repeat = (next(r for r in records if r.type == "candidate" and (r.generation, r.index) == (0, i))
                     for i in (0, 1))
    assert (first.status, repeat.status, repeat.cached_from) == ("failed", "ok", None)
    assert len(Counting.scored) == 7 and history(records) == expected
