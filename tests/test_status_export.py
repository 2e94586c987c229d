"""`evomerge status` and `evomerge export` on a finished run folder."""

from __future__ import annotations

import pytest
import yaml

from evomerge.cli.main import main
from evomerge.recipes.parameter_space import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(zoo_dir, tmp_path_factory):
    from evomerge.runs.start import run_search
    from evomerge.search.config import SearchConfig

    run_dir = tmp_path_factory.mktemp("st") / "run"
    cfg = SearchConfig.from_dict({
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
        "tasks": [{"name": t, "limit": 16, "weight": 0.5} for t in ("zoo_add", "zoo_sub")],
        "optimizer": {"popsize": 4}, "budget": {"generations": 2}, "rescore_top_k": 2, "threads": 1,
        "run_dir": str(run_dir)})
    run_search(cfg, quiet=True)
    return run_dir


def test_status_prints_and_plots(finished_run, capsys):
    assert main(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "2 / 2" in out and "8 (0 failed, 0 from the cache)" in out
    assert "winner (full dev)" in out and "zoo_sub acc" in out
    png = finished_run / "fitness.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_winner_and_ranks(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run)]) == 0
    text = capsys.readouterr().out
    assert Recipe.from_yaml(text).hash() == Recipe.load(finished_run / "best.yaml").hash()
    assert main(["export", str(finished_run), "--rank", "2", "--format", "mergekit", "--out",
                 str(tmp_path / "r2.yml")]) == 0
    r2 = yaml.safe_load((tmp_path / "r2.yml").read_text())
    assert r2["merge_method"] == "task_arithmetic" and "mask_seed" not in r2
    assert Recipe.from_yaml((tmp_path / "r2.yml").read_text()).hash() != Recipe.from_yaml(text).hash()
    assert main(["export", str(finished_run), "--out", str(tmp_path / "r2.yml")]) == 2  # exists, no --force
    assert "exists; pass --force" in capsys.readouterr().err


def test_export_bad_inputs(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run), "--rank", "99"]) == 2
    assert "--rank must be between 1 and" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    from evomerge.runs.folder import RunFolder

    RunFolder.create(empty, (finished_run / "config.yaml").read_text()).close()
    assert main(["export", str(empty)]) == 2
    assert "no successful evaluations yet" in capsys.readouterr().err
    assert main(["status", str(empty)]) == 0  # a run that has not started yet is still readable
