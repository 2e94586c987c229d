"""Ray workers on a local Ray (2 CPUs): the same history with 0, 1 or 2 workers, a worker killed
mid-evaluation, SIGTERM and resume, and no Ray process left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time

import cli_process
import psutil
import pytest
import yaml
from ray_helpers import (
    REPO,
    assert_gone,
    killing_builder,
    kills,
    ray_processes,
    tiny_config,
    worker_pids,
)

from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the in-process tests (2 CPUs, no dashboard, a temporary folder of its own)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="r8t", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    pids: set[int] = set()
    try:
        yield pids
    finally:
        ray.shutdown()
        assert not ray.is_initialized()
        assert_gone(pids, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(zoo_dir, local_ray, tmp_path_factory):
    """The search with one Ray worker."""
    run_dir = tmp_path_factory.mktemp("ray1") / "run"
    run_search(SearchConfig.from_dict(tiny_config(zoo_dir)), run_dir=run_dir, quiet=True, workers=1)
    local_ray.update(worker_pids(run_dir))
    return run_dir


def test_two_workers_and_in_process_give_the_same_history(zoo_dir, local_ray, reference, tmp_path):
    # (these two workers get the sources through Ray's object store, the reference's from the path)
    run_search(SearchConfig.from_dict(tiny_config(zoo_dir)), run_dir=tmp_path / "ray2", quiet=True, workers=2,
               sources="object_store")
    local_ray.update(worker_pids(tmp_path / "ray2"))
    expected = history(RunFolder.open(reference).records())
    got = RunFolder.open(tmp_path / "ray2").records()
    assert history(got) == expected
    assert {r.worker.split("@")[0] for r in got if r.type == "candidate"} == {"w0", "w1"}
    kinds = [r.type for r in got]
    assert kinds.count("candidate") == 8 and kinds.count("test") >= 1 and kinds[-1] == "final"
    assert got[-1].test_metrics == next(r.metrics for r in got if r.type == "test"
                                           and r.recipe_hash == got[-1].recipe_hash)
    # in-process, the background work runs at each generation's barrier: the same history again
    run_search(SearchConfig.from_dict(tiny_config(zoo_dir)), run_dir=tmp_path / "local", quiet=True, workers=0)
    assert history(RunFolder.open(tmp_path / "local").records()) == expected


def test_a_killed_worker_reruns_its_candidate(zoo_dir, local_ray, reference, tmp_path, capfd):
    # the third build (a candidate of generation 0): its worker kills itself (SIGKILL) mid-evaluation, once
    run_search(SearchConfig.from_dict(tiny_config(zoo_dir)), run_dir=tmp_path / "run", quiet=True, workers=2,
               builder_factory=killing_builder(3, 1, tmp_path))
    local_ray.update(worker_pids(tmp_path / "run"))
    assert kills(tmp_path) == 1
    assert re.search(r"died while scoring candidate g0/\d", capfd.readouterr().err)
    got = RunFolder.open(tmp_path / "run").records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 8  # every candidate exactly once
    assert history(got) == history(RunFolder.open(reference).records())


def test_a_candidate_whose_worker_dies_twice_gets_the_penalty(zoo_dir, local_ray, tmp_path):
    cfg = tiny_config(zoo_dir, budget={"generations": 1}, background=False)
    run_search(SearchConfig.from_dict(cfg), run_dir=tmp_path / "run", quiet=True, workers=2,
               builder_factory=killing_builder(3, 2, tmp_path))
    local_ray.update(worker_pids(tmp_path / "run"))
    assert kills(tmp_path) == 2
    got = RunFolder.open(tmp_path / "run").records()
    cands = {(r.generation, r.index): r for r in got if r.type == "candidate"}
    assert len(cands) == 4 and sum(r.type == "candidate" for r in got) == 4
    bad = [r for r in cands.values() if r.status != "ok"]
    assert len(bad) == 1 and bad[0].fitness == -1.0 and "died twice" in bad[0].reason
    assert got[-1].type == "final"


def test_sigterm_with_ray_workers_then_resume(zoo_dir, reference, tmp_path):
    """Through the CLI: a private local Ray in the search's process group; SIGTERM to the group
    stops the search cleanly (exit 143, nothing half-logged) and leaves no Ray behind; the run
    resumes exactly (here in-process: the background work is frozen with the run)."""
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(tiny_config(zoo_dir)))
    run_dir = tmp_path / "run"
    tmp = tempfile.mkdtemp(prefix="r8c", dir="/tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=tmp,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = cli_process.start("search", "--quiet", cfg, "--run-dir", run_dir, "--workers", "2", env=env)
    try:
        while p.poll() is None and not ((run_dir / LOG).is_file() and (run_dir / LOG).read_bytes().count(b"\n") >= 3):
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 143, out
    assert "Resume with: evomerge search --resume" in out and "Traceback" not in out
    assert_gone(worker_pids(run_dir), tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    r = cli_process.run("search", "--quiet", "--resume", run_dir, "--workers", "0", env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = RunFolder.open(run_dir).records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 8
    assert history(got) == history(RunFolder.open(reference).records())



@pytest.mark.parametrize("target", ["driver", "group"])
def test_no_ray_process_outlives_a_killed_search(zoo_dir, tmp_path, target):
    """`kill -9` of the search's process alone (a user's kill of the PID), or of its whole process
    group: the private local Ray it started (GCS, raylet, workers) goes with it."""
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(tiny_config(zoo_dir, budget={"generations": 50})))
    run_dir = tmp_path / "run"
    tmp = tempfile.mkdtemp(prefix="r8k", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = cli_process.start("search", "--quiet", cfg, "--run-dir", run_dir, "--workers", "2", env=env)
    try:
        # two candidates logged: the workers are up and scoring
        while p.poll() is None and not ((run_dir / LOG).is_file() and (run_dir / LOG).read_bytes().count(b"\n") >= 4):
            time.sleep(0.05)
        assert p.poll() is None, "the search ended before the kill"
        workers = worker_pids(run_dir)
        assert workers and all(psutil.pid_exists(w) for w in workers) and ray_processes(tmp), "no Ray to kill"
        (os.kill if target == "driver" else os.killpg)(p.pid, signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
        assert_gone(workers, tmp)
    finally:
        for q in ray_processes(tmp):  # whatever a failed check left: not into the next test
            q.kill()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def on_two_workers_and_in_process(cfg: dict, tmp_path, local_ray) -> list:
    """Runs ``cfg`` on 2 Ray workers and in-process; asserts the same history; the Ray run's records."""
    run_search(SearchConfig.from_dict(cfg), run_dir=tmp_path / "ray2", quiet=True, workers=2)
    local_ray.update(worker_pids(tmp_path / "ray2"))
    run_search(SearchConfig.from_dict(cfg), run_dir=tmp_path / "local", quiet=True, workers=0)
    got = RunFolder.open(tmp_path / "ray2").records()
    assert history(got) == history(RunFolder.open(tmp_path / "local").records())
    return got


