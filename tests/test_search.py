"""End-to-end searches on the zoo: results, run folder, exact resume after SIGKILL and SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cli_process
import numpy as np
import pytest
import yaml

from evomerge.recipes.parameter_space import Recipe
from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import ConfigError, SearchConfig

pytestmark = pytest.mark.slow


def small_config(zoo_dir: Path, **over) -> dict:
    cfg = {
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"),
        "search_space": "ps_task_arithmetic",
        "tasks": [{"name": t, "metric": "acc", "weight": 1 / 3, "limit": 24} for t in ("zoo_add", "zoo_rev", "zoo_sub")],
        "batch_size": 32,
        "threads": 1,
        "optimizer": {"name": "cma", "popsize": 4},
        "budget": {"generations": 3},
        "seed": 5,
        "rescore_top_k": 2,
    }
    cfg.update(over)
    return cfg


def write_config(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "search.yml"
    p.write_text(yaml.safe_dump(data))
    return p


def cli(*args: str) -> cli_process.CliProcess:
    """`evomerge search *args --quiet` in a process and session of its own (tests/cli_process.py)."""
    return cli_process.start("search", *args, "--quiet")


OPTIMIZERS = {
    "pycma": {"name": "cma", "popsize": 4},
    "optuna-cmaes": {"name": "optuna", "sampler": "CmaEsSampler", "popsize": 4},
    "optuna-tpe": {"name": "optuna", "sampler": "TPESampler", "popsize": 4},
    "random-steady": {"name": "random_steady", "popsize": 4},  # the steady-state engine (search/steady.py)
    "m2n2": {"name": "m2n2", "popsize": 4},  # steady-state, told per-item scores (search/optimizers/m2n2.py)
}


@pytest.fixture(scope="module")
def reference_run(zoo_dir, tmp_path_factory):
    """One uninterrupted search, run through the CLI."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, small_config(zoo_dir))
    p = cli(str(cfg), "--run-dir", str(tmp / "run"))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return tmp / "run", cfg, out


def test_search_writes_a_complete_run_folder(reference_run):
    run_dir, _, out = reference_run
    records = RunFolder.open(run_dir).records()
    kinds = [r.type for r in records]
    assert kinds.count("reference") == 1 and kinds.count("candidate") == 12 and kinds.count("generation") == 3
    assert kinds.count("rescore") == 2 and kinds[-1] == "final"
    cands = [r for r in records if r.type == "candidate"]
    assert all(sum(r.items.values()) == 72 for r in cands)  # 24 items per task, seeded subsets
    final = records[-1]
    rescored = [r for r in records if r.type == "rescore"]
    assert final.fitness == max(r.fitness for r in rescored)
    assert all(sum(r.items.values()) == 1500 for r in rescored)  # the full dev split
    best = Recipe.load(run_dir / "best.yaml")
    assert best.hash() == final.recipe_hash
    mk = yaml.safe_load((run_dir / "best.mergekit.yaml").read_text())
    assert "mask_seed" not in mk and mk["merge_method"] == "task_arithmetic" and len(mk["slices"]) == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 5
    assert (run_dir / "optimizer.json").is_file() and "winner (full dev split)" in out


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_killed_five_times_equals_uninterrupted(reference_run, zoo_dir, tmp_path, optimizer):
    if optimizer == "pycma":
        ref_dir, cfg, _ = reference_run
    else:
        cfg = write_config(tmp_path, small_config(zoo_dir, optimizer=OPTIMIZERS[optimizer]))
        ref_dir = tmp_path / "ref"
        p = cli(str(cfg), "--run-dir", str(ref_dir))
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    expected = history(RunFolder.open(ref_dir).records())
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(2024)
    targets = sorted(rng.choice(np.arange(1, len(expected)), size=5, replace=False))
    for k, target in enumerate(targets):
        p = cli(str(cfg), "--run-dir", str(run_dir)) if k == 0 else cli("--resume", str(run_dir))
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            log = run_dir / LOG
            if log.is_file() and log.read_bytes().count(b"\n") >= target:
                time.sleep(float(rng.uniform(0, 0.3)))  # land inside the next candidate, or between two
                break
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        # the kill landed mid-run: the process died of it, and the search had not finished
        assert p.returncode == -signal.SIGKILL, f"the search exited ({p.returncode}) before the kill"
        assert not any(r.type == "final" for r in RunFolder.open(run_dir).records())
    p = cli("--resume", str(run_dir))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    got = RunFolder.open(run_dir).records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 12  # no evaluation lost or repeated
    assert history(got) == expected


