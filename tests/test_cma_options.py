"""CMA-ES options: separable, IPOP/BIPOP restarts, bounds handling, the best-plain seed population;
the budget counting the candidates asked; and a search with restarts killed and resumed."""

from __future__ import annotations

import json

import cma
import numpy as np
import pytest

from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.search import budget
from evomerge.search.config import BudgetConfig, ConfigError, OptimizerConfig, SearchConfig
from evomerge.search.optimizers.cma import AUTO_SEPARABLE_DIM, CMAES, Restarts, plain_merge_genomes

CENTER = 0.3


def sphere(x: np.ndarray) -> np.ndarray:
    """Maximized at CENTER in every gene; CMA-ES converges on it in a few dozen generations."""
    return -np.sum((np.atleast_2d(x) - CENTER) ** 2, axis=1)


def drive(opt: CMAES, generations: int) -> list[np.ndarray]:
    asked = []
    for _ in range(generations):
        x = opt.ask()
        asked.append(x)
        opt.tell(x, sphere(x))
    return asked


def test_separable_is_pycmas_diagonal_covariance_and_auto_follows_the_dimension():
    x0 = np.full(4, 0.5)
    sep, full = CMAES(x0, 0.2, 6, seed=0, separable=True), CMAES(x0, 0.2, 6, seed=0)
    assert sep.es.opts["CMA_diagonal"] is True and full.es.opts["CMA_diagonal"] is False
    drive(sep, 15)
    drive(full, 15)
    # full: a covariance matrix with off-diagonal terms learned; separable: no matrix, the
    # per-gene scales (pycma's sigma_vec) adapted instead
    assert isinstance(full.es.sm, cma.sampler.GaussFullSampler)
    c = full.es.sm.C
    assert np.count_nonzero(c - np.diag(np.diag(c))) > 0
    assert isinstance(sep.es.sm, cma.sampler.GaussStandardConstant)
    assert not np.allclose(sep.es.sigma_vec.scaling, 1.0)
    assert CMAES(np.full(AUTO_SEPARABLE_DIM + 1, 0.5), 0.2, 6, separable="auto").separable
    assert not CMAES(np.full(AUTO_SEPARABLE_DIM, 0.5), 0.2, 6, separable="auto").separable


def test_ipop_restarts_when_cma_converges_and_doubles_the_population():
    opt = CMAES(np.full(4, 0.5), 0.2, 6, seed=3, restarts=Restarts("ipop", max=2, tolx=1e-3))
    sizes = [len(x) for x in drive(opt, 200)]
    runs = opt.runs
    assert [r["popsize"] for r in runs] == [6, 12, 24]  # two restarts, then none is left
    assert [r["regime"] for r in runs] == ["small", "large", "large"]
    assert "tolx" in runs[0]["stop"] and "tolx" in runs[1]["stop"]
    start = runs[1]["generation"]
    assert sizes[:start] == [6] * start and sizes[start] == 12 and opt.popsize == 24
    assert runs[1]["x0"] != runs[0]["x0"]  # a random point of the cube, not the first start
    assert all(0 <= v <= 1 for r in runs for v in r["x0"])
    # each run converged on the optimum before the next began
    assert abs(runs[0]["best"]) < 1e-4 and abs(runs[1]["best"]) < 1e-4
    json.dumps(opt.state_dict())  # a JSON checkpoint


def test_bipop_follows_pycmas_rule_large_first_then_small_local_runs():
    opt = CMAES(np.full(4, 0.5), 0.2, 6, seed=5, restarts=Restarts("bipop", max=2, tolx=1e-3))
    drive(opt, 400)
    runs = opt.runs
    assert runs[1]["regime"] == "large" and runs[1]["popsize"] == 12  # run 0 counts as small
    small = [r for r in runs[2:] if r["regime"] == "small"]
    assert small, [r["regime"] for r in runs]
    for r in small:  # between the first population and the last large one, with a smaller step
        assert 6 <= r["popsize"] <= 12 and r["sigma0"] <= 0.2
    assert sum(r["regime"] == "large" for r in runs) == 2  # max counts the large restarts only


def test_patience_restarts_a_run_that_stops_improving():
    opt = CMAES(np.full(3, 0.5), 0.2, 4, seed=0, restarts=Restarts("ipop", max=1, patience=2))
    # a fitness that gets worse every generation never improves on the first generation's best
    for g in range(4):
        x = opt.ask()
        opt.tell(x, -g + 0.1 * x.sum(axis=1))
    assert opt.runs[0]["stop"] == ["patience"]
    assert opt.runs[1]["generation"] == 3 and opt.popsize == 8


def test_restarts_are_a_function_of_the_seed_and_history_only():
    def run(global_seed: int) -> list[np.ndarray]:
        np.random.seed(global_seed)  # pycma must not draw from the global stream
        opt = CMAES(np.full(4, 0.5), 0.2, 6, seed=11, separable=True, bounds="penalty",
                    restarts=Restarts("bipop", max=2, tolx=1e-3))
        return drive(opt, 150)

    a, b = run(0), run(1)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({len(x) for x in a}) > 1  # restarts changed the population size


