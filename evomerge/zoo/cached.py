"""A zoo part built once per key: the LoRA and the block-expanded specialists are each trained
into a temporary folder beside their final one, with a manifest that records the key, and
swapped in whole; a folder whose manifest has the same key is left as it is."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.core.io import atomic_write_text, replace_folder


def build_cached(out: Path, manifest_name: str, key: str, threads: int, what: str,
                 build: Callable[[Path], dict], log=print) -> Path:
    """``build(tmp)`` fills ``tmp`` and returns the manifest (``key`` and ``seconds`` are added);
    returns ``out``."""
    if (out / manifest_name).is_file():
        try:
            if json.loads((out / manifest_name).read_text()).get("key") == key:
                log(f"{what} at {out} are up to date (key {key})")
                return out
        except (OSError, ValueError):
            pass
    t_start = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = {"key": key, **build(tmp), "seconds": round(time.perf_counter() - t_start, 1)}
        atomic_write_text(tmp / manifest_name, json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)
    finally:
        torch.set_num_threads(prev)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{what} written to {out} in {time.perf_counter() - t_start:.0f} s")
    return out
