"""Ray workers (``evomerge search --workers N``): candidates built and scored on Ray actors.

Each worker is a Ray actor that loads, once, the sources into the candidate builder (the in-place
merger, or the data-flow path builder), the tokenizer and the lm-eval tasks, with a fixed torch
thread count, and then builds and scores each job it is given in place. One GPU per worker when
the config's device is CUDA (Ray sets the worker's visible device), CPU workers otherwise.

`RayExecutor` hands jobs to workers as they free up: a batch's jobs first, then (pipelined) the
search's background work. A worker that dies (killed, out of memory, a CUDA error) is restarted by
Ray and the job it held runs again; a job whose worker dies twice gets the penalty fitness, with
the reason in its record. Jobs are pure functions of (recipe, items, settings), so the results do
not depend on which worker scored them, nor on how many there are.

Sources reach the workers from a path that every node can read (``sources="path"``: the
config's folders), or through Ray's object store (``sources="object_store"``: streamed in chunks
into each worker's local temporary folder, never through the driver's memory; execution/sources.py).
Workers are spread over the cluster's nodes; each record names the Ray node that scored it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.core.errors import ConfigError, ExecutionError
from evomerge.evaluation.trial import TrialResult
from evomerge.execution import SOURCES, ExecutorKind
from evomerge.execution.factory import Factory
from evomerge.execution.local import run_job
from evomerge.execution.sources import ShippedSources, remove_local
from evomerge.execution.sources import fetch as fetch_sources
from evomerge.execution.sources import ship as ship_sources
from evomerge.search.jobs import BackgroundWork, EvalJob
from evomerge.search.records import RecordKind

MAX_RESTARTS = 4  # Ray restarts of one worker; after that it is given up
START_TIMEOUT_S = float(os.environ.get("EVOMERGE_WORKER_START_TIMEOUT", 900))
CONNECT_TIMEOUT_S = 10.0  # a Ray address that does not answer a TCP connection in this time
# Environment variables a worker gets from the driver (task folders, offline switches, test hooks).
FORWARDED_ENV = ("EVOMERGE_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TOKENIZERS_PARALLELISM", "TQDM_DISABLE")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


# ----------------------------------------------------------------------------- sources
def source_names(cfg) -> list[str]:
    return list(dict.fromkeys([*cfg.models, *([cfg.base_model] if cfg.base_model else [])]))


def relocate_recipe(recipe, rename: dict[str, str]):
    from evomerge.recipes.layer_path import rename_models

    data = rename_models(recipe.model_dump(mode="json", exclude_none=True), rename)
    return type(recipe).from_dict(data)


# ----------------------------------------------------------------------------- the actor
class EvalWorker:
    """One worker: sources, tokenizer and tasks loaded once; scores jobs in place."""

    def __init__(self, cfg, name: str, threads: int, builder_factory=None,
                 shipped: ShippedSources | None = None):
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from evomerge.core.env import quiet_libraries
        from evomerge.evaluation.fitness import FitnessFunction
        from evomerge.evaluation.trial import make_builder
        from evomerge.models.folders import load_tokenizer
        from evomerge.search.validation import check_tasks

        quiet_libraries()
        torch.set_num_threads(threads)
        import ray

        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self.pid = os.getpid()
        self.node = ray.get_runtime_context().get_node_id()
        self.slot, self.shipped = name, shipped
        self.rename: dict[str, str] = {}
        if shipped:
            self.rename = fetch_sources(shipped, name)
            cfg = cfg.model_copy(update={"models": [self.rename[m] for m in cfg.models],
                                         "base_model": self.rename.get(cfg.base_model, cfg.base_model)})
        if cfg.device.startswith("cuda"):
            cfg = cfg.model_copy(update={"device": "cuda"})  # Ray made this worker's GPU the only visible one
        self.cfg = cfg
        self.fitness = FitnessFunction(cfg.tasks, check_tasks(cfg), cfg.seed, floors=cfg.floors)
        self.tokenizer = load_tokenizer(cfg.tokenizer_folder(), trust_remote_code=cfg.trust_remote_code)
        self.builder = (builder_factory or make_builder)(cfg)

    def ready(self) -> dict:
        return {"name": self.name, "pid": self.pid, "host": socket.gethostname(), "node": self.node}

    def remove_sources(self) -> None:
        """Deletes this worker's local copy of shipped sources (before the executor kills it)."""
        if self.shipped:
            remove_local(self.shipped.token, self.slot)

    def run(self, job: EvalJob) -> TrialResult:
        local = job if not self.rename else EvalJob(job.kind, job.generation, job.index, job.genome,
                                                     relocate_recipe(job.recipe, self.rename), job.samples,
                                                     job.eval_key)
        res = run_job(local, self.builder, self.fitness, self.tokenizer, penalty=self.cfg.penalty_fitness,
                      batch_size=self.cfg.batch_size)
        if res.status != "ok" and "CUDA error" in (res.reason or ""):
            # The CUDA context is unusable after such an error: die, so that Ray restarts this
            # worker and the job runs again on a fresh one.
            print(f"evomerge worker {self.name}: {res.reason}; exiting", file=sys.stderr, flush=True)
            os._exit(3)
        res.recipe_hash = job.recipe.hash()
        res.worker, res.node = self.name, self.node
        return res


