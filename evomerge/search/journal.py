"""What the search loop needs from where it keeps its history (implemented by runs.RunFolder).

The loop appends one record per evaluation and writes its checkpoints through this interface;
it never knows file names or formats, so the loop stays testable without a run folder and the
run folder owns its layout (Optuna's split between the study loop and a storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from evomerge.recipes.layer_path import AnyRecipe
from evomerge.search.records import Record


class RunJournal(Protocol):
    path: Path  # the folder that also holds per-item score files (evaluation.items)

    def records(self) -> list[Record]:
        """Every complete record logged so far, in log order."""
        ...

    def append(self, record: Record) -> None:
        """Appends one record durably (a kill after this returns loses nothing); the lost-lease check
        of the run folder applies to it and to every checkpoint write."""
        ...

    def write_optimizer(self, state: dict[str, Any]) -> None: ...

    def write_pareto(self, front: dict[str, Any]) -> None: ...

    def write_best(self, recipe_yaml: str, mergekit_yaml: str) -> None: ...

    def read_best(self) -> AnyRecipe | None: ...


class SearchObserver(Protocol):
    """Who follows a search (runs.progress.Display, the mirrors of runs/mirror.py); told, never asked."""

    def message(self, text: str) -> None: ...

    def start(self, generations: float, popsize: int, records: list[Record]) -> None: ...

    def logged(self, record: Record) -> None:
        """Each record, once it is in the log (every record the search appends comes here)."""
        ...
