"""The run folder is self-contained: the search space is frozen inline and the tasks by hash, so an
edited space or task file cannot silently change a resumed search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_racing import Crash, fake_config, fake_search

from evomerge.core.errors import ConfigError, RunFolderError
from evomerge.runs.folder import RunFolder, history
from evomerge.search.config import REPO_SPACES

EVALS = Path(__file__).resolve().parents[1] / "evals"


def _space_copy(tmp_path: Path) -> Path:
    space = tmp_path / "spaces" / "ps_task_arithmetic.yaml"
    space.parent.mkdir()
    shutil.copy(REPO_SPACES / "ps_task_arithmetic.yaml", space)
    return space


def _edit_space(space: Path) -> None:
    data = yaml.safe_load(space.read_text())
    data["parameters"]["weight"]["init"] = 0.5  # another starting point ...
    data["granularity"]["layers_per_group"] = 1  # ... and another genome length
    space.write_text(yaml.safe_dump(data))


def test_an_edited_space_file_does_not_change_a_resumed_search(zoo_dir, tmp_path):
    space = _space_copy(tmp_path)
    fake_search(fake_config(zoo_dir, tmp_path, "ref", search_space=str(space)))
    expected = history(RunFolder.open(tmp_path / "ref").records())
    cfg = fake_config(zoo_dir, tmp_path, "run", search_space=str(space))
    with pytest.raises(Crash):
        fake_search(cfg, crash_after=7)
    frozen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert frozen["search_space"]["method"] == "task_arithmetic"  # inline, not the path
    assert frozen["search_space"]["granularity"]["layers_per_group"] == 2
    _edit_space(space)
    # the config naming the edited file differs from the frozen space: refused, naming the field
    edited = fake_config(zoo_dir, tmp_path, "run", search_space=str(space), budget={"generations": 4})
    with pytest.raises(ConfigError, match=r"differs from the run's frozen config in search_space\.granularity"
                                          r"\.layers_per_group, search_space\.parameters\.weight\.init"):
        fake_search(edited, resume=True, run_dir=tmp_path / "run")
    fake_search(None, resume=True, run_dir=tmp_path / "run")  # the frozen space: as before the edit
    assert history(RunFolder.open(tmp_path / "run").records()) == expected


def test_an_edited_task_refuses_a_resume(zoo_dir, tmp_path, monkeypatch):
    evals = tmp_path / "evals"
    shutil.copytree(EVALS, evals)
    import evomerge.evaluation.evaluator as evaluator

    monkeypatch.setattr(evaluator, "REPO_EVALS", evals)
    evaluator._indexed_tasks.cache_clear()
    try:
        cfg = fake_config(zoo_dir, tmp_path, "run", budget={"generations": 1})
        fake_search(cfg)
        tasks = json.loads((tmp_path / "run" / "tasks.json").read_text())
        assert set(tasks) == {"zoo_add", "zoo_sub"} and tasks["zoo_add"]["n_docs"] > 0
        more = fake_config(zoo_dir, tmp_path, "run", budget={"generations": 2})
        # the items of zoo_sub's dev split change
        dev = evals / "data" / "sub" / "dev.jsonl"
        dev.write_text("\n".join(dev.read_text().splitlines()[:-1]) + "\n")
        evaluator._indexed_tasks.cache_clear()
        with pytest.raises(RunFolderError, match=r"resume: task 'zoo_sub' .* changed since this search started: "
                                                 r"its items \(\d+ then, \d+ now\); restore the task's files"):
            fake_search(more, resume=True, run_dir=tmp_path / "run")
        # the prompt template of zoo_add changes
        shutil.copy(EVALS / "data" / "sub" / "dev.jsonl", dev)
        y = evals / "zoo_add.yaml"
        y.write_text(y.read_text().replace('doc_to_text: "{{prompt}}"', 'doc_to_text: "Q: {{prompt}}"'))
        evaluator._indexed_tasks.cache_clear()
        with pytest.raises(RunFolderError, match=r"task 'zoo_add' .*zoo_add.yaml\) changed .*: its config"):
            fake_search(more, resume=True, run_dir=tmp_path / "run")
        shutil.copy(EVALS / "zoo_add.yaml", y)
        evaluator._indexed_tasks.cache_clear()
        fake_search(more, resume=True, run_dir=tmp_path / "run")  # restored: resumes
        assert sum(r.type == "generation" for r in RunFolder.open(tmp_path / "run").records()) == 2
    finally:
        evaluator._indexed_tasks.cache_clear()


def test_a_run_folder_of_the_earlier_format_resumes(zoo_dir, tmp_path):
    """Space by name, no tasks.json: resumes (the space looked up once more, then frozen inline)."""
    space = _space_copy(tmp_path)
    cfg = fake_config(zoo_dir, tmp_path, "run", search_space=str(space), budget={"generations": 1})
    fake_search(cfg)
    run = tmp_path / "run"
    old = yaml.safe_load((run / "config.yaml").read_text())
    old["search_space"] = str(space)
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    (run / "tasks.json").unlink()
    fake_search(fake_config(zoo_dir, tmp_path, "run", search_space=str(space), budget={"generations": 2}),
                resume=True, run_dir=run)
    assert isinstance(yaml.safe_load((run / "config.yaml").read_text())["search_space"], dict)
    assert (run / "tasks.json").is_file()
    old["search_space"] = str(tmp_path / "gone.yaml")
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(RunFolderError, match=r"names its search space instead of holding it: put the space back"):
        fake_search(None, resume=True, run_dir=run)
