"""The files that make a source what it is, and their hashes: weights, and every file that changes
what the weights mean (config.json, the tokenizer's files, a LoRA adapter's adapter_config.json,
whose alpha scales the adapter's update). The merged model's card lists them; a run folder records
them when its search starts, so a resume or a materialize refuses a source that changed since
(runs/source_hashes.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.models.sources import SourceModel

# Beside the weights: what a loader reads to build the model or its tokenizer, or to apply an adapter.
MEANING_FILES = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                 "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")


def sha256_file(path: Path, stop: Event | None = None) -> str:
    """``stop``: set when the hash is no longer wanted (a failed merge's card): returns "" early."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if stop is not None and stop.is_set():
                return ""
            h.update(block)
    return h.hexdigest()


def meaning_files(source: SourceModel) -> tuple[Path, ...]:
    """Every file of ``source`` that changes the model it reads as: its weight files and the
    MEANING_FILES of its folder and, for a LoRA adapter, of the adapter's folder too."""
    adapter = getattr(source, "adapter", None)
    folders = [source.path] + ([adapter.path] if adapter is not None else [])
    extra = [folder / f for folder in folders for f in MEANING_FILES if (folder / f).is_file()]
    return (*source.weight_files, *extra)


def file_hashes(source: SourceModel, seen: dict[Path, str] | None = None) -> dict[str, str]:
    """sha256 of each of ``source``'s meaning files, keyed by path. ``seen``: the hashes of
    files read already (filled here), so that a file several sources share (a base under its
    LoRA adapters) is read once."""
    seen = {} if seen is None else seen
    files = meaning_files(source)
    for p in files:
        if p not in seen:
            seen[p] = sha256_file(p)
    return {str(p): seen[p] for p in files}
