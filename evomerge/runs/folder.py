"""The run folder: everything about one search, written so that a kill at any byte loses nothing.

    RUN_DIR/
      config.yaml          the frozen, resolved search config (the search space inline)
      tasks.json           the tasks' fingerprints, checked on resume (runs/frozen.py)
      sources.json         the sources' file hashes, checked on resume and materialize (runs/source_hashes.py)
      lock                 the live search's lease (runs/lock.py): its pid, host, heartbeat
      log.jsonl            append-only, one JSON record a line, fsynced after each record
      optimizer.json       the optimizer's state snapshot after the last complete generation
      best.yaml            the best recipe so far (evomerge format, with mask_seed)
      best.mergekit.yaml   the same recipe for mergekit-yaml
      sessions.jsonl       when each (re)start happened, on which host (not part of the history)
      items/               per-item scores of evaluated recipes (evomerge/items.py)
      pareto.json          multi-objective runs (nsga2): the non-dominated candidates so far
      optuna.db, study.json  the Optuna study mirroring the log (runs/study.py); mlflow.* (runs/tracking.py)

Only complete lines (ending in a newline) of the log count: a record torn by a kill is dropped
when the log is read, and cut off before the next append.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from evomerge.core.errors import RunFolderError
from evomerge.core.io import atomic_write_text
from evomerge.core.version import __version__
from evomerge.recipes.layer_path import AnyRecipe, load_recipe
from evomerge.runs.lock import RunLock, acquire_lock
from evomerge.search.history import RunHistory
from evomerge.search.pareto import dominates, pareto_front  # noqa: F401  (re-exported)
from evomerge.search.records import (
    Record,
    RecordKind,
    check_header,
    from_json,
    header,
    is_header,
    to_json,
)

CONFIG, LOG, OPTIMIZER, BEST, BEST_MK, LOCK, SESSIONS, PARETO = (
    "config.yaml", "log.jsonl", "optimizer.json", "best.yaml", "best.mergekit.yaml", "lock", "sessions.jsonl",
    "pareto.json")
# What a run folder holds before its first record: it may start over (RunFolder.create).
RESTARTABLE = (CONFIG, LOG, SESSIONS, "tasks.json", "sources.json")
# Fields that differ between runs with the same history (see conventions: "same history").
VOLATILE_FIELDS = ("time", "worker", "node", "host", "timings", "elapsed_s")


def _record_count(path: Path) -> int:
    p = path / LOG
    return len(parse_log(read_records(p.read_bytes())[0])) if p.is_file() else 0


def read_records(data: bytes) -> tuple[list[dict], int]:
    """Complete JSON lines of a log's bytes (the header included), and the byte length they span."""
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].split(b"\n"):
        if line.strip():
            records.append(json.loads(line))
    return records, end


def parse_log(lines: list[dict]) -> list[Record]:
    """Typed records of a log's JSON lines; the header (format 2 on) is checked and left out."""
    if lines and is_header(lines[0]):
        check_header(lines[0])
        lines = lines[1:]
    return [from_json(d) for d in lines]


# Records written at fixed points of the loop; between two of them, evaluation records may arrive in
# any order (parallel workers, a resume that serves a repeated recipe from the cache earlier).
BARRIER_TYPES = (RecordKind.GENERATION, RecordKind.FINAL)
# Background work (re-scoring of the top candidates, test scores of a new best) runs whenever a
# worker is free: its records may land anywhere in the log. Their set is fixed by the history, so
# they are compared as a set: sorted into their own section at the end.
ORDER_FREE_TYPES = (RecordKind.RESCORE, RecordKind.TEST)


