"""safetensors files read and written one tensor at a time, never whole.

`read_tensor` maps one tensor's bytes alone, for as long as that tensor lives: a merge holds only
the tensors it is working on, and their pages are the file's, not anonymous memory (a whole file
kept mapped, as safetensors' `safe_open` does, keeps every page it touched resident until closed). `ShardWriter` streams tensors into one shard
file as they come: the header's room is reserved first (a bound from the names the shard may hold)
and written last, padded with spaces as the format allows, so no shard is ever held in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit
WRITEBACK_BYTES = 1 << 28  # a shard's writeback is started every 256 MiB written


@dataclass(frozen=True)
class TensorIndex:
    """One safetensors file's header: where each tensor's bytes are."""

    path: Path
    data_start: int  # 8 + header length
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> dtype code, shape, begin, end


def read_index(path: str | os.PathLike) -> TensorIndex:
    """The header of a safetensors file (nothing else is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        header = json.loads(f.read(size))
    entries = {}
    for name, e in header.items():
        if name != "__metadata__":
            begin, end = e["data_offsets"]
            entries[name] = (str(e["dtype"]), tuple(int(d) for d in e["shape"]), int(begin), int(end))
    return TensorIndex(path=path, data_start=8 + size, entries=entries)


def read_tensor(index: TensorIndex, name: str) -> torch.Tensor:
    """One tensor, mapped on its own: a private (copy-on-write) map of its pages alone, unmapped
    when the tensor is freed. Untouched or only read, its pages are the file's (page cache, not
    the process's anonymous memory); nothing of the file stays mapped once the tensor is gone."""
    code, shape, begin, end = index.entries[name]
    if code not in DTYPES:
        raise ValueError(f"{index.path}: {name} has dtype {code}, which evomerge cannot read")
    dtype = DTYPES[code]
    n = end - begin
    if n != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{index.path}: {name} has {n} bytes for shape {list(shape)}")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    start = index.data_start + begin
    skip = start % mmap.ALLOCATIONGRANULARITY
    with open(index.path, "rb") as f:
        if os.fstat(f.fileno()).st_size < start + n:
            raise ValueError(f"{index.path}: the file ends inside {name}")
        mapped = mmap.mmap(f.fileno(), skip + n, access=mmap.ACCESS_COPY, offset=start - skip)
    # the tensor holds the map (frombuffer keeps the buffer alive): unmapped when it is freed
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=n, offset=skip)
    if (start % dtype.itemsize) != 0:  # a header that leaves the data unaligned: copy it
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def header_room(names: list[str], max_dims: int = 8) -> int:
    """Bytes that a shard header holding any of `names` (tensors of up to `max_dims` dims) fits."""
    per_tensor = len('{"dtype":"BF16","shape":[],"data_offsets":[,]},') + max_dims * 21 + 2 * 20
    room = 64 + sum(len(json.dumps(n)) + per_tensor for n in names)  # 64: "__metadata__"
    return room + (-(8 + room) % 8)


class ShardWriter:
    """One safetensors file written tensor by tensor (`add`), its header last (`close`)."""

    def __init__(self, path: Path, room: int, metadata: dict[str, str] | None = None):
        self.path, self.room, self.metadata = path, room, metadata or {}
        self.entries: dict[str, dict] = {}
        self.size = 0
        self._unsynced = 0  # bytes written since writeback was last started
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._f.seek(8 + room)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        if n:
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._unsynced += n
            if self._unsynced >= WRITEBACK_BYTES:
                self._start_writeback()
        self.entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + n]}
        self.size += n

    def _start_writeback(self) -> None:
        """Starts the kernel writing what is written so far, without waiting for it (DONTNEED
        starts writeback of dirty pages and drops the pages already written): the fsync at close
        waits for the last stretch only, and the output does not fill the page cache."""
        self._f.flush()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._unsynced = 0

    def close(self) -> None:
        """Writes the header and fsyncs the file."""
        header = {"__metadata__": self.metadata, **self.entries} if self.metadata else self.entries
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self.room:
            self._f.seek(0)
            self._f.write(self.room.to_bytes(8, "little") + raw + b" " * (self.room - len(raw)))
        else:  # more than the bound: rewrite the file with the header it needs
            self._f.flush()
            raw += b" " * (-(8 + len(raw)) % 8)
            tmp = self.path.with_name(self.path.name + ".rewrite")
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                dst.write(len(raw).to_bytes(8, "little") + raw)
                src.seek(8 + self.room)
                shutil.copyfileobj(src, dst, 1 << 24)
                dst.flush()
                os.fsync(dst.fileno())
            self._f.close()
            os.replace(tmp, self.path)
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


__all__ = ["DTYPES", "ShardWriter", "TensorIndex", "header_room", "read_index", "read_tensor"]
