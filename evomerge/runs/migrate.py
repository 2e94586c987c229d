"""Run folders of earlier formats, brought to today's on resume: every migration in one place.

Each one names what an earlier evomerge wrote and what a resume does with it; none changes a
search's history (the tests resume a fixture run folder of each format and compare):

- a log without a header line (log format 1): read as it is (``runs.folder.parse_log``);
- a config without ``background`` (before background work): none, frozen as ``False``;
- a config that names its search space (before inline spaces): the space is looked up once more
  and written inline (``runs.frozen.with_inline_space``);
- no ``tasks.json`` (before task fingerprints): the tasks' fingerprints are recorded now
  (``runs.frozen.check_tasks_unchanged``);
- a ``lock`` file with a bare pid (the flock era): taken over when no process holds it (runs/lock.py).
"""

from __future__ import annotations

from evomerge.runs.frozen import with_inline_space
from evomerge.search.config import SearchConfig


def migrated(frozen: SearchConfig) -> tuple[SearchConfig, bool]:
    """The frozen config in today's format, and whether the run folder's config.yaml must be
    rewritten (by the caller, once it holds the run folder's lock)."""
    rewrite = False
    if frozen.background is None:  # before background work: none (what those searches did)
        frozen = frozen.model_copy(update={"background": False})
    if isinstance(frozen.search_space, str):  # before inline spaces: freeze the space now
        frozen, rewrite = with_inline_space(frozen), True
    return frozen, rewrite
