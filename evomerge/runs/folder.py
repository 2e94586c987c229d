"""The run folder: everything about one search, written so that a kill at any byte loses nothing.

    RUN_DIR/
      config.yaml          the frozen, resolved search config
      lock                 held (flock) by the live search; holds its pid
      log.jsonl            append-only, one JSON record a line, fsynced after each record
      optimizer.json       the optimizer's state snapshot after the last complete generation
      best.yaml            the best recipe so far (evomerge format, with mask_seed)
      best.mergekit.yaml   the same recipe for mergekit-yaml
      sessions.jsonl       when each (re)start happened, on which host (not part of the history)
      items/               per-item scores of evaluated recipes (evomerge/items.py)
      pareto.json          multi-objective runs (nsga2): the non-dominated candidates so far

Only complete lines (ending in a newline) of the log count: a record torn by a kill is dropped
when the log is read, and cut off before the next append.
"""

from __future__ import annotations

import fcntl
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
from evomerge.search.pareto import dominates, pareto_front  # noqa: F401  (re-exported)
from evomerge.search.records import Record, check_header, from_json, header, to_json

CONFIG, LOG, OPTIMIZER, BEST, BEST_MK, LOCK, SESSIONS, PARETO = (
    "config.yaml", "log.jsonl", "optimizer.json", "best.yaml", "best.mergekit.yaml", "lock", "sessions.jsonl",
    "pareto.json")
# Fields that differ between runs with the same history (see conventions: "same history").
VOLATILE_FIELDS = ("time", "worker", "host", "timings", "elapsed_s")


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
    if lines and lines[0].get("type") == "header":
        check_header(lines[0])
        lines = lines[1:]
    return [from_json(d) for d in lines]


# Records written at fixed points of the loop; between two of them, evaluation records may arrive in
# any order (parallel workers, a resume that serves a repeated recipe from the cache earlier).
BARRIER_TYPES = ("generation", "final")
# Background work (re-scoring of the top candidates, test scores of a new best) runs whenever a
# worker is free: its records may land anywhere in the log. Their set is fixed by the history, so
# they are compared as a set: sorted into their own section at the end.
ORDER_FREE_TYPES = ("rescore", "test")


def history(records: list) -> list[dict]:
    """Records (typed, or their JSON) without their volatile fields, evaluation records in a
    canonical order between the barriers, background records (ORDER_FREE_TYPES) sorted at the end:
    equal for runs with the same history."""
    out, block, free = [], [], []

    def flush():
        block.sort(key=lambda r: (r["type"], r.get("generation", 0), r.get("index", 0), r.get("stage", 0)))
        out.extend(block)
        block.clear()

    for r in records:
        r = {k: v for k, v in (r if isinstance(r, dict) else to_json(r)).items() if k not in VOLATILE_FIELDS}
        if r["type"] in ORDER_FREE_TYPES:
            free.append(r)
        elif r["type"] in BARRIER_TYPES:
            flush()
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
        self._lock_fd: int | None = None
        self._log = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, config_yaml: str) -> RunFolder:
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            if (run.path / CONFIG).is_file():
                raise RunFolderError(f"run folder {str(run.path)!r} already holds a search; resume it with "
                                     f"`evomerge search --resume {run.path}` or choose another run_dir")
            raise RunFolderError(f"run folder {str(run.path)!r} exists and is not empty")
        run.path.mkdir(parents=True, exist_ok=True)
        run.acquire()
        atomic_write_text(run.path / CONFIG, config_yaml)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        run = cls(path)
        if not run.path.is_dir():
            raise RunFolderError(f"run folder {str(run.path)!r} does not exist")
        if not (run.path / CONFIG).is_file():
            raise RunFolderError(f"{str(run.path)!r} is not a run folder (no {CONFIG})")
        return run

    def acquire(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderError(f"run folder {str(self.path)!r} is locked by a live search (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        with open(self.path / SESSIONS, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}) + "\n")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ contents
    def config_text(self) -> str:
        return (self.path / CONFIG).read_text()

    def config_dict(self) -> dict:
        return yaml.safe_load(self.config_text())

    def records(self) -> list[Record]:
        """The log's complete records, typed (search.records), in log order."""
        p = self.path / LOG
        return parse_log(read_records(p.read_bytes())[0]) if p.is_file() else []

    def append(self, record: Record) -> None:
        """Appends one record and fsyncs it; the first call cuts off a torn tail, and writes the
        format header into a new log. A record with a non-finite number is refused (JSON has none)."""
        if self._lock_fd is None:
            raise RuntimeError("append without holding the run folder's lock")
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
        atomic_write_text(self.path / name, json.dumps(data, indent=1) + "\n")

    def write_text(self, name: str, text: str) -> None:
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
