"""`evomerge submit` and `evomerge jobs`: searches launched on a Ray cluster as Ray jobs.

`submit` sends ``evomerge search CONFIG --run-dir RUN --ray-address auto [--workers N]`` to the
cluster's Job Submission API (the dashboard's HTTP address, port 8265 by default). The search's
driver then runs on the cluster and its workers are the cluster's; the run folder must be on
storage that this machine and the cluster share (so that ``evomerge status RUN`` works here), and
the config and the model folders must be readable by the cluster at the paths given (or shipped
with ``--working-dir``, and ``--sources object_store`` for the models; see docs/ray.md).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from evomerge.core.errors import JobError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def _client(address: str):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise JobError(f"cannot reach Ray's job API at {address} (is it the dashboard address of a running "
                         f"cluster, http://HEAD:8265?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def build_entrypoint(config: Path | None, run_dir: Path, *, workers: int | str | None, sources: str) -> str:
    args = ["evomerge", "search", *([str(config), "--run-dir"] if config is not None else ["--resume"]),
            str(run_dir), "--quiet", "--ray-address", "auto"]
    if workers is not None:
        args += ["--workers", str(workers)]
    if sources != "path":
        args += ["--sources", sources]
    return shlex.join(args)


def submit(config: str | Path | None, address: str, *, run_dir: str | Path | None = None,
           workers: int | str | None = None, sources: str = "path", working_dir: str | Path | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None,
           resume: str | Path | None = None) -> tuple[str, Path, str]:
    """Submits the search (or, with ``resume``, the continuation of the one in that run folder);
    returns (submission id, run folder, entrypoint)."""
    from evomerge.core.errors import ConfigError
    from evomerge.search.config import SearchConfig, default_run_dir
    from evomerge.search.staged import StagedConfig, staged_file

    if (config is None) == (resume is None):
        raise ConfigError("give a CONFIG.yml to submit a new search, or --resume RUN_DIR (not both)")
    if resume is not None:
        run = Path(resume).resolve()
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"{resume} is not a run folder (no config.yaml); it must be on storage shared "
                              "with the cluster")
        cfg_path = None
    else:
        config = Path(config)
        cfg = StagedConfig.load(config) if staged_file(config) else SearchConfig.load(config)  # schema, here
        cfg_run_dir = cfg.data.get("run_dir") if hasattr(cfg, "data") else cfg.run_dir
        run = Path(run_dir or cfg_run_dir or default_run_dir(config)).resolve()
        cfg_path = config.resolve()
    runtime_env: dict = {}
    if working_dir is not None:
        wd = Path(working_dir).resolve()
        runtime_env["working_dir"] = str(wd)
        if cfg_path is not None and cfg_path.is_relative_to(wd):  # the job runs inside the uploaded copy
            cfg_path = cfg_path.relative_to(wd)
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("EVOMERGE_")}
    env_vars.update(env or {})
    if env_vars:
        runtime_env["env_vars"] = env_vars
    entry = build_entrypoint(cfg_path, run, workers=workers, sources=sources)
    client = _client(address)
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env or None, submission_id=submission_id,
                               metadata={"evomerge_run_dir": str(run), "evomerge_config": str(config)})
    return job_id, run, entry


def wait(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    client = _client(address)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def list_jobs(address: str) -> list[dict]:
    out = []
    for j in _client(address).list_jobs():
        meta = j.metadata or {}
        out.append({"id": j.submission_id or j.job_id, "status": str(j.status.value), "start": j.start_time,
                    "end": j.end_time, "run_dir": meta.get("evomerge_run_dir", ""), "entrypoint": j.entrypoint,
                    "message": j.message or ""})
    return sorted(out, key=lambda j: j["start"] or 0)
