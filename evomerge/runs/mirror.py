"""Copies of the run log kept elsewhere (the Optuna study, an MLflow run), written off the search's thread.

A mirror is a `SearchObserver`: it is told the records the search logs, and a thread of its own
brings its copy up to date. The search never waits for it, and an error in it (a storage that is
down, a full disk on a tracking server) is reported once and retried with a growing pause, never
raised into the search. The run log stays the truth: what a mirror missed (a kill, a storage that
stayed down to the end) is filled in from the log at the next resume, or on demand
(``evomerge study sync``), because each mirror's ``sync`` compares the whole log with its copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from evomerge.search.records import Record

RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # pauses between attempts while a storage is down


class MirrorDisabled(Exception):
    """An error that no retry mends (a study of another run under the same name): the mirror stops."""


def local_store_problem(url: str) -> str | None:
    """Why a SQLite or file store at ``url`` can never be created, or None: its path, or a folder
    above it, is an existing file (a store's folders are made when it is first written)."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if url.startswith(prefix):
            path = Path(url[len(prefix):]).expanduser()
            break
    else:
        if "://" in url:
            return None
        path = Path(url).expanduser()
    if prefix == "sqlite:///" and path.is_dir():
        return f"{path} is a folder, not a database file"
    for above in path.parents:
        if above.exists():
            return None if above.is_dir() else f"{above} is a file, so nothing can be created under it"
    return None


def new_sqlite(url: str, create: Callable[[str], None]) -> None:
    """A SQLite store that does not exist yet is created under a temporary name and renamed into
    place: a search killed while the schema is being written (MLflow's takes seconds) leaves no
    half-made database behind. Other URLs are left to their server."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():
        return
    for old in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed search
        old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    create(f"sqlite:///{tmp}")
    os.replace(tmp, path)


class LogMirror:
    """Base of the mirrors: subclasses implement ``sync(records)``, which makes the copy hold every
    record given (all the log's records so far) and must be idempotent."""

    name = "mirror"

    def __init__(self, report: Callable[[str], None], records: Callable[[], list[Record]] | None = None):
        self.report = report
        self._load = records  # the run log's records, for a mirror that never saw a search start
        self._records: list[Record] = []
        self._version = 0  # records added so far; ``synced`` is the count the copy holds
        self.synced = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.disabled = False
        self.popsize: int | None = None

    def sync(self, records: list[Record]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ SearchObserver
    def message(self, text: str) -> None:
        pass

    def start(self, generations, popsize: int, records: list) -> None:
        self.popsize = popsize
        self._add(records)
        self._thread = threading.Thread(target=self._loop, name=f"evomerge-{self.name}", daemon=True)
        self._thread.start()

    def logged(self, record) -> None:
        self._add([record])

    def _add(self, records: list) -> None:
        if not records:
            return
        with self._lock:
            self._records.extend(records)
            self._version = len(self._records)
        self._wake.set()

    # ------------------------------------------------------------------ the writer thread
    def attempt(self) -> bool:
        """One sync of everything told so far; False when it failed (reported on the first failure)."""
        with self._lock:
            version, records = self._version, list(self._records)
        if self.disabled or (version == self.synced and not self.failures):
            return not self.disabled
        try:
            self.sync(records)
        except MirrorDisabled as e:
            self.disabled = True
            self.report(f"{self.name}: {e}; it is off for this search (the search goes on)")
            return False
        except Exception as e:  # noqa: BLE001  (whatever the storage raises, the search goes on)
            self.failures += 1
            if self.failures == 1:
                self.report(f"{self.name}: cannot write ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                            "retrying in the background, the search goes on")
            return False
        if self.failures:
            self.report(f"{self.name}: written again after {self.failures} failed attempts; up to date")
        self.failures = 0
        self.synced = version
        return True

    def _loop(self) -> None:
        while True:
            pause = RETRY_S[min(self.failures, len(RETRY_S)) - 1] if self.failures else None
            self._wake.wait(timeout=pause)
            self._wake.clear()
            closing = self._closing
            self.attempt()
            if closing or self.disabled:
                return

    @property
    def writing(self) -> bool:
        """The writer thread is still running (a close whose wait timed out)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def behind(self) -> int:
        return self._version - self.synced

    def close(self, timeout: float = 30.0) -> None:
        """Writes what is left (waiting at most ``timeout`` seconds), and says so when the copy is behind."""
        if self._thread is None:  # no search ran (a finished run resumed): bring the copy up to date here
            if self._load is not None:
                self._add(self._load())
            self.attempt()
        else:
            self._closing = True
            self._wake.set()
            self._thread.join(timeout)
        if self.behind and not self.disabled:
            self.report(f"{self.name}: {self.behind} records of the log are not in it yet; the next resume, "
                        "or `evomerge study sync RUN_DIR`, fills them in from the log")


class Observers:
    """Tells several observers (the progress display, the mirrors) the same things."""

    def __init__(self, *observers):
        self.observers = observers

    def message(self, text: str) -> None:
        for o in self.observers:
            o.message(text)

    def start(self, generations, popsize: int, records: list) -> None:
        for o in self.observers:
            o.start(generations, popsize, records)

    def logged(self, record) -> None:
        for o in self.observers:
            o.logged(record)