def test_racing_on_two_workers_equals_in_process(zoo_dir, local_ray, tmp_path):
    # racing's stages are batches of their own; per-item scores come back from the workers and are
    # reused by the next stage, and the background re-scoring ranks by the race's told values
    cfg = tiny_config(zoo_dir, tasks=[{"name": "zoo_rev", "metric": "acc"}],
                      racing={"stages": [4, 8, 16], "keep": 0.5})
    got = on_two_workers_and_in_process(cfg, tmp_path, local_ray)
    stages = [r for r in got if r.type == "candidate"]
    assert {r.stage for r in stages} == {0, 1, 2}
    # stage 1 scored only the 4 items that stage 0 had not
    assert all(r.items_scored == {"zoo_rev": 4} for r in stages if r.stage == 1)


def test_m2n2_on_two_workers_equals_in_process(zoo_dir, local_ray, tmp_path):
    # M2N2 asks two candidates ahead (in_flight 2): both workers score candidates, and the archive
    # is told the per-item scores that come back from them in log order
    cfg = tiny_config(zoo_dir, tasks=[{"name": "zoo_rev", "metric": "acc", "limit": 16},
                                      {"name": "zoo_add", "metric": "acc", "limit": 16}],
                      optimizer={"name": "m2n2", "popsize": 4, "m2n2": {"archive_size": 4}}, racing=None)
    got = on_two_workers_and_in_process(cfg, tmp_path, local_ray)
    cands = [r for r in got if r.type == "candidate"]
    assert len(cands) == 8 and {r.worker.split("@")[0] for r in cands} == {"w0", "w1"}
    assert len({r.eval_key for r in cands}) == 1  # one item subset for every candidate


def test_the_ray_executor_has_what_the_loop_uses(zoo_dir, local_ray):
    from evomerge.execution.registry import make_executor_factory
    from evomerge.search.jobs import Executor, ExecutorFactory

    factory = make_executor_factory(1)
    assert isinstance(factory, ExecutorFactory) and factory.uses_ray
    ex = factory(SearchConfig.from_dict(tiny_config(zoo_dir)), None, None)
    try:
        local_ray.update(ex.worker_pids)
        assert isinstance(ex, Executor)
        assert ex.pipelined is True and ex.should_stop() is False
        assert list(ex.run([])) == []
    finally:
        ex.close()
