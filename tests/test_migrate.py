"""Run folders of earlier formats (runs/migrate.py): one fixture run folder per format, a search
stopped after its first generation, each resumed to the history of the uninterrupted search.

The fixtures are made from a search of today (test_racing's constructed fitness) by undoing, in
its files, what the format added."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from test_racing import Crash, FakeExecutor, fake_config

from evomerge.execution.registry import in_process
from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search

pytestmark = pytest.mark.slow

OVER = {"racing": None, "optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3}}


def _no_header(run):  # log format 1: the records without the header line
    lines = (run / LOG).read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["type"] == "header"
    (run / LOG).write_text("".join(lines[1:]))


def _config(run, edit):
    data = yaml.safe_load((run / "config.yaml").read_text())
    edit(data)
    (run / "config.yaml").write_text(yaml.safe_dump(data))


FORMATS = {
    "log-format-1": _no_header,
    "no-background": lambda run: _config(run, lambda d: d.pop("background")),
    "space-by-name": lambda run: _config(run, lambda d: d.update(search_space="ps_task_arithmetic")),
    "no-tasks-json": lambda run: (run / "tasks.json").unlink(),
}


def search(cfg, crash_after=None, **kw):
    FakeExecutor.crash_after = crash_after
    FakeExecutor.jobs_done = 0
    return run_search(cfg, quiet=True, executor_factory=in_process(FakeExecutor), **kw)


@pytest.fixture(scope="module")
def runs(zoo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    with pytest.raises(Crash):  # stopped after generation 0: the reference and 4 candidates
        search(fake_config(zoo_dir, tmp, "short", budget={"generations": 2}, background=False, **OVER), crash_after=5)
    assert [r.type for r in RunFolder.open(tmp / "short").records()][-1] == "generation"
    search(fake_config(zoo_dir, tmp, "long", budget={"generations": 2}, background=False, **OVER))
    return tmp


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_run_folder_of_an_earlier_format_resumes_to_the_same_history(zoo_dir, runs, tmp_path, fmt):
    run = tmp_path / fmt
    shutil.copytree(runs / "short", run)
    (run / "lock").unlink(missing_ok=True)
    FORMATS[fmt](run)
    search(None, run_dir=run, resume=True)
    assert history(RunFolder.open(run).records()) == history(RunFolder.open(runs / "long").records())
    frozen = yaml.safe_load((run / "config.yaml").read_text())
    assert isinstance(frozen["search_space"], dict)  # the space is inline now
    assert (run / "tasks.json").is_file()
    assert frozen.get("background", False) is False
