"""`evomerge submit` / `evomerge jobs` against a Ray head that the test starts on loopback (in its
own process group, stopped by killing that group), and `evomerge status` on the run folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cli_process
import pytest
import yaml
from ray_helpers import REPO, assert_gone, free_port, stop_process_group, tiny_config, worker_pids

from evomerge.runs.folder import RunFolder

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="r8h", dir="/tmp")
    dash = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", f"--temp-dir={tmp}",
         "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {Path(log.name).read_text()[-3000:]}") from None
                time.sleep(1)
        yield address, env, pids
    finally:
        stop_process_group(head)
        log.close()
        assert_gone(pids, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def cli(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return cli_process.run(*args, env=env, timeout=timeout)


def test_submit_then_jobs_then_status(ray_head, zoo_dir, tmp_path):
    address, env, pids = ray_head
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(tiny_config(zoo_dir, budget={"generations": 1}, background=False)))
    run_dir = tmp_path / "run"
    r = cli(env, "submit", str(cfg), "--address", address, "--run-dir", str(run_dir), "--workers", "1",
            "--submission-id", "evomerge-test-1", "--wait")
    records = RunFolder.open(run_dir).records() if (run_dir / "config.yaml").is_file() else []
    pids.update(worker_pids(run_dir) if records else ())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted evomerge-test-1" in r.stdout and "job evomerge-test-1: SUCCEEDED" in r.stdout
    assert records[-1].type == "final"
    assert all(r.worker.startswith("w0@") for r in records if r.type == "candidate")

    r = cli(env, "jobs", "--address", address)
    assert r.returncode == 0, r.stderr
    assert "evomerge-test-1" in r.stdout and "SUCCEEDED" in r.stdout
    r = cli(env, "status", str(run_dir))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr

    # a config that is not valid is refused here, before anything is sent
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [a]\nbudgett: {generations: 1}\n")
    r = cli(env, "submit", str(bad), "--address", address)
    assert r.returncode == 2 and "budgett" in r.stderr and "Traceback" not in r.stderr
