"""DFS and PS+DFS searches on the zoo: improvement, exact resume after SIGKILL, staged exports."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_search import cli, write_config

from evomerge.merge.dataflow import PathBuilder
from evomerge.recipes.layer_path import PathRecipe, load_recipe, load_stages
from evomerge.runs.folder import LOG, RunFolder, history

pytestmark = pytest.mark.slow

TASKS = [{"name": t, "metric": "acc", "weight": 0.5, "limit": 24} for t in ("zoo_rev", "zoo_sub")]
# One slot per layer and no scales: the zoo's small budget finds the order that matters (spec_rev's
# first layers, then spec_sub's); the staged test searches scales too.
DFS_SPACE = {"kind": "dfs", "repeats": 1, "fix_ends": False, "scale": {"param": "none"},
             "init": {"model_a": 0.6, "other": 0.4}, "sigma0": 0.3}


def dfs_config(zoo_dir: Path, **over) -> dict:
    cfg = {"models": [str(zoo_dir / "spec_rev"), str(zoo_dir / "spec_sub")], "search_space": DFS_SPACE,
           "tasks": TASKS, "batch_size": 48, "threads": 1, "optimizer": {"name": "cma", "popsize": 8},
           "budget": {"generations": 5}, "seed": 3, "rescore_top_k": 2}
    cfg.update(over)
    return cfg


def staged_config(zoo_dir: Path) -> dict:
    return {"tasks": TASKS, "batch_size": 48, "threads": 1, "optimizer": {"name": "cma", "popsize": 4},
            "seed": 1, "rescore_top_k": 1, "budget": {"generations": 2},
            "stages": [{"name": "ps", "models": [str(zoo_dir / "spec_rev"), str(zoo_dir / "spec_sub")],
                        "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic"},
                       {"name": "dfs", "models": ["stage:ps", str(zoo_dir / "spec_sub")],
                        "search_space": {**DFS_SPACE, "max_scale_product": 4,
                                         "scale": {"param": "per_layer", "low": 0.8, "high": 1.25}}}]}


def run_to_end(*args: str) -> str:
    p = cli(*args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def kill_when(p, ready, rng, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 0.3)))  # land inside the next candidate, or between two
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def dfs_run(zoo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dfs")
    cfg = write_config(tmp, dfs_config(zoo_dir))
    run_to_end(str(cfg), "--run-dir", str(tmp / "run"))
    return tmp / "run", cfg


def test_dfs_search_improves_on_its_start(dfs_run):
    run_dir, _ = dfs_run
    records = RunFolder.open(run_dir).records()
    ref = next(r for r in records if r.type == "reference")
    final = records[-1]
    assert final.type == "final" and final.fitness > ref.fitness  # both on the full dev split
    best = load_recipe(run_dir / "best.yaml")
    assert isinstance(best, PathRecipe) and best.hash() == final.recipe_hash
    mk = yaml.safe_load((run_dir / "best.mergekit.yaml").read_text())
    assert mk["merge_method"] == "passthrough" and len(mk["slices"]) == len(best.path)


def test_dfs_killed_three_times_equals_uninterrupted(dfs_run, tmp_path):
    ref_dir, cfg = dfs_run
    expected = history(RunFolder.open(ref_dir).records())
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(99)
    for k, target in enumerate(sorted(rng.choice(np.arange(1, len(expected)), size=3, replace=False))):
        p = cli(str(cfg), "--run-dir", str(run_dir)) if k == 0 else cli("--resume", str(run_dir))
        kill_when(p, lambda t=target: lines(run_dir / LOG) >= t, rng)
    run_to_end("--resume", str(run_dir))
    got = RunFolder.open(run_dir).records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 40  # no evaluation lost or repeated
    assert history(got) == expected


def test_ps_dfs_resumes_across_the_stage_boundary(zoo_dir, tmp_path):
    cfg = tmp_path / "staged.yml"
    cfg.write_text(yaml.safe_dump(staged_config(zoo_dir)))
    # The reference runs in the same folder as the killed run, then moves: recipes name the
    # materialized PS winner by its path, so both runs must see one path.
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(str(cfg), "--run-dir", str(run))
    run.rename(ref)
    rng = np.random.default_rng(5)
    # killed right after the PS stage (its winner being materialized), then inside the DFS stage
    p = cli(str(cfg), "--run-dir", str(run))
    kill_when(p, lambda: (run / "stages" / "ps" / "best.yaml").is_file()
              and b'"final"' in (run / "stages" / "ps" / LOG).read_bytes(), rng)
    p = cli("--resume", str(run))
    kill_when(p, lambda: lines(run / "stages" / "dfs" / LOG) >= 3, rng)
    out = run_to_end("--resume", str(run))
    assert "best recipe" in out
    for stage in ("ps", "dfs"):
        assert history(RunFolder.open(run / "stages" / stage).records()) == \
            history(RunFolder.open(ref / "stages" / stage).records()), stage

    # the export holds both stages: the PS recipe, then the path that names it
    stages = load_stages(run / "best.yaml")
    assert [n for n, _ in stages] == ["ps", None]
    assert stages[0][1].merge_method == "task_arithmetic"
    assert any(s.model == "ps" for s in stages[1][1].path)
    mk = list(yaml.safe_load_all((run / "best.mergekit.yaml").read_text()))
    assert mk[0]["name"] == "ps" and mk[1]["merge_method"] == "passthrough"
    # `evomerge merge` on it rebuilds the evaluated model: the path over the materialized PS winner
    from evomerge.cli.main import main as evomerge
    from evomerge.models.folders import load_causal_lm

    assert evomerge(["merge", str(run / "best.yaml"), str(tmp_path / "out")]) == 0
    inner = load_recipe(run / "stages" / "dfs" / "best.yaml")
    ids = torch.randint(0, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PathBuilder(inner.referenced_models()).build(inner)(input_ids=ids).logits
        got = load_causal_lm(tmp_path / "out")(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-4
