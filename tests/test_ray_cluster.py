"""A real two-node Ray cluster on this machine (`ray start --head` and a second `ray start
--address ...`, each with its own resources and temporary folder, each in a process group of its
own): a search whose candidates run on both nodes (the node is in each record), sources by
shared path and through the object store, the head's job API (`evomerge submit`, `evomerge
jobs`), and the worker node killed mid-search. Every history equals the in-process run's.

The cluster is started once for the module and always torn down (its process groups killed, its
temporary folders checked for live processes and removed). The node-killing test runs last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cli_process
import pytest
import yaml
from ray_helpers import REPO, assert_gone, free_port, stop_process_group, tiny_config

from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).parent / "ray")


def config(zoo_dir: Path, generations: int = 1) -> dict:
    # one generation of 4, background at the end only: small, and still every kind of record
    return tiny_config(zoo_dir, budget={"generations": generations}, background=False)


def _nodes(dash: str) -> list[dict]:
    with urllib.request.urlopen(f"{dash}/api/v0/nodes?limit=20", timeout=10) as r:
        return json.load(r)["data"]["result"]["result"]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.tmps = [tempfile.mkdtemp(prefix=f"r21{k}", dir="/tmp") for k in "hw"]
        self.scratch = root / "scratch"  # the nodes' TMPDIR: where workers copy shipped sources
        self.scratch.mkdir()
        self.port, self.dash_port = free_port(), free_port()
        self.gcs, self.dash = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.dash_port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(self.scratch),
                        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        # a lost node is noticed within seconds, not the default half minute
                        RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="500",
                        RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
        self.procs: dict[str, subprocess.Popen] = {}
        self.head_id = self.second_id = ""

    def _start(self, name: str, args: list[str], tmp: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=200000000", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=2", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
                             f"--ray-client-server-port={free_port()}"], self.tmps[0])
        self._wait(lambda n: len(n) >= 1, "head")
        self._start("second", [f"--address={self.gcs}", "--num-cpus=1", '--resources={"second": 1}'], self.tmps[1])
        nodes = self._wait(lambda n: sum(x["state"] == "ALIVE" for x in n) == 2, "second")
        self.head_id = next(x["node_id"] for x in nodes if x["is_head_node"])
        self.second_id = next(x["node_id"] for x in nodes if "second" in x["resources_total"])

    def _wait(self, ok, name: str, timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = _nodes(self.dash)
                if ok(nodes):
                    return nodes
            except OSError:
                pass
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start: {(self.root / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def kill_second(self) -> None:
        """A crash: every process of the second node dies at once, nothing shuts down gracefully.
        Ray starts its workers in sessions of their own, so the node's process group alone would
        leave its worker running (and serving the search) after its raylet is gone."""
        import psutil

        tree = psutil.Process(self.procs["second"].pid).children(recursive=True)
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        stop_process_group(self.procs["second"], signal.SIGKILL)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process_group(proc)
        try:
            for tmp in self.tmps:
                assert_gone((), tmp)
        finally:
            for tmp in self.tmps:
                shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def expected(zoo_dir, tmp_path_factory):
    """The same search in-process: the history every cluster run must reproduce."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_search(SearchConfig.from_dict(config(zoo_dir)), run_dir=run_dir, quiet=True, workers=0)
    return history(RunFolder.open(run_dir).records())


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return cli_process.run(*args, env=env, timeout=timeout)


def write_config(zoo_dir: Path, tmp_path: Path, generations: int = 1) -> Path:
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(config(zoo_dir, generations)))
    return cfg


def nodes_of(records, kind: str = "candidate") -> set[str]:
    return {r.node for r in records if r.type == kind}


def test_submit_with_object_store_sources_then_jobs(cluster, expected, zoo_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = cli(cluster.env, "submit", str(write_config(zoo_dir, tmp_path)), "--address", cluster.dash, "--run-dir",
            str(run_dir), "--workers", "2", "--sources", "object_store", "--submission-id", "evomerge-2node",
            "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "job evomerge-2node: SUCCEEDED" in r.stdout
    got = RunFolder.open(run_dir).records()
    assert nodes_of(got) == {cluster.head_id, cluster.second_id}
    assert history(got) == expected
    # each worker streamed its own copy into its node's temporary folder, and removed it at the end
    assert not list(cluster.scratch.glob("evomerge-sources-*/*"))
    r = cli(cluster.env, "jobs", "--address", cluster.dash)
    assert r.returncode == 0 and "evomerge-2node" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout + r.stderr


def logged_nodes(log: Path, kind: str = "candidate") -> set[str]:
    out = set()
    for line in log.read_text().splitlines() if log.is_file() else ():
        try:
            record = json.loads(line)
            if record.get("type") == kind:
                out.add(record.get("node"))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def test_a_search_on_both_nodes_survives_the_worker_node_killed(cluster, expected, zoo_dir, tmp_path):
    """Sources by shared path, joined with --ray-address; the second node crashes (SIGKILL to its
    process group) once it has logged a candidate: its worker restarts on the head, a job it held
    runs again, every candidate is logged once, and the rest of the search runs on the head.
    Three generations, so that the crash lands with most of the search still to run (with one, the
    second node could finish the last job before the kill took effect)."""
    local = tmp_path / "local"
    run_search(SearchConfig.from_dict(config(zoo_dir, 3)), run_dir=local, quiet=True, workers=0)
    expected3 = history(RunFolder.open(local).records())
    run_dir = tmp_path / "run"
    p = cli_process.start("search", write_config(zoo_dir, tmp_path, 3), "--run-dir", run_dir, "--quiet",
                          "--ray-address", cluster.gcs, "--workers", "2", env=cluster.env)
    try:
        log = run_dir / LOG
        while p.poll() is None and cluster.second_id not in logged_nodes(log):
            time.sleep(0.1)
        cluster.kill_second()
        logged_before_kill = len(log.read_text().splitlines())
        out, _ = p.communicate(timeout=300)
    finally:
        stop_process_group(p)
    assert p.returncode == 0, out[-3000:]
    got = RunFolder.open(run_dir).records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 12
    assert nodes_of(got) == {cluster.head_id, cluster.second_id}  # SPREAD: a worker on each node
    lines = log.read_text().splitlines()[logged_before_kill:]
    after = [json.loads(line) for line in lines]
    late = [r for r in after if r.get("type") in ("candidate", "rescore", "test")]
    on_second = [(r["type"], r["generation"], r["index"]) for r in late if r["node"] != cluster.head_id]
    assert late and not on_second, (on_second, cluster.head_id)  # after the crash: the head only
    assert history(got) == expected3
