"""Resume corner cases: a finished time budget, a stale checkpoint after a kill, a staged resume
whose new config is refused before it is written."""

from __future__ import annotations

import json
import shutil

import pytest

from evomerge.core.errors import ConfigError, RunFolderError
from evomerge.runs.folder import LOG, OPTIMIZER, RunFolder, history
from evomerge.runs.staged import run_staged
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig
from evomerge.search.staged import StagedConfig

pytestmark = pytest.mark.slow


def tiny(zoo_dir, tmp_path, **over) -> dict:
    cfg = {"models": [str(zoo_dir / "spec_add"), str(zoo_dir / "spec_rev")], "base_model": str(zoo_dir / "base"),
           "search_space": "ps_task_arithmetic",
           "tasks": [{"name": t, "limit": 6} for t in ("zoo_add", "zoo_rev")],
           "batch_size": 32, "threads": 1, "optimizer": {"name": "cma", "popsize": 2},
           "budget": {"generations": 2}, "seed": 3, "rescore_top_k": 1, "racing": None,
           "run_dir": str(tmp_path / "run")}
    cfg.update(over)
    return cfg


def test_a_finished_time_budget_resumes_to_nothing(zoo_dir, tmp_path):
    cfg = SearchConfig.from_dict(tiny(zoo_dir, tmp_path, budget={"time_limit_s": 0.01}))
    first = run_search(cfg, quiet=True)
    records = RunFolder.open(tmp_path / "run").records()
    finals = [r for r in records if r.type == "final"]
    assert first.generations == 1 and len(finals) == 1  # at least one generation, then the budget is spent
    spent = finals[0].elapsed_s
    assert spent is not None and spent > 0.01
    # the same budget, or one still below the time spent: finished, nothing evaluated, no second final
    for limit in (0.01, spent * 0.9):
        again = SearchConfig.from_dict(tiny(zoo_dir, tmp_path, budget={"time_limit_s": limit}))
        out = run_search(again, run_dir=tmp_path / "run", resume=True, quiet=True)
        assert out.finished and RunFolder.open(tmp_path / "run").records() == records
    # a raised budget continues, and counts the time already spent
    more = SearchConfig.from_dict(tiny(zoo_dir, tmp_path, budget={"time_limit_s": spent + 3600, "generations": 2}))
    run_search(more, run_dir=tmp_path / "run", resume=True, quiet=True)
    later = RunFolder.open(tmp_path / "run").records()
    gens = [r for r in later if r.type == "generation"]
    assert len(gens) == 2 and gens[1].elapsed_s >= spent


def test_a_stale_optimizer_checkpoint_is_rewritten_on_resume(zoo_dir, tmp_path):
    """A kill between the last generation record and the optimizer.json write, built by hand."""
    ref = tmp_path / "ref"
    run_search(SearchConfig.from_dict(tiny(zoo_dir, tmp_path, run_dir=str(ref))), quiet=True)
    ref_records = RunFolder.open(ref).records()
    killed = tmp_path / "killed"
    shutil.copytree(ref, killed)
    (killed / "lock").unlink(missing_ok=True)
    lines = (killed / LOG).read_text().splitlines(keepends=True)
    last_gen = max(i for i, line in enumerate(lines) if json.loads(line)["type"] == "generation")
    (killed / LOG).write_text("".join(lines[:last_gen + 1]))  # no re-score, no final yet
    (killed / OPTIMIZER).write_text(json.dumps({"stale": True}) + "\n")
    run_search(None, run_dir=killed, resume=True, quiet=True)
    assert json.loads((killed / OPTIMIZER).read_text()) == json.loads((ref / OPTIMIZER).read_text())
    assert history(RunFolder.open(killed).records()) == history(ref_records)


def test_a_staged_resume_checks_the_config_before_writing_it(zoo_dir, tmp_path):
    common = {"tasks": [{"name": "zoo_add", "limit": 6}], "batch_size": 32, "threads": 1,
              "optimizer": {"name": "cma", "popsize": 2}, "seed": 0, "racing": None}
    ps = {"name": "ps", "models": [str(zoo_dir / "spec_add")], "base_model": str(zoo_dir / "base"),
          "search_space": "ps_task_arithmetic", "budget": {"generations": 1}}
    cfg = StagedConfig.from_dict({**common, "stages": [ps]})
    run = RunFolder.create(tmp_path / "staged", cfg.to_yaml())  # a staged run killed before its first stage
    run.close()
    frozen = (tmp_path / "staged" / "config.yaml").read_text()
    changed = StagedConfig.from_dict({**common, "seed": 1, "stages": [ps]})
    with pytest.raises(ConfigError, match=r"stage ps: .* differs .* in seed"):
        run_staged(changed, run_dir=tmp_path / "staged", resume=True, quiet=True)
    missing = StagedConfig.from_dict({**common, "stages": [{**ps, "models": [str(tmp_path / "nope")]}]})
    with pytest.raises(ConfigError, match="nope"):
        run_staged(missing, run_dir=tmp_path / "staged", resume=True, quiet=True)
    assert (tmp_path / "staged" / "config.yaml").read_text() == frozen
    assert not (tmp_path / "staged" / "stages").exists()


def _folder_bytes(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("broken", ["task", "executor", "config"])
def test_a_resume_whose_plan_fails_leaves_the_run_folder_untouched(zoo_dir, tmp_path, broken):
    """The resume's plan (runs.start.plan_search: the frozen config with the new budget, the
    executor's check, the tasks and sources against those the search started with) is checked in
    one step before the run folder is touched: no config rewritten, no session, no lock."""
    from test_racing import FakeExecutor, fake_config

    from evomerge.execution.registry import in_process

    def refuse(cfg):
        raise ConfigError("--workers 1000: too many")

    run_search(fake_config(zoo_dir, tmp_path, budget={"generations": 1}, racing=None), quiet=True,
               executor_factory=in_process(FakeExecutor))
    run = tmp_path / "run"
    factory = in_process(FakeExecutor)
    if broken == "task":  # a task's items changed since the search started
        tasks = json.loads((run / "tasks.json").read_text())
        tasks["zoo_add"]["docs"] = "0" * 64
        (run / "tasks.json").write_text(json.dumps(tasks))
        error = "task 'zoo_add'"
    elif broken == "executor":
        factory = type(factory)(factory.kind, factory.make, check=refuse)
        error = "too many"
    before = _folder_bytes(run)
    raised = fake_config(zoo_dir, tmp_path, budget={"generations": 2}, racing=None,
                         **({"seed": 2} if broken == "config" else {}))
    with pytest.raises((ConfigError, RunFolderError), match="differs .* in seed" if broken == "config" else error):
        run_search(raised, run_dir=run, resume=True, quiet=True, executor_factory=factory)
    assert _folder_bytes(run) == before
