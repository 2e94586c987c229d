"""Helpers of the Ray tests: a tiny search config, and checks that no Ray process is left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from evomerge.runs.folder import RunFolder

REPO = Path(__file__).resolve().parent.parent


def tiny_config(zoo_dir: Path, **over) -> dict:
    cfg = {
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"),
        "search_space": "ps_task_arithmetic",
        # one task: the full-dev re-scoring (500 items) stays short
        "tasks": [{"name": "zoo_rev", "metric": "acc", "limit": 16}],
        "batch_size": 32,
        "threads": 1,
        "optimizer": {"name": "cma", "popsize": 4},
        "budget": {"generations": 2},
        "seed": 5,
        "rescore_top_k": 1,
        "background": True,
    }
    cfg.update(over)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(tmp: str) -> list[psutil.Process]:
    """Live processes of the Ray instance whose temporary folder is ``tmp`` (its session folder is
    on their command lines)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(tmp in a for a in p.info["cmdline"] or ()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def worker_pids(run_dir: Path) -> set[int]:
    return {int(r.worker.rsplit(":", 1)[1]) for r in RunFolder.open(run_dir).records()
            if ":" in str(getattr(r, "worker", None) or "")}


def assert_gone(pids, tmp: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        left = ray_processes(tmp)
        if not alive and not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ray left behind: workers {alive}, processes {[p.pid for p in left]}")


class KillingBuilder:
    """A candidate builder that makes its worker kill itself (SIGKILL) right after a merge: at the
    ``at``-th build counted across every worker (in ``folder``), and again each time that recipe
    is built, ``times`` kills in all. The fault the executor must survive, injected from the test."""

    def __init__(self, inner, at: int, times: int, folder: str):
        self.inner, self.at, self.times, self.state = inner, at, times, Path(folder) / "kills.json"

    @property
    def model(self):
        return self.inner.model

    def build(self, recipe):
        import fcntl
        import json
        import os
        import signal

        model = self.inner.build(recipe)
        with open(self.state.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            s = json.loads(self.state.read_text()) if self.state.is_file() else {"builds": 0, "target": None, "kills": 0}
            s["builds"] += 1
            if s["target"] is None and s["builds"] == self.at:
                s["target"] = recipe.hash()
            die = s["target"] == recipe.hash() and s["kills"] < self.times
            s["kills"] += die
            self.state.write_text(json.dumps(s))
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        return model


def killing_builder(at: int, times: int, folder: Path):
    """A builder factory for `run_search(builder_factory=...)`: the usual builder, wrapped."""
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import tests/

    def factory(cfg):
        from evomerge.evaluation.trial import make_builder

        return KillingBuilder(make_builder(cfg), at, times, str(folder))

    return factory


def kills(folder: Path) -> int:
    import json

    return json.loads((Path(folder) / "kills.json").read_text())["kills"]


def stop_process_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 3) -> None:
    """Stops a process started with start_new_session=True (a `ray start --block`) and its whole
    group: `sig`, then SIGKILL after `grace` s, then SIGKILL for what the leader left behind."""
    for s, wait in ((sig, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
