"""The zoo table's LoRA rows (kept out of zoo/lora.py, whose bytes key the adapters' cache)."""

from __future__ import annotations

from pathlib import Path

from evomerge.zoo.build import read_manifest
from evomerge.zoo.lora import lora_paths


def lora_table_recipes(zoo_dir: str | Path) -> dict[str, dict]:
    """The zoo table's LoRA rows: each adapter over the base, and plain merges of the three."""
    zoo_dir = Path(zoo_dir)
    base = str(zoo_dir / read_manifest(zoo_dir)["base"])
    paths = {s: str(p) for s, p in lora_paths(zoo_dir).items()}

    def merge(method: str, w: float, skills=tuple(paths)) -> dict:
        return {"merge_method": method, "base_model": base, "dtype": "float32",
                "models": [{"model": paths[s], "parameters": {"weight": w}} for s in skills]}

    rows = {f"lora_{s}": merge("task_arithmetic", 1.0, (s,)) for s in paths}
    for w in (0.5, 0.7):
        rows[f"LoRA task arithmetic w={w}"] = merge("task_arithmetic", w)
        rows[f"LoRA lorahub w={w}"] = merge("lorahub", w)
    return rows
