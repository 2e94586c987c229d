"""Layer 7: where candidates are built and scored: in this process, or on Ray workers; Ray job submission.

The executors' registry is here (light, for the CLI); their factories: execution/registry.py.
"""

from dataclasses import dataclass
from enum import StrEnum

# how the sources reach Ray workers (execution/ray.py, execution/sources.py): `--sources`'s choices
SOURCES = ("path", "object_store")


class ExecutorKind(StrEnum):
    LOCAL = "local"  # in this process, in job order (execution/local.py)
    RAY = "ray"  # Ray actors, as they free up (execution/ray.py)


@dataclass(frozen=True)
class ExecutorEntry:
    kind: ExecutorKind
    uses_ray: bool  # its searches re-score in the background by default (``background: null``)
    help: str


# the executors: `evomerge search --executor`'s choices, and what start-up knows of each kind
EXECUTORS: dict[str, ExecutorEntry] = {e.kind.value: e for e in (
    ExecutorEntry(ExecutorKind.LOCAL, False, "build and score in this process (the default without --workers)"),
    ExecutorEntry(ExecutorKind.RAY, True, "Ray workers: --workers N of them, on a local Ray or --ray-address"),
)}
EXECUTOR_NAMES = tuple(EXECUTORS)
