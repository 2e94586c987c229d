"""Malformed search configs fail before any model is loaded, with a message naming the field."""

from __future__ import annotations

import copy

import pytest

import evomerge.search.loop as driver
from evomerge.runs.start import run_search
from evomerge.search.config import ConfigError, SearchConfig


def base_config(zoo_dir, tmp_path) -> dict:
    return {
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"),
        "search_space": "ps_task_arithmetic",
        "tasks": [{"name": "zoo_add", "metric": "acc", "limit": 20}, {"name": "zoo_rev", "limit": 20}],
        "budget": {"generations": 2},
        "run_dir": str(tmp_path / "run"),
    }


def _boom(*a, **k):
    raise AssertionError("a model was loaded before the config was validated")


def edit(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return cfg


DELETE = object()
INLINE_SPACE = {"method": "ties", "parameters": {"weight": {"low": 0.0, "high": 1.0},
                                                 "density": {"low": 0.1, "high": 1.0}}}
CASES = [
    ("unknown top-level key", "modles", ["x"], r"modles: unknown key \(did you mean 'models'\?\)"),
    ("unknown nested key", "tasks.0.metrc", "acc", r"tasks\.0\.metrc: unknown key \(did you mean 'metric'\?\)"),
    ("unknown method", "search_space", dict(INLINE_SPACE, method="tiez"), r"unknown merge_method 'tiez'"),
    ("reversed bounds", "search_space", dict(INLINE_SPACE, parameters={"weight": {"low": 1.0, "high": 0.0}}),
     r"search_space.*parameters\.weight.*low must be < high"),
    ("density outside its valid range", "search_space",
     dict(INLINE_SPACE, parameters={"density": {"low": 0.0, "high": 1.0}}), r"parameters\.density: bounds"),
    ("unknown space file", "search_space", "ps_nope", r"search space 'ps_nope' not found"),
    ("unknown task", "tasks.1.name", "zoo_mul", r"tasks\.1\.name: unknown lm-eval task 'zoo_mul'"),
    ("unknown metric", "tasks.0.metric", "f1", r"tasks\.0\.metric: task 'zoo_add' has no metric 'f1'"),
    ("missing model", "models.1", "/nonexistent/model", r"models\.1: model folder '/nonexistent/model' does not exist"),
    ("missing base", "base_model", DELETE, r"base_model: method 'task_arithmetic'.*needs a base model"),
    ("granularity", "search_space", {"method": "task_arithmetic", "parameters": {"weight": {"low": 0, "high": 2}},
                                     "granularity": {"layers_per_group": 3}},
     r"layers_per_group: 3 does not divide the 4 layers"),
    ("budget <= 0", "budget", {"generations": 0}, r"budget\.generations: Input should be greater than 0"),
    ("no budget", "budget", {}, r"budget: give generations, evaluations or time_limit_s"),
    ("bad optimizer", "optimizer", {"name": "sgd"}, r"optimizer\.name: unknown optimizer 'sgd'"),
    ("auto batch size", "batch_size", "auto", r"batch_size: Input should be a valid integer"),
    ("absurd popsize", "optimizer", {"popsize": 1_000_000_000},
     r"optimizer\.popsize: Input should be less than or equal to 10000"),
    ("absurd generations", "budget", {"generations": 10**12}, r"budget\.generations: .*less than or equal to 1000000"),
    ("absurd evaluations", "budget", {"evaluations": 10**12}, r"budget\.evaluations: .*less than or equal to 10000000"),
    ("absurd task limit", "tasks.0.limit", 10**10, r"tasks\.0\.limit: at most 1000000 items"),
    ("absurd racing stage", "racing", {"stages": [10, 10**10]}, r"racing\.stages: stage sizes must be <= 1000000"),
    ("too many racing stages", "racing", {"stages": list(range(1, 13))}, r"racing\.stages: at most 10 stages"),
    ("absurd rescore_top_k", "rescore_top_k", 10**9, r"rescore_top_k: .*less than or equal to 1000"),
    ("absurd batch size", "batch_size", 10**9, r"batch_size: .*less than or equal to 65536"),
    ("all weights 0", "tasks", [{"name": "zoo_add", "weight": 0, "limit": 5}, {"name": "zoo_rev", "weight": 0.0, "limit": 5}],
     r"tasks: every task has weight 0, so the fitness is 0 for every candidate"),
    ("non-finite weight", "tasks.1.weight", float("inf"), r"tasks\.1\.weight: must be a finite number"),
]


@pytest.mark.parametrize("what,path,value,message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_before_loading(zoo_dir, tmp_path, monkeypatch, what, path, value, message):
    monkeypatch.setattr(driver, "load_source", _boom)
    monkeypatch.setattr(driver, "load_tokenizer", _boom)
    data = edit(base_config(zoo_dir, tmp_path), path, value)
    with pytest.raises(ConfigError, match=message):
        run_search(SearchConfig.from_dict(data), builder_factory=_boom)
    assert not (tmp_path / "run").exists(), "a rejected config must leave no run folder"


def test_config_that_is_not_yaml(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("models: [a, b\ntasks: {")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SearchConfig.load(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="a search config is a YAML mapping"):
        SearchConfig.load(p)


def test_cli_reports_one_line(zoo_dir, tmp_path):
    import subprocess
    import sys

    import yaml

    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(edit(base_config(zoo_dir, tmp_path), "tasks.0.name", "zoo_addd")))
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tasks.0.name: unknown lm-eval task 'zoo_addd' (did you mean zoo_add, zoo_add_gen?)" in r.stderr


# ------------------------------------------------------------------ della: density against epsilon
def della_space(**parameters) -> dict:
    return {"method": "della", "parameters": {"weight": {"low": 0.0, "high": 1.0}, **parameters}}


def test_della_density_bounds_use_the_searched_epsilon():
    from evomerge.search.spaces.parameter import SearchSpace

    # A source's epsilon may reach 0.3: density 0.2 - 0.3 < 0 is refused ...
    with pytest.raises(ValueError, match=r"parameters\.density: bounds \[0\.2, 0\.8\] leave "
                                         r"della's valid range \(0\.3, 0\.7\) for density "
                                         r"\(epsilon up to 0\.3\)"):
        SearchSpace.model_validate(della_space(density={"low": 0.2, "high": 0.8},
                                               epsilon={"low": 0.05, "high": 0.3}))
    # ... while with epsilon at most 0.1, density from 0.12 is fine (the default 0.15 is not
    # what any source uses here).
    space = SearchSpace.model_validate(della_space(density={"low": 0.12, "high": 0.85},
                                                   epsilon={"low": 0.01, "high": 0.1}))
    assert space.parameters["density"].low == 0.12
    # Not searched, every source's epsilon is the default 0.15.
    with pytest.raises(ValueError, match=r"\(0\.15, 0\.85\) for density \(epsilon up to 0\.15\)"):
        SearchSpace.model_validate(della_space(density={"low": 0.12, "high": 0.85}))
    SearchSpace.model_validate(della_space(density={"low": 0.16, "high": 0.84}))


def test_negative_weights_are_allowed(zoo_dir, tmp_path):
    """A negative weight asks for a lower metric (fitness = sum of weight x metric)."""
    data = edit(base_config(zoo_dir, tmp_path), "tasks.1.weight", -0.5)
    assert SearchConfig.from_dict(data).tasks[1].weight == -0.5
