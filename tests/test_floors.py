"""Per-task floors (evaluation/floors.py): the fitness terms, the config checks, and a search whose
floors are the base's scores, measured once, frozen with the run, applied to every record and
kept on resume."""

from __future__ import annotations

import math

import pytest

from evomerge.evaluation.floors import FloorsConfig, floored_fitness
from evomerge.evaluation.tasks import TaskConfig
from evomerge.runs.folder import RunFolder
from evomerge.runs.start import run_search
from evomerge.search.config import ConfigError, SearchConfig

TASKS = [TaskConfig(name=n, weight=w) for n, w in (("a", 0.5), ("b", 0.25), ("c", 0.25))]
METRICS = {"a": {"acc": 0.9}, "b": {"acc": 0.3}, "c": {"acc": 0.6}}
TOTAL = 0.5 * 0.9 + 0.25 * 0.3 + 0.25 * 0.6


def test_penalty_is_the_shortfall_below_each_floor():
    assert floored_fitness(TOTAL, METRICS, TASKS, None) == TOTAL
    floors = FloorsConfig(base_scores={"a": 0.5, "b": 0.4, "c": 0.7}, strength=2.0)
    # b is 0.1 below, c 0.1 below, a above: 2 * 0.2 off
    assert math.isclose(floored_fitness(TOTAL, METRICS, TASKS, floors), TOTAL - 0.4)
    # a given value wins over the base's score; a margin raises every floor
    floors = FloorsConfig(base_scores={"a": 0.5, "b": 0.4, "c": 0.7}, values={"c": 0.2},
                          margin=0.05)
    assert math.isclose(floored_fitness(TOTAL, METRICS, TASKS, floors), TOTAL - 0.15)
    # base: false reads the given values only
    floors = FloorsConfig(base=False, base_scores={"b": 0.9}, values={"a": 0.95})
    assert math.isclose(floored_fitness(TOTAL, METRICS, TASKS, floors), TOTAL - 0.05)
    # above every floor: the plain weighted sum
    floors = FloorsConfig(base_scores={"a": 0.1, "b": 0.1, "c": 0.1})
    assert floored_fitness(TOTAL, METRICS, TASKS, floors) == TOTAL


def test_min_term_rewards_the_task_nearest_its_floor():
    floors = FloorsConfig(mode="min", base_scores={"a": 0.5, "b": 0.2, "c": 0.7}, strength=0.5)
    # gaps 0.4, 0.1, -0.1: the smallest counts, above or below its floor
    assert math.isclose(floored_fitness(TOTAL, METRICS, TASKS, floors), TOTAL - 0.05)
    better = dict(METRICS, c={"acc": 0.75})
    assert floored_fitness(TOTAL, better, TASKS, floors) > floored_fitness(TOTAL, METRICS, TASKS,
                                                                            floors)


def test_floors_config_is_checked(zoo_dir):
    base = {"models": [str(zoo_dir / "spec_add")], "base_model": str(zoo_dir / "base"),
            "search_space": "ps_task_arithmetic", "budget": {"generations": 1},
            "tasks": [{"name": "zoo_add"}]}
    with pytest.raises(ConfigError, match="floors.values: unknown task 'zoo_rev'"):
        SearchConfig.from_dict(dict(base, floors={"values": {"zoo_rev": 0.5}}))
    with pytest.raises(ConfigError, match="floors.mode"):
        SearchConfig.from_dict(dict(base, floors={"mode": "max"}))
    with pytest.raises(ConfigError, match="floors.strength"):
        SearchConfig.from_dict(dict(base, floors={"strength": -1}))
    assert SearchConfig.from_dict(dict(base, floors={})).floors == FloorsConfig()


@pytest.mark.slow
def test_a_search_with_base_floors_freezes_them_and_applies_them(zoo_dir, tmp_path):
    names = ("zoo_rev", "zoo_sub")
    data = {"models": [str(zoo_dir / f"spec_{s}") for s in ("rev", "sub")],
            "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
            "tasks": [{"name": t, "weight": 0.5, "limit": 16} for t in names],
            "batch_size": 32, "threads": 1, "optimizer": {"name": "cma", "popsize": 3},
            "budget": {"generations": 1}, "seed": 1, "rescore_top_k": 1, "racing": None,
            "study": None, "floors": {"strength": 3.0, "values": {"zoo_rev": 0.9}}}
    cfg = SearchConfig.from_dict(data)
    run_dir = tmp_path / "run"
    run_search(cfg, run_dir=run_dir, quiet=True)
    frozen = SearchConfig.from_dict(RunFolder.open(run_dir).config_dict())
    scores = frozen.floors.base_scores
    assert set(scores) == set(names) and all(0.0 <= v <= 1.0 for v in scores.values())
    floor = {**scores, "zoo_rev": 0.9}
    records = RunFolder.open(run_dir).records()
    scored = [r for r in records if r.type in ("reference", "candidate", "rescore")]
    assert len(scored) == 5
    for r in scored:
        plain = sum(r.metrics[t]["acc"] / 2 for t in names)
        want = plain - 3.0 * sum(max(0.0, floor[t] - r.metrics[t]["acc"]) for t in names)
        assert math.isclose(r.fitness, want, rel_tol=1e-9, abs_tol=1e-12)
    assert any(r.fitness < sum(r.metrics[t]["acc"] / 2 for t in names) for r in scored)
    # a resume with the same config (no base scores in it) is the same search, not refused as
    # a changed config; the frozen scores stay
    out = run_search(SearchConfig.from_dict(data), run_dir=run_dir, resume=True, quiet=True)
    again = SearchConfig.from_dict(RunFolder.open(run_dir).config_dict())
    assert again.floors.base_scores == scores and out.evaluations == 3


@pytest.mark.slow
def test_base_scores_load_the_base_as_the_search_loads_its_sources(zoo_dir, tmp_path):
    # A pickled base (allowed by the config) in bfloat16: the floors' base scores are that
    # model's, loaded with the config's allow_pickle and dtype, not a float32 safetensors load.
    import shutil

    import torch
    from safetensors.torch import load_file

    from evomerge.models.folders import load_causal_lm, load_tokenizer
    from evomerge.runs.start import validate, with_base_scores

    base = tmp_path / "base"
    shutil.copytree(zoo_dir / "base", base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    names = ("zoo_add",)  # the base scores cover the whole dev split (500 items)
    cfg = SearchConfig.from_dict({
        "models": [str(zoo_dir / "spec_add")], "base_model": str(base),
        "search_space": "ps_task_arithmetic", "budget": {"generations": 1},
        "tasks": [{"name": t, "limit": 16} for t in names], "dtype": "bfloat16",
        "allow_pickle": True, "floors": {}})
    evaluators = validate(cfg)
    scores = with_base_scores(cfg, evaluators).floors.base_scores
    model = load_causal_lm(base, dtype="bfloat16", allow_pickle=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(base)
    want = {t: float(evaluators[t].evaluate(model, tok)[t].metrics["acc"]) for t in names}
    assert scores == want