def history(records: list) -> list[dict]:
    """Records (typed, or their JSON) without their volatile fields, evaluation records in a
    canonical order between the barriers, background records (ORDER_FREE_TYPES) sorted at the end:
    equal for runs with the same history. A steady-state engine's blocks overlap in the log (its
    workers score the next block's candidates while a block is told): a candidate of a later block
    logged before a ``steady`` generation record belongs to its own block."""
    out, block, free = [], [], []

    def flush(upto: int | None = None):
        """Emits the block (``upto``: only up to that generation's candidates; the later ones stay)."""
        later = [r for r in block if upto is not None and r["type"] == RecordKind.CANDIDATE
                 and r["generation"] > upto]
        done = sorted((r for r in block if not any(r is x for x in later)),
                      key=lambda r: (r["type"], r.get("generation", 0), r.get("index", 0), r.get("stage", 0)))
        out.extend(done)
        block[:] = later

    for r in records:
        r = {k: v for k, v in (r if isinstance(r, dict) else to_json(r)).items() if k not in VOLATILE_FIELDS}
        if r["type"] in ORDER_FREE_TYPES:
            free.append(r)
        elif r["type"] in BARRIER_TYPES:
            flush(r.get("generation") if r.get("steady") else None)
            out.append(r)
        else:
            block.append(r)
    flush()
    free.sort(key=lambda r: (r["type"], r.get("generation", 0), r.get("index", 0), r.get("stage", 0),
                            r.get("recipe_hash", "")))
    return out + free


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: RunLock | None = None  # the held lock (append() checks it)
        self._log = None
        self._history = RunHistory()  # the log's records read so far, up to byte _read_to
        self._read_to = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, config_yaml: str) -> RunFolder:
        """A new run folder; or one that holds a config but no records yet (a search that failed
        before its first evaluation, say while loading models), which starts over with this config."""
        run = cls(path)
        where = f"run_dir (--run-dir) {str(run.path)!r}"
        if run.path.exists() and not run.path.is_dir():
            raise RunFolderError(f"{where} is a file, not a folder; choose another run_dir")
        if run.path.is_dir() and any(run.path.iterdir()):
            if not (run.path / CONFIG).is_file():
                raise RunFolderError(f"{where} exists and is not empty, and it is not a run folder (no {CONFIG}); "
                                     "choose another run_dir or empty it")
            lock = acquire_lock(run.path / LOCK, run.path)  # refused while a live search holds it
            n = _record_count(run.path)
            # anything else (a staged search's stages/, items/, a checkpoint) is a search's result
            others = sorted(p.name for p in run.path.iterdir() if p.name not in RESTARTABLE and p.name != LOCK)
            if n or others:
                lock.release()
                held = f"{n} records" if n else ", ".join(others)
                raise RunFolderError(f"run folder {str(run.path)!r} already holds a search ({held}); resume it "
                                     f"with `evomerge search --resume {run.path}` (a CONFIG given with it may raise "
                                     "the budget), or delete the folder or choose another run_dir (--run-dir) to "
                                     "start a new search")
            run._lock = lock
            run._session()
            atomic_write_text(run.path / CONFIG, config_yaml)
            return run
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"{where}: cannot create it: {e.strerror or e}") from None
        run.acquire()
        atomic_write_text(run.path / CONFIG, config_yaml)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunFolderError(f"{str(run.path)!r} is a file, not a run folder")
        if not run.path.is_dir():
            raise RunFolderError(f"run folder {str(run.path)!r} does not exist")
        if not (run.path / CONFIG).is_file():
            raise RunFolderError(f"{str(run.path)!r} is not a run folder (no {CONFIG})")
        return run

    def acquire(self) -> None:
        """Takes the run folder's lock (lock.py: a lease that holds on network file systems)."""
        self._lock = acquire_lock(self.path / LOCK, self.path)
        self._session()

    def _session(self) -> None:
        with open(self.path / SESSIONS, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}) + "\n")

    @property
    def lock_lost(self) -> bool:
        """True when the lease was lost (the heartbeat could not renew it): stop writing."""
        return self._lock is not None and self._lock.lost

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ contents
    def config_text(self) -> str:
        return (self.path / CONFIG).read_text()

    def config_dict(self) -> dict:
        return yaml.safe_load(self.config_text())

    def read_history(self) -> RunHistory:
        """The log's complete records as a `RunHistory`, brought up to date by reading only the
        bytes appended since the last call (a log that shrank, rewritten by hand, is read anew)."""
        p = self.path / LOG
        if not p.is_file():
            self._history, self._read_to = RunHistory(), 0
            return self._history
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size < self._read_to:
                self._history, self._read_to = RunHistory(), 0
            f.seek(self._read_to)
            lines, end = read_records(f.read())
        if self._read_to == 0:
            self._history = RunHistory(parse_log(lines))
        else:
            self._history.extend(from_json(d) for d in lines)
        self._read_to += end
        return self._history

    def records(self) -> list[Record]:
        """The log's complete records, typed (search.records), in log order."""
        return list(self.read_history().records)

    def _check_lease(self) -> None:
        if self._lock is None:
            raise RuntimeError("a write without holding the run folder's lock")
        if self._lock.lost:  # another process may own the folder now: writing could corrupt it
            raise RunFolderError(f"run folder {str(self.path)!r}: this search lost its lock (its lease was not "
                                 "renewed in time); nothing more is written. Resume it with "
                                 f"`evomerge search --resume {self.path}` once no other search uses the folder")

    def append(self, record: Record) -> None:
        """Appends one record and fsyncs it; the first call cuts off a torn tail, and writes the
        format header into a new log. A record with a non-finite number is refused (JSON has none)."""
        self._check_lease()
        if self._log is None:
            p = self.path / LOG
            end = 0
            if p.is_file():
                _, end = read_records(p.read_bytes())
                with open(p, "r+b") as f:
                    f.truncate(end)
            self._log = open(p, "ab")
            if end == 0:
                self._log.write(json.dumps(header(__version__)).encode() + b"\n")
        self._log.write(json.dumps(to_json(record), allow_nan=False).encode() + b"\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def write_json(self, name: str, data: dict) -> None:
        self.write_text(name, json.dumps(data, indent=1) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """An atomic write of a file of the folder (config, checkpoints), under the same lease as appends."""
        self._check_lease()
        atomic_write_text(self.path / name, text)

    # ------------------------------------------------------------------ the search's checkpoints
    def write_optimizer(self, state: dict) -> None:
        self.write_json(OPTIMIZER, state)

    def write_pareto(self, front: dict) -> None:
        self.write_json(PARETO, front)

    def write_best(self, recipe_yaml: str, mergekit_yaml: str) -> None:
        self.write_text(BEST, recipe_yaml)
        self.write_text(BEST_MK, mergekit_yaml)

    def read_best(self) -> AnyRecipe | None:
        p = self.path / BEST
        return load_recipe(p) if p.is_file() else None
