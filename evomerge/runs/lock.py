"""The run folder's lock: one writer per run folder, also on network file systems.

``flock`` is not reliable on NFS (and some cluster file systems ignore it), so the lock is
filelock's ``SoftFileLease``: a marker file created with O_EXCL that records the holder's pid,
host and a token, renewed by a heartbeat thread every third of the lease. What it promises
(docs/search.md, "The run folder"):

- one live search holds a run folder; a second one (any host) is refused, naming the holder;
- a lock left by a dead process on this host is taken over at once (its pid is gone);
- a lock left by a process on another host is taken over once its lease has gone unrenewed for
  ``EVOMERGE_LOCK_LEASE_S`` seconds (default 60), observed by the newcomer, which waits that
  long before giving up: every host must use the same value;
- a holder that stops renewing (suspended, or cut off from the file system) for longer than the
  lease can lose the lock; ``RunLock.lost`` says so.

Run folders of earlier versions hold a ``lock`` file with a bare pid (an flock target): it is
taken over when no process holds its flock, refused otherwise.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from filelock import SoftFileLease, Timeout

from evomerge.core.errors import RunFolderError

DEFAULT_LEASE_S = 60.0


def lease_seconds() -> float:
    raw = os.environ.get("EVOMERGE_LOCK_LEASE_S")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        raise RunFolderError(f"EVOMERGE_LOCK_LEASE_S: expected seconds, got {raw!r}") from None
    if not 0 < value < 1e6:
        raise RunFolderError(f"EVOMERGE_LOCK_LEASE_S: must be in (0, 1e6) seconds, got {raw!r}")
    return value


class RunLock:
    """A held run-folder lock, until ``release()`` or the process's end (as an flock on an open
    descriptor: a RunFolder dropped without close() keeps it)."""

    def __init__(self, lease: SoftFileLease):
        self._lease = lease
        _HELD.add(self)

    @property
    def lost(self) -> bool:
        return self._lease.compromise is not None

    def release(self) -> None:
        _HELD.discard(self)
        if self._lease.is_locked:
            self._lease.release()


_HELD: set[RunLock] = set()  # the locks this process holds (a lease released when collected otherwise)


def _holder(path: Path) -> dict[str, str]:
    """The marker's fields (pid, host, ...), or {"pid": ...} for an old bare-pid lock file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    lines = text.splitlines()
    if lines and lines[0].strip().isdigit() and len(lines) == 1:
        return {"pid": lines[0].strip(), "old": "1"}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _take_old_lock(path: Path, folder: Path) -> None:
    """An earlier version's lock file: free when no process holds its flock."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(f"run folder {str(folder)!r} is locked by a live search (pid {pid}, an earlier "
                                 "evomerge version)") from None
        path.unlink()
    finally:
        os.close(fd)


def acquire_lock(path: Path, folder: Path) -> RunLock:
    """Takes the lock at ``path`` or raises RunFolderError naming its holder."""
    if _holder(path).get("old"):
        _take_old_lock(path, folder)
    lease_s = lease_seconds()
    lease = SoftFileLease(path, lease_duration=lease_s)
    try:
        lease.acquire(timeout=0)
    except Timeout:
        holder = _holder(path)
        host = holder.get("host", "")
        if host and host != socket.gethostname() and not host.startswith(socket.gethostname()):
            # another host: only an unrenewed lease tells a dead holder; watch it for one lease
            try:
                lease.acquire(timeout=lease_s + 1)
                return RunLock(lease)
            except Timeout:
                holder = _holder(path)
        where = f" on host {holder['host']}" if holder.get("host") else ""
        raise RunFolderError(f"run folder {str(folder)!r} is locked by a live search (pid {holder.get('pid', '?')}"
                             f"{where}); wait for it to end, or stop it") from None
    return RunLock(lease)
