"""The sources a search scored, as they were: ``sources.json`` in the run folder holds the sha256
of every file that makes each source what it is (models/fingerprint.py: weights, config, tokenizer,
a LoRA adapter's adapter_config.json), written when the search starts. A resume and a materialize
recompute them and refuse a source that changed since: the log's fitness describes the old one,
and a recipe over the new one would be another model under the same recipe hash.

A run folder from before sources.json is not checked (nothing to compare with).
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.core.errors import RunFolderError
from evomerge.models.fingerprint import file_hashes
from evomerge.models.sources import load_source
from evomerge.search.config import SearchConfig

SOURCES = "sources.json"


def named_sources(cfg: SearchConfig) -> list[tuple[str, str]]:
    """(config field, source name) of every source of the search."""
    named = [(f"models.{i}", m) for i, m in enumerate(cfg.models)]
    return ([("base_model", cfg.base_model)] if cfg.base_model else []) + named


def source_hashes(cfg: SearchConfig) -> dict[str, dict[str, str]]:
    """source name -> {file path: sha256}; a file several sources share is read once."""
    seen: dict[Path, str] = {}
    return {name: file_hashes(load_source(name, base=cfg.base_model, allow_pickle=cfg.allow_pickle), seen)
            for _, name in named_sources(cfg)}


def record_sources(run, cfg: SearchConfig) -> None:
    run.write_json(SOURCES, source_hashes(cfg))


def check_sources_unchanged(run_dir: str | Path, cfg: SearchConfig, what: str) -> dict[Path, str]:
    """Refuses (``what``: "resume", "materialize") when a source's files differ from those the
    search started with, naming the source and the file. Returns the hashes it just computed
    (file -> sha256; empty for a run folder without sources.json), so that a materialize's card
    does not read every source a second time."""
    path = Path(run_dir) / SOURCES
    if not path.is_file():
        return {}
    then = json.loads(path.read_text())
    now = source_hashes(cfg)
    for field, name in named_sources(cfg):
        old, new = then.get(name), now.get(name)
        if old is None:
            continue
        changed = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
        if changed:
            files = ", ".join(f"{f} ({_state(f, old, new)})" for f in changed)
            raise RunFolderError(f"cannot {what} {run_dir}: source {field} {name!r} is not the one the search scored: "
                                 f"{files} since the search started; its fitness describes the old files: put them "
                                 "back, or start a new search on the new ones")
    return {Path(f): h for files in now.values() for f, h in files.items()}


def _state(f: str, old: dict, new: dict) -> str:
    return "gone" if f not in new else "new" if f not in old else "changed"
