"""Helpers of the Ray tests: a tiny search config, and checks that no Ray process is left behind."""

from __future__ import annotations

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
            if ":" in str(r.get("worker", ""))}


def assert_gone(pids, tmp: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        left = ray_processes(tmp)
        if not alive and not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ray left behind: workers {alive}, processes {[p.pid for p in left]}")