# ----------------------------------------------------------------------------- the executor
@dataclass
class _Slot:
    index: int
    name: str
    actor: Any
    deaths: int = 0
    busy: Any = None  # the ObjectRef in flight on it
    gone: bool = False
    info: dict | None = None


@dataclass
class _Flight:
    slot: _Slot
    job: EvalJob | None  # None: a revival check (waiting for a restarted worker)
    attempt: int
    origin: Any  # the run() call that owns it, a BackgroundWork, or None (dropped)
    t0: float


class RayExecutor:
    """Scores jobs on Ray actors, dispatched as workers free up (see the module docstring)."""

    def __init__(self, cfg, fitness, tokenizer, *, workers: int | str = "auto", threads: int | None = None,
                 address: str | None = None, sources: str = "path", builder_factory=None,
                 pipelined: bool = True, log=None):
        import ray

        if sources not in SOURCES:
            raise ConfigError(f"sources must be one of {', '.join(SOURCES)}, got {sources!r}")
        self.cfg, self.fitness, self.pipelined = cfg, fitness, pipelined
        self.penalty = cfg.penalty_fitness
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.threads = threads or cfg.threads or 1
        self.gpu = cfg.device.startswith("cuda")
        self._owns_ray = False
        self._inflight: dict[Any, _Flight] = {}
        self._bg_retry: deque[tuple[EvalJob, BackgroundWork, int]] = deque()
        self.deaths = 0
        # Set by the driver: True once SIGTERM asked the search to stop. A local Ray started here
        # shares the driver's process group, so a SIGTERM to the group stops its workers too: their
        # deaths are then not the candidates' faults and are not logged.
        self.should_stop = lambda: False
        self.slots: list[_Slot] = []
        self.shipped: ShippedSources | None = None
        if not ray.is_initialized():
            self._init_ray(address, workers)
        try:
            self._start(workers, sources, builder_factory)
        except BaseException:
            self.close()  # a Ray started here does not outlive a failed start
            raise

    def _start(self, workers, sources: str, builder_factory) -> None:
        import ray

        cfg = self.cfg
        n = self._count(workers)
        # The search space goes inline: a worker on another node need not find its file.
        wcfg = cfg.model_copy(update={"search_space": cfg.space})
        if sources == "object_store":
            self.shipped = ship_sources(source_names(cfg), uuid.uuid4().hex[:12])
        env = forwarded_env()
        # SPREAD: workers on as many nodes as the cluster has (a lost node takes fewer of them).
        cls = ray.remote(EvalWorker).options(
            num_cpus=self.threads, num_gpus=1 if self.gpu else 0, max_restarts=MAX_RESTARTS, max_task_retries=0,
            scheduling_strategy="SPREAD", runtime_env={"env_vars": env} if env else None)
        self.slots = [_Slot(i, f"w{i}", cls.remote(wcfg, f"w{i}", self.threads, builder_factory, self.shipped))
                      for i in range(n)]
        self._await_workers()

    # ------------------------------------------------------------------ set-up
    def _init_ray(self, address: str | None, workers) -> None:
        import logging

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        # ray.init installs its own SIGTERM handler (it aborts the process): keep the search's, which
        # stops it cleanly after the candidate in flight.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                want = self.threads * (workers if isinstance(workers, int) else 1)
                ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, want), **kw)
        finally:
            for s, h in handlers.items():
                if h is not None:
                    signal.signal(s, h)
        self._owns_ray = True

    def _count(self, workers) -> int:
        import ray

        if workers != "auto":
            n = int(workers)
            if n < 1:
                raise ConfigError("--workers must be at least 1 for Ray workers (0: in-process)")
            cpus = ray.cluster_resources().get("CPU", 0)
            if n * self.threads > cpus:  # the rest would wait for CPUs until START_TIMEOUT_S
                raise ConfigError(f"--workers {n}: each worker takes {self.threads} CPU (threads), and the Ray "
                                  f"cluster has {cpus:g}: give at most {max(int(cpus // self.threads), 1)}")
            return n
        if not self.gpu:
            return 1
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise ConfigError(f"device {self.cfg.device!r} needs GPUs, but the Ray cluster has none; use "
                             "device: cpu with --workers N")
        return gpus

    def _await_workers(self) -> None:
        import ray

        refs = {s.actor.ready.remote(): s for s in self.slots}
        done, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=START_TIMEOUT_S)
        if waiting:
            self.close()
            need = f"{self.threads} CPU" + (" and 1 GPU" if self.gpu else "")
            raise ExecutionError(f"{len(waiting)} of {len(refs)} Ray workers did not start within "
                               f"{START_TIMEOUT_S:.0f} s (each needs {need}; the cluster has "
                               f"{ray.cluster_resources()})")
        for ref in done:
            try:
                refs[ref].info = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.close()
                raise ExecutionError(f"Ray worker {refs[ref].name} failed to start: {_cause(e)}") from None

    @property
    def worker_pids(self) -> list[int]:
        return [s.info["pid"] for s in self.slots if s.info]

    # ------------------------------------------------------------------ scheduling
    def run(self, jobs, *, background: BackgroundWork | None = None):
        import ray

        owner = object()
        queue: deque[tuple[EvalJob, int]] = deque((job, 1) for job in jobs)
        left = len(queue)
        try:
            while True:
                self._dispatch(queue, owner, background)
                if jobs and left == 0:
                    return
                if not self._inflight:
                    if queue or self._bg_retry:
                        raise ExecutionError("every Ray worker is gone (each died more than "
                                           f"{MAX_RESTARTS} times); see the Ray logs")
                    return
                ref = ray.wait(list(self._inflight), num_returns=1)[0][0]
                fl = self._inflight.pop(ref)
                fl.slot.busy = None
                res = self._collect(ref, fl)
                if res is None:  # the worker died: run the job again
                    if fl.job is None or fl.origin is None:
                        continue
                    if fl.origin is owner:
                        queue.appendleft((fl.job, fl.attempt + 1))
                    else:
                        self._bg_retry.append((fl.job, fl.origin, fl.attempt + 1))
                    continue
                if fl.origin is owner:
                    left -= 1
                    yield fl.job, res
                elif fl.origin is not None:  # background work (None: a dropped run's job)
                    fl.origin.done(fl.job, res)
        finally:  # abandoned (an exception, SearchStopped): what it still has in flight is dropped
            for fl in self._inflight.values():
                if fl.origin is owner:
                    fl.origin = None

    def _dispatch(self, queue, owner, background) -> None:
        for slot in self.slots:
            if slot.gone or slot.busy is not None:
                continue
            if queue:
                (job, attempt), origin = queue.popleft(), owner
            elif self._bg_retry:
                job, origin, attempt = self._bg_retry.popleft()
            elif background is not None and (job := background.next()) is not None:
                origin, attempt = background, 1
            else:
                return
            ref = slot.actor.run.remote(job)
            slot.busy = ref
            self._inflight[ref] = _Flight(slot, job, attempt, origin, time.monotonic())

    def _collect(self, ref, fl: _Flight) -> TrialResult | None:
        import ray

        slot = fl.slot
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if self.should_stop():
                from evomerge.search.jobs import SearchStopped

                raise SearchStopped() from None
            if fl.job is None:  # the revival check: still restarting (try again), or dead for good
                if isinstance(e, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.5)
                    self._revive(slot)
                else:
                    slot.gone = True
                    self.log(f"worker {slot.name} is gone: {_cause(e)}")
                return None
            slot.deaths += 1
            self.deaths += 1
            if slot.deaths > MAX_RESTARTS:
                slot.gone = True
            reason = _cause(e)
            what = f"{fl.job.kind} g{fl.job.generation}/{fl.job.index}"
            if not slot.gone:
                self._revive(slot)
            if fl.attempt >= 2:
                self.log(f"worker {slot.name} died again while scoring {what}: it gets the penalty fitness")
                fitness = self.penalty if fl.job.kind != RecordKind.TEST else float("nan")
                return TrialResult(fl.job.recipe.hash(), fitness, "failed",
                                   f"the worker died twice while scoring it (last: {reason})",
                                   worker=(slot.info or {}).get("name", slot.name),
                                   node=(slot.info or {}).get("node"))
            self.log(f"worker {slot.name} died while scoring {what} ({reason}); Ray restarts it and the job "
                     "runs again")
            return None
        except ray.exceptions.RayTaskError as e:  # a bug, not a fault: as in-process, it stops the search
            raise e.as_instanceof_cause() from None
        if fl.job is None:
            slot.info = out
            return None
        return out

    def _revive(self, slot: _Slot) -> None:
        """Keeps the slot busy until its restarted actor answers, so no job is sent to a dead one."""
        if slot.gone:
            return
        ref = slot.actor.ready.remote()
        slot.busy = ref
        self._inflight[ref] = _Flight(slot, None, 0, None, time.monotonic())

    # ------------------------------------------------------------------ the rest of the interface
    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        if getattr(self, "shipped", None) is not None:
            live = [s.actor.remove_sources.remote() for s in getattr(self, "slots", []) if not s.gone]
            ray.wait(live, num_returns=len(live), timeout=10)
            try:
                ray.kill(self.shipped.server, no_restart=True)
            except Exception:  # noqa: BLE001  (already gone)
                pass
            self.shipped = None
        for s in getattr(self, "slots", []):
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        self.slots = []
        self._inflight.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def _cause(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "died" in ln.lower() or "error" in ln.lower() or "killed" in ln.lower()]
    text = (keep or lines or [type(e).__name__])[0]
    return text[:300]