def test_sigterm_checkpoints_and_exits(reference_run, tmp_path):
    ref_dir, cfg, _ = reference_run
    run_dir = tmp_path / "run"
    p = cli(str(cfg), "--run-dir", str(run_dir))
    while p.poll() is None and not ((run_dir / LOG).is_file() and (run_dir / LOG).read_bytes().count(b"\n") >= 3):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert f"evomerge search --resume {run_dir}" in out
    p = cli("--resume", str(run_dir))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert history(RunFolder.open(run_dir).records()) == history(RunFolder.open(ref_dir).records())


def test_resume_rules(reference_run, zoo_dir, tmp_path):
    ref_dir, cfg, _ = reference_run
    # finished: says so, evaluates nothing
    out = run_search(None, run_dir=ref_dir, resume=True, quiet=True)
    assert out.finished and out.best_fitness is not None
    n = len(RunFolder.open(ref_dir).records())
    # a changed search is refused, naming the field
    changed = SearchConfig.from_dict(small_config(zoo_dir, seed=6))
    with pytest.raises(ConfigError, match=r"differs from the run's frozen config in seed"):
        run_search(changed, run_dir=ref_dir, resume=True, quiet=True)
    changed = SearchConfig.from_dict(small_config(zoo_dir, tasks=[{"name": "zoo_add", "limit": 10}]))
    with pytest.raises(ConfigError, match=r"tasks"):
        run_search(changed, run_dir=ref_dir, resume=True, quiet=True)
    assert len(RunFolder.open(ref_dir).records()) == n
    # a larger budget is allowed and continues where the run stopped
    import shutil

    copy = tmp_path / "more"
    shutil.copytree(ref_dir, copy)
    (copy / "lock").unlink(missing_ok=True)  # a lock of the flock era stayed behind; a lease does not
    more = SearchConfig.from_dict(small_config(zoo_dir, budget={"generations": 4}))
    out = run_search(more, run_dir=copy, resume=True, quiet=True)
    recs = RunFolder.open(copy).records()
    keys = [(r.generation, r.index) for r in recs if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 16 and out.generations == 4
    assert history(recs[:n]) == history(RunFolder.open(ref_dir).records())


def test_search_improves_on_its_start(reference_run):
    records = RunFolder.open(reference_run[0]).records()
    ref = next(r for r in records if r.type == "reference")
    assert records[-1].fitness > ref.fitness  # both on the full dev split


def test_a_repeated_recipe_comes_from_the_cache(zoo_dir, tmp_path, monkeypatch):
    """Genomes that decode to one recipe (here: duplicates in a generation) are scored once."""
    import evomerge.search.loop as driver
    from evomerge.merge.inplace.merger import InPlaceMerger
    from evomerge.search.optimizers.random_search import RandomSearch

    class Duplicating(RandomSearch):
        def ask(self):
            x = super().ask()
            x[1:] = x[0]
            return x

    monkeypatch.setattr(driver, "make_optimizer", lambda name, x0, s, p, seed, **kw: Duplicating(x0, s, p, seed))
    builds = []

    class CountingBuilder(InPlaceMerger):
        def build(self, recipe):
            builds.append(recipe.hash())
            return super().build(recipe)

    cfg = SearchConfig.from_dict(small_config(zoo_dir, budget={"generations": 2}, rescore_top_k=1,
                                              run_dir=str(tmp_path / "run")))
    run_search(cfg, quiet=True, builder_factory=lambda c: CountingBuilder(c.models, c.base_model, c.space.method))
    recs = [r for r in RunFolder.open(tmp_path / "run").records() if r.type == "candidate"]
    assert len(recs) == 8
    for r in recs:
        first = next(c for c in recs if c.generation == r.generation and c.index == 0)
        assert r.recipe_hash == first.recipe_hash and r.fitness == first.fitness
        assert r.cached_from == (None if r.index == 0 else [r.generation, 0])
    # the reference, one build per generation, the rescore (its full-dev key is new), and the
    # winner once more for its test-split scores
    assert len(builds) == 1 + 2 + 1 + 1