def test_penalty_bounds_clip_samples_onto_the_cube_and_transform_maps_them_inside():
    # the optimum (all genes high) outside the cube: a BoundPenalty strategy's samples are clipped
    # onto its faces (pycma penalizes the distance), BoundTransform's stay strictly inside
    on_face = {}
    for bounds in ("penalty", "transform"):
        opt = CMAES(np.full(3, 0.95), 0.3, 8, seed=0, bounds=bounds)
        assert isinstance(opt.es.boundary_handler, cma.BoundPenalty if bounds == "penalty" else cma.BoundTransform)
        on_face[bounds] = 0
        for _ in range(10):
            x = opt.ask()
            assert np.all((x >= 0) & (x <= 1))
            on_face[bounds] += int(np.sum(x == 1.0))
            opt.tell(x, np.sum(x, axis=1))
    assert on_face["penalty"] > 0 and on_face["transform"] == 0


def test_best_plain_seed_generation_then_cma_from_the_best_seed():
    x0 = np.array([0.5, 0.5, 0.5, 0.2])  # three per-model genes and a method-wide one
    seeds = plain_merge_genomes(x0, np.array([True, True, True, False]), (0.1, 0.5, 0.9))
    assert seeds.tolist() == [[0.5, 0.5, 0.5, 0.2], [0.1, 0.1, 0.1, 0.2], [0.9, 0.9, 0.9, 0.2]]
    opt = CMAES(x0, 0.1, 6, seed=0, seeds=seeds)
    first = opt.ask()
    assert np.array_equal(first, seeds) and opt.popsize == 3
    opt.tell(first, np.array([0.1, 0.7, 0.3]))  # the second seed is best
    assert opt.popsize == 6 and opt.runs[0]["x0"] == seeds[1].tolist()
    assert np.allclose(opt.es.mean, seeds[1])
    assert opt.state_dict()["start_point"] == seeds[1].tolist()
    assert len(opt.ask()) == 6


def test_an_evaluations_budget_counts_the_candidates_asked():
    b = BudgetConfig(evaluations=50)
    assert budget.generations_left(b, 3, 49) and not budget.generations_left(b, 3, 50)
    b = BudgetConfig(generations=4, evaluations=1000)
    assert not budget.generations_left(b, 4, 40)
    # IPOP doubling: 10, 10, 20, 20 asked -> 60 >= 50 stops after four generations
    sizes, asked, g = [10, 10, 20, 20, 40], 0, 0
    while budget.generations_left(BudgetConfig(evaluations=50), g, asked):
        asked += sizes[g]
        g += 1
    assert (g, asked) == (4, 60)


def test_config_options_apply_to_cma_only():
    cfg = OptimizerConfig(name="cma", separable="auto", restarts={"kind": "bipop", "max": 4, "tolx": 0.01})
    opts = cfg.cma_options()
    assert opts["restarts"] == Restarts("bipop", 4, 2.0, None, 0.01, None, "random")
    with pytest.raises(ValueError, match="restarts apply to name: cma"):
        OptimizerConfig(name="random", restarts={"kind": "ipop"})
    with pytest.raises(ValueError, match="plain_levels"):
        OptimizerConfig(plain_levels=(0.5, 1.5))
    with pytest.raises(ValueError):
        OptimizerConfig(restarts={"kind": "lpop"})


# ----------------------------------------------------------------------------- a search on the zoo
def test_a_search_with_restarts_killed_and_resumed_gives_the_same_history(zoo_dir, tmp_path):
    from tests.test_racing import Crash, fake_config, fake_search

    over = {"optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3, "start": "best_plain",
                          "restarts": {"kind": "ipop", "max": 2, "patience": 1}},
            "budget": {"evaluations": 40}}
    fake_search(fake_config(zoo_dir, tmp_path, "ref", **over))
    ref = RunFolder.open(tmp_path / "ref").records()
    gens = [r for r in ref if r.type == "generation"]
    sizes = [r.popsize for r in gens]
    assert sizes[0] == 6  # the seed generation: x0 and five plain merges (x0's level left out)
    assert 8 in sizes and sizes.index(8) > 1 and sum(sizes) >= 40 > sum(sizes[:-1])
    state = json.loads((tmp_path / "ref" / "optimizer.json").read_text())
    assert len(state["runs"]) >= 2 and state["start_point"] is not None
    cfg = fake_config(zoo_dir, tmp_path, "run", **over)
    for crash in (3, 11, 25):  # killed in the seed generation, the first run and after a restart
        with pytest.raises(Crash):
            fake_search(cfg, crash_after=crash, **({"resume": True, "run_dir": tmp_path / "run"}
                                                  if (tmp_path / "run" / LOG).is_file() else {}))
        cfg = None
    fake_search(None, resume=True, run_dir=tmp_path / "run")
    assert history(RunFolder.open(tmp_path / "run").records()) == history(ref)
    with pytest.raises(ConfigError, match="best_plain needs a parameter space"):
        SearchConfig.from_dict({"models": [str(zoo_dir / "spec_add")], "search_space": "dfs",
                                "tasks": [{"name": "zoo_add"}], "budget": {"generations": 1},
                                "optimizer": {"start": "best_plain"}})