def check_ray_setup(workers: int | str, address: str | None, threads: int) -> None:
    """Before a run folder exists: a Ray address nothing answers at (ray.init would retry for
    minutes), and more workers than a Ray started here has CPUs for (each takes ``threads``)."""
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if host and port.isdigit():
            try:
                socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
            except OSError as e:
                raise ConfigError(f"--ray-address {address}: nothing answers at {host}:{port} within "
                                  f"{CONNECT_TIMEOUT_S:.0f} s ({e.strerror or e}); start the cluster "
                                  "(ray start --head) or give its address") from None
    if not address and isinstance(workers, int) and workers >= 1:
        cpus = os.cpu_count() or 1
        if workers * threads > cpus:
            raise ConfigError(f"--workers {workers}: each worker takes {threads} CPU (threads: {threads}), and the "
                              f"Ray started here has this machine's {cpus}: give at most {max(cpus // threads, 1)}")


def ray_executor(workers: int | str = "auto", *, address: str | None = None, threads: int | None = None,
                 sources: str = "path", builder_factory=None, pipelined: bool = True) -> Factory:
    """An executor factory for `search.loop.Search`: Ray workers."""
    def make(cfg, fitness, tokenizer):
        return RayExecutor(cfg, fitness, tokenizer, workers=workers, threads=threads, address=address,
                           sources=sources, builder_factory=builder_factory, pipelined=pipelined)
    return Factory(ExecutorKind.RAY, make,
                   check=lambda cfg: check_ray_setup(workers, address, threads or cfg.threads or 1))
