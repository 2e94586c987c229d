"""The search core's hazards (issue 28): each test fails on the code before its fix.

Searches run with test_racing's constructed fitness (FakeExecutor: no model is built or scored)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml
from test_racing import FakeExecutor, fake_config

from evomerge.core.errors import ExecutionError, RunFolderError
from evomerge.evaluation import irt
from evomerge.evaluation.trial import TrialResult
from evomerge.execution.registry import in_process
from evomerge.recipes.parameter_space import Recipe
from evomerge.runs import folder as folder_mod
from evomerge.runs.folder import RunFolder, history
from evomerge.runs.lock import RunLock
from evomerge.runs.mirror import LogMirror
from evomerge.runs.progress import Display
from evomerge.runs.status import read_status
from evomerge.search import ranking
from evomerge.search.jobs import SearchStopped

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- 1. nested executor runs
class NoNesting(FakeExecutor):
    """Refuses a run while another is being consumed (Ray's would wait on, and drop, the outer
    run's jobs); a job scored on part of its items reports a metric its per-item log lacks, so
    that its result does not combine with the stored items."""

    active = False

    def run(self, jobs, background=None):
        if NoNesting.active:
            raise AssertionError("executor.run entered while another run is in flight")
        NoNesting.active = True
        try:
            yield from super().run(jobs, background)
        finally:
            NoNesting.active = False

    def score(self, job):
        res = super().score(job)
        partial = job.stage == 1 and any(v is not None and len(v) < 24 for v in job.samples.values())
        if res.status == "ok" and partial:
            res.metrics = {t: {**m, "acc_norm": m["acc"]} for t, m in res.metrics.items()}
        return res


def test_a_result_that_does_not_combine_is_rescored_in_a_batch_of_its_own_not_a_nested_run(zoo_dir, tmp_path):
    cfg = fake_config(zoo_dir, tmp_path, budget={"generations": 2}, racing={"stages": [8, 24], "keep": 0.5})
    NoNesting.active = False
    out = run_fake(cfg, NoNesting)
    assert out.finished
    records = RunFolder.open(tmp_path / "run").records()
    later = [r for r in records if r.type == "candidate" and r.stage == 1]
    assert later and all(r.ok and r.items == {"zoo_add": 24, "zoo_sub": 24} for r in later)
    # scored twice: on the 16 missing items, then (not combining) on all 24
    assert all(r.items_scored == {"zoo_add": 40, "zoo_sub": 40} for r in later)
    for r in later:  # the whole-subset score, not the 16 missing items' one
        docs = FakeExecutor_items(cfg, r.generation, 24)
        assert r.metrics["zoo_add"]["acc"] == pytest.approx(np.mean([FakeExecutor.u(0, d) < r.genome[0] for d in docs]))


def FakeExecutor_items(cfg, g, n):
    from test_racing import _stage_items

    return _stage_items(cfg, g, 0, n)


def run_fake(cfg, executor, **kw):
    from evomerge.runs.start import run_search

    FakeExecutor.crash_after = None
    FakeExecutor.jobs_done = 0
    return run_search(cfg, quiet=True, executor_factory=in_process(executor), **kw)


# ----------------------------------------------------------------------------- 2. a failing test split
class FailingTestSplit(FakeExecutor):
    def score(self, job):
        if job.kind == "test":
            return TrialResult(job.recipe.hash(), math.nan, "failed", "OSError: the test split is unreachable")
        return super().score(job)

    def test_metrics(self, recipe):  # as RayExecutor's: a failed test split raises
        raise ExecutionError("test-split evaluation failed: OSError: the test split is unreachable")


def test_a_failed_test_split_is_a_failed_test_record_and_the_final_record_is_still_written(zoo_dir, tmp_path):
    out = run_fake(fake_config(zoo_dir, tmp_path, budget={"generations": 1}, racing=None), FailingTestSplit)
    assert out.finished
    records = RunFolder.open(tmp_path / "run").records()
    final = records[-1]
    assert final.type == "final" and final.test_metrics == {}
    tests = [r for r in records if r.type == "test"]
    assert [(t.status, t.recipe_hash) for t in tests] == [("failed", final.recipe_hash)]
    assert "unreachable" in tests[0].reason
    assert Recipe.load(tmp_path / "run" / "best.yaml").hash() == final.recipe_hash


# ----------------------------------------------------------------------------- 3. IRT fits and repeated recipes
def test_a_recipe_repeated_after_a_refit_is_estimated_with_the_current_fit(zoo_dir, tmp_path, monkeypatch):
    import evomerge.search.loop as loop
    from evomerge.search import irt_fitness
    from evomerge.search.optimizers.random_search import RandomSearch

    def sources(cfg, fitness, tokenizer):  # test_irt's constructed sources
        qs = [0.15, 0.5, 0.85, 0.3][: len(cfg.models) + 1]
        return {t.name: np.array([[1.0 if FakeExecutor.u(ti, d) < q else 0.0 for d in range(fitness.n_docs(t.name))]
                                  for q in qs]) for ti, t in enumerate(fitness.tasks)}

    monkeypatch.setattr(irt_fitness, "score_sources", sources)

    class Repeating(RandomSearch):
        """Candidate 0 of every generation is generation 0's candidate 0."""

        first = None

        def ask(self):
            x = super().ask()
            if self.first is None:
                self.first = x[0].copy()
            x[0] = self.first
            return x

    monkeypatch.setattr(loop, "make_optimizer", lambda name, x0, s, p, seed, **kw: Repeating(x0, s, p, seed))
    cfg = fake_config(zoo_dir, tmp_path, budget={"generations": 2}, racing=None,
                      fitness={"estimator": "irt", "anchors": 12}, optimizer={"name": "random", "popsize": 4})
    run_fake(cfg, FakeExecutor)
    run_dir = tmp_path / "run"
    records = RunFolder.open(run_dir).records()
    anchors = next(r for r in records if r.type == "irt" and r.generation == -1).anchors
    first, again = (next(r for r in records if r.type == "candidate" and (r.generation, r.index) == (g, 0))
                    for g in (0, 1))
    assert first.recipe_hash == again.recipe_hash

    def estimate(fit_generation: int, rec) -> dict:
        with np.load(run_dir / "irt" / f"fit-g{fit_generation}.npz") as z:
            out = {}
            for ti, t in enumerate(cfg.tasks):
                params = irt.ItemParams(z[f"{t.name}/a"], z[f"{t.name}/d"])
                a = anchors[t.name]
                values = [1.0 if FakeExecutor.u(ti, d) < rec.genome[ti] else 0.0 for d in a]
                out[t.name] = {"acc": irt.estimate(params, a, values)}
        return out

    assert first.estimated == estimate(-1, first)
    assert estimate(0, again) != estimate(-1, again)  # the refit changed the estimate
    assert again.estimated == estimate(0, again)  # generation 1 is told the fit after generation 0
    assert again.fitness == pytest.approx(0.5 * again.estimated["zoo_add"]["acc"] + 0.5 * again.estimated["zoo_sub"]["acc"])


# ----------------------------------------------------------------------------- 4. one ranking rule for the display
class FailsOne(FakeExecutor):
    def score(self, job):
        if job.kind == "candidate" and (job.generation, job.index) == (0, 1):
            return TrialResult(job.recipe.hash(), 0.99, "failed", "RuntimeError: out of memory")
        return super().score(job)


def test_status_and_progress_show_the_best_that_best_yaml_names(zoo_dir, tmp_path):
    cfg = fake_config(zoo_dir, tmp_path, budget={"generations": 1}, racing=None, penalty_fitness=0.99,
                      rescore_top_k=1)
    run_fake(cfg, FailsOne)
    records = RunFolder.open(tmp_path / "run").records()
    cands = [r for r in records if r.type == "candidate"]
    failed = next(r for r in cands if not r.ok)
    assert failed.fitness > max(r.fitness for r in cands if r.ok)  # the trap: the highest fitness failed
    best = ranking.best_of(cands)
    assert best.ok
    assert read_status(tmp_path / "run").best == best
    shown = Display(quiet=True, tasks=["zoo_add", "zoo_sub"])
    shown.start(1, 8, records)
    assert shown.best == best


# ----------------------------------------------------------------------------- 5. observers and the lease
class Recorder(LogMirror):
    name = "recorder"
    seen: list = []

    def sync(self, records):
        Recorder.seen = list(records)


def test_every_appended_record_reaches_the_mirrors(zoo_dir, tmp_path, monkeypatch):
    import evomerge.runs.start as start
    from evomerge.search import irt_fitness

    monkeypatch.setattr(irt_fitness, "score_sources", lambda cfg, fitness, tok: {
        t.name: np.array([[1.0 if FakeExecutor.u(ti, d) < q else 0.0 for d in range(fitness.n_docs(t.name))]
                          for q in (0.15, 0.5, 0.85, 0.3)]) for ti, t in enumerate(fitness.tasks)})
    monkeypatch.setattr(start, "mirrors_for", lambda cfg, run, report: [Recorder(report)])
    Recorder.seen = []
    cfg = fake_config(zoo_dir, tmp_path, budget={"generations": 1}, racing=None,
                      fitness={"estimator": "irt", "anchors": 12}, optimizer={"name": "random", "popsize": 4})
    run_fake(cfg, FakeExecutor)
    logged = RunFolder.open(tmp_path / "run").records()
    assert {r.type for r in logged} >= {"irt", "test", "candidate", "final"}
    assert history(Recorder.seen) == history(logged)


def test_checkpoint_writes_check_the_lease_as_appends_do(tmp_path, monkeypatch):
    run = RunFolder.create(tmp_path / "run", "seed: 0\n")
    try:
        run.write_optimizer({"generation": 0})
        monkeypatch.setattr(RunLock, "lost", property(lambda self: True))  # the heartbeat could not renew it
        for write in (lambda: run.write_optimizer({"generation": 1}), lambda: run.write_pareto({"front": []}),
                      lambda: run.write_best("a: 1\n", "b: 2\n")):
            with pytest.raises(RunFolderError, match="lost its lock"):
                write()
        assert yaml.safe_load((tmp_path / "run" / "optimizer.json").read_text()) == {"generation": 0}
        assert not (tmp_path / "run" / "best.yaml").exists()
    finally:
        monkeypatch.undo()
        run.close()


def test_a_study_mirror_closed_while_its_writer_syncs_still_writes_every_trial(zoo_dir, tmp_path, monkeypatch):
    from test_study import _record

    import evomerge.runs.study as study
    from evomerge.runs.study import KEY_ATTR, StudyMirror, StudyTarget
    from evomerge.search.config import SearchConfig

    cfg = SearchConfig.from_dict({"models": ["zoo/a"], "search_space": "ps_task_arithmetic",
                                  "budget": {"generations": 1}, "tasks": [{"name": "zoo_add", "limit": 5}]})
    entered, release = threading.Event(), threading.Event()
    make_trial = study.make_trial

    def slow(recs, c, params):
        entered.set()
        release.wait(30)
        return make_trial(recs, c, params)

    monkeypatch.setattr(study, "make_trial", slow)
    target = StudyTarget(f"sqlite:///{tmp_path / 'study.db'}", "s", "run-1")
    said: list[str] = []
    m = StudyMirror(tmp_path, cfg, target, said.append)
    m.start(1, 2, [])
    m.logged(_record(0, 0, 0.25))
    assert entered.wait(30)
    m.close(timeout=0.01)  # the writer is inside a sync
    release.set()
    m._thread.join(30)
    import optuna

    trials = optuna.load_study(study_name="s", storage=target.storage).get_trials()
    assert [(t.user_attrs[KEY_ATTR], t.value) for t in trials] == [("g0/c0", 0.25)]
    assert m.failures == 0, said


# ----------------------------------------------------------------------------- 6. SIGINT and SIGTERM
class Signals(FakeExecutor):
    signum = signal.SIGINT

    def score(self, job):
        if job.kind == "candidate" and (job.generation, job.index) == (1, 2):
            os.kill(os.getpid(), Signals.signum)
            time.sleep(0.05)  # the signal is handled while this candidate is being scored
        return super().score(job)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_stops_at_a_record_boundary_and_the_resume_equals_the_uninterrupted(zoo_dir, tmp_path, signum):
    over = {"budget": {"generations": 2}, "racing": None}
    run_fake(fake_config(zoo_dir, tmp_path, "ref", **over), FakeExecutor)
    Signals.signum = signum
    with pytest.raises(SearchStopped) as stop:
        run_fake(fake_config(zoo_dir, tmp_path, "run", **over), Signals)
    assert stop.value.signum == signum
    got = RunFolder.open(tmp_path / "run").records()
    assert got[-1].type == "candidate" and (got[-1].generation, got[-1].index) == (1, 2)  # the one in flight: logged
    run_fake(None, FakeExecutor, resume=True, run_dir=tmp_path / "run")
    assert history(RunFolder.open(tmp_path / "run").records()) == history(RunFolder.open(tmp_path / "ref").records())


# ----------------------------------------------------------------------------- 7. reading the log
def test_records_reads_only_what_was_appended_since_the_last_read(zoo_dir, tmp_path, monkeypatch):
    run_fake(fake_config(zoo_dir, tmp_path, budget={"generations": 1}, racing=None), FakeExecutor)
    run = RunFolder.open(tmp_path / "run")
    n = len(run.records())
    parsed = []
    from_json = folder_mod.from_json
    monkeypatch.setattr(folder_mod, "from_json", lambda d: parsed.append(d) or from_json(d))
    assert len(run.records()) == n and parsed == []  # nothing new: nothing parsed
    log = tmp_path / "run" / "log.jsonl"
    last = log.read_bytes().splitlines(keepends=True)[-1]
    with open(log, "ab") as f:
        f.write(last + last[:10])  # one more record, and a torn one
    assert len(run.records()) == n + 1 and len(parsed) == 1
    with open(log, "ab") as f:
        f.write(last[10:])  # the torn record completed
    assert len(run.records()) == n + 2 and len(parsed) == 2
