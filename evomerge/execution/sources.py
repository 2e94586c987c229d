"""Sources shipped through Ray's object store (``--sources object_store``), streamed in chunks.

The driver never reads the model folders' weights: a `SourceServer` actor, pinned to the driver's
node (where the folders are), reads a chunk of a file when a worker asks for it; the worker
writes each chunk into a local copy of the folder and drops it before asking for the next. So no
process holds more than a few chunks of a source at once, whatever the model's size, and the
driver's memory does not grow with it. A worker that Ray restarts (on its node, or on another
after its node died) fetches what its node lacks again, from the same server, which lives as long
as the executor; files already complete in its folder are kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = int(os.environ.get("EVOMERGE_SOURCE_CHUNK_MB", 32)) << 20
WINDOW = 2  # chunk requests a worker keeps in flight (one written while the next travels)

Manifest = dict[str, list[tuple[str, int]]]  # source folder -> (relative path, size) of each file


def manifest(folders: list[str]) -> Manifest:
    out: Manifest = {}
    for src in folders:
        root = Path(src)
        out[src] = [(str(p.relative_to(root)), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]
    return out


class SourceServer:
    """Reads chunks of the source folders' files, on request (a Ray actor on the driver's node)."""

    def __init__(self, files: Manifest):
        self.allowed = {(src, rel) for src, fs in files.items() for rel, _ in fs}

    def read(self, src: str, rel: str, offset: int, size: int) -> bytes:
        if (src, rel) not in self.allowed:  # only the manifest's files, never another path
            raise ValueError(f"{rel!r} is not a file of the shipped source {src!r}")
        with open(Path(src) / rel, "rb") as f:
            f.seek(offset)
            return f.read(size)


@dataclass(frozen=True)
class ShippedSources:
    """What a worker needs to fetch the sources: the server's handle and the files to ask for."""

    server: Any
    files: Manifest
    token: str  # names the workers' local folders (one per executor)


def ship(folders: list[str], token: str) -> ShippedSources:
    """Starts the source server on this (the driver's) node; reads no weights."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    files = manifest(folders)
    here = ray.get_runtime_context().get_node_id()
    server = ray.remote(SourceServer).options(
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(files)
    return ShippedSources(server, files, token)


def local_root(token: str, worker: str) -> Path:
    return Path(tempfile.gettempdir()) / f"evomerge-sources-{token}" / worker


def fetch(shipped: ShippedSources, worker: str) -> dict[str, str]:
    """Copies every source into this worker's local folder, chunk by chunk; returns the config's
    folder -> the local copy."""
    import ray

    root = local_root(shipped.token, worker)
    rename = {}
    for i, (src, files) in enumerate(shipped.files.items()):
        dest = root / f"{i}-{Path(src).name}"
        for rel, size in files:
            out = dest / rel
            if out.is_file() and out.stat().st_size == size:  # complete (written under .part, then renamed)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            part = out.with_name(out.name + ".part")
            offsets = list(range(0, size, CHUNK_BYTES))
            pending = [shipped.server.read.remote(src, rel, o, min(CHUNK_BYTES, size - o)) for o in offsets[:WINDOW]]
            nxt = len(pending)
            with open(part, "wb") as f:
                while pending:
                    f.write(ray.get(pending.pop(0)))
                    if nxt < len(offsets):
                        o = offsets[nxt]
                        pending.append(shipped.server.read.remote(src, rel, o, min(CHUNK_BYTES, size - o)))
                        nxt += 1
            if part.stat().st_size != size:
                raise OSError(f"{src}/{rel}: got {part.stat().st_size} bytes of {size} (did it change?)")
            os.replace(part, out)
        rename[src] = str(dest)
    return rename


def remove_local(token: str, worker: str) -> None:
    root = local_root(token, worker)
    shutil.rmtree(root, ignore_errors=True)
    try:
        root.parent.rmdir()  # the executor's folder, once its last worker on this node is done
    except OSError:
        pass
