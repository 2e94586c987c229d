"""What a run folder freezes so that a resume searches exactly what it started with.

- The search space is written inline into ``config.yaml`` (not a name in search_spaces/ that a
  resume would look up again): an edited or replaced space file cannot change a resumed search.
- ``tasks.json`` holds a fingerprint of each task as it was scored: a hash of the task's config
  as lm-eval resolved it (templates, metrics, the custom loader's source) and a hash of the
  documents of the scored split. A resume whose tasks hash differently is refused, naming the task
  and what changed (the items themselves cannot be frozen: lm-eval reads them from the task).

Run folders from before this file existed (the space by name, no tasks.json) still resume: the
space is looked up once more and then frozen inline, and the tasks' fingerprints are recorded.
"""

from __future__ import annotations

import hashlib
import json

from evomerge.core.errors import ConfigError, RunFolderError
from evomerge.runs.folder import RunFolder
from evomerge.search.config import SearchConfig

TASKS = "tasks.json"


def load_frozen(run: RunFolder) -> SearchConfig:
    """The run folder's frozen config; a name of a space that is gone (a run folder from before
    inline spaces) is refused saying what to do."""
    data = run.config_dict()
    source = str(run.path / "config.yaml")
    try:
        return SearchConfig.from_dict(data, source=source)
    except ConfigError as e:
        if isinstance(data.get("search_space"), str) and "search_space" in str(e):
            raise RunFolderError(f"{e}; this run folder (an earlier version's) names its search space instead of "
                                 f"holding it: put the space back under that name or path, or write it inline as "
                                 f"search_space in {source}") from None
        raise


def with_inline_space(cfg: SearchConfig) -> SearchConfig:
    """The config with its search space inline (a name or path resolved now)."""
    if isinstance(cfg.search_space, str):
        return cfg.model_copy(update={"search_space": cfg.space})
    return cfg


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def task_fingerprints(evaluators: dict) -> dict[str, dict]:
    """{task: {config, docs, n_docs, source}} of the search's evaluators (check_tasks)."""
    out = {}
    for name, ev in evaluators.items():
        try:
            task = ev.task(name)
        except (AttributeError, KeyError):  # an evaluator that is not lm-eval's: nothing to fingerprint
            continue
        config = task.config.to_dict(keep_callable=False)
        source = (config.get("metadata") or {}).pop("config_source", None)  # where it lies is no part of it
        docs = [dict(d) for d in task.eval_docs]
        out[name] = {"config": _sha(config), "docs": _sha(docs), "n_docs": len(docs), "source": source}
    return out


def record_tasks(run: RunFolder, evaluators: dict) -> None:
    run.write_json(TASKS, task_fingerprints(evaluators))


def tasks_recorded(run: RunFolder) -> bool:
    """False for a run folder from before tasks.json (a resume records its tasks then)."""
    return (run.path / TASKS).is_file()


def check_tasks_unchanged(run: RunFolder, evaluators: dict) -> None:
    """Refuses a resume whose tasks differ from those the search started with (writes nothing)."""
    path = run.path / TASKS
    if not path.is_file():
        return
    now = task_fingerprints(evaluators)
    then = json.loads(path.read_text())
    for name, old in then.items():
        new = now.get(name)
        if new is None:
            continue
        changed = [what for key, what in (("config", "its config (YAML: prompts, metrics, loader)"),
                                           ("docs", f"its items ({old['n_docs']} then, {new['n_docs']} now)"))
                   if old[key] != new[key]]
        if changed:
            where = f" ({new['source']})" if new.get("source") else ""
            raise RunFolderError(f"resume: task {name!r}{where} changed since this search started: "
                                 f"{' and '.join(changed)}; restore the task's files, or start a new search "
                                 "in another run_dir (--run-dir)")
