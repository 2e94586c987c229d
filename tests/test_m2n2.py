"""M2N2 (search/optimizers/m2n2.py): resource competition, attraction, split-point crossover, its
archive of recipes over the sources, per-tensor genes (granularity.tensors), its config refusals,
and its searches on the steady-state engine (exact resume, pipelined workers).

The searches run with test_racing's constructed fitness (FakeExecutor: per-item scores that
depend on the genome, no model built)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_bad_inputs import run_cli, search_config, write_yaml
from test_racing import FakeExecutor, fake_config
from test_steady import Pipelined, check_killed_and_resumed, search

from evomerge.models.sources import load_source
from evomerge.recipes.mergekit import mergekit_yaml
from evomerge.recipes.parameter_space import evaluate_setting
from evomerge.runs.folder import RunFolder, history
from evomerge.search.codecs.parameter import Codec
from evomerge.search.optimizers.m2n2 import (
    M2N2,
    M2N2Options,
    crossover,
    seed_genomes,
    shared_fitness,
)
from evomerge.search.spaces.parameter import SearchSpace

M2N2_CFG = {"optimizer": {"name": "m2n2", "popsize": 4, "m2n2": {"archive_size": 5}}, "racing": None,
            "tasks": [{"name": "zoo_add", "weight": 0.5, "limit": 40}, {"name": "zoo_sub", "weight": 0.5, "limit": 40}],
            "budget": {"generations": 4}}


# ------------------------------------------------------------------ the mechanisms
def test_shared_fitness_rewards_an_item_by_how_few_solve_it():
    scores = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    cap = np.full(4, 0.25)
    fit, reward = shared_fitness(scores, cap, alpha=1.0)
    # item 0: two solvers share 0.25; item 1: one solver takes 0.25; items 2, 3: nobody
    assert reward.tolist() == [0.125, 0.25, 0.0, 0.0]
    assert fit.tolist() == [0.375, 0.125, 0.0]
    fit0, _ = shared_fitness(scores, cap, alpha=0.0)  # no competition: the weighted fitness
    assert fit0.tolist() == [0.5, 0.25, 0.0]


def test_crossover_mixes_each_side_of_the_split_with_its_own_ratio():
    a, b = np.zeros(6), np.ones(6)
    pos = np.array([0, 1, 2, 0, 1, 2])  # two sources' genes over three tensors
    child = crossover(a, b, pos, split=2, w=0.25)
    assert child.tolist() == [0.25, 0.25, 0.75, 0.25, 0.25, 0.75]


def _told(opt: M2N2, rows, cap):
    for g, s in rows:
        opt.tell_items(np.asarray(g, dtype=float), np.asarray(s, dtype=float), cap)


def test_a_niche_specialist_displaces_a_generalists_twin_under_competition_only():
    cap = np.full(5, 0.2)
    x0 = np.full(2, 0.5)
    gen, twin, niche = ([0.1, 0.1], [1, 1, 1, 0, 0]), ([0.2, 0.2], [1, 1, 1, 0, 0]), ([0.9, 0.9], [0, 0, 0, 1, 1])
    for alpha, survives in ((1.0, True), (0.0, False)):
        opt = M2N2(x0, 0.1, 4, 0, positions=[0, 1], seeds=[[0, 0], [1, 1]],
                   options=M2N2Options(archive_size=2, alpha=alpha))
        _told(opt, [gen, twin, niche], cap)
        # with competition: generalists 3 * 0.2 / 2 = 0.3 each, the niche 2 * 0.2 = 0.4 > 0.3
        assert any(np.array_equal(g, niche[0]) for g in opt.archive) is survives
        assert len(opt.archive) == 2


def test_attraction_picks_the_mate_that_solves_what_the_first_parent_does_not():
    cap = np.full(4, 0.25)
    opt = M2N2(np.full(3, 0.5), 0.1, 4, 3, positions=[0, 1, 2], seeds=[[0, 0, 0], [1, 1, 1]],
               options=M2N2Options(archive_size=4))
    opt.asked = 2  # the seeds are asked
    _told(opt, [([0, 0, 0], [1, 1, 0, 0]), ([1, 1, 1], [1, 1, 0, 0]), ([.5, .5, .5], [0, 0, 1, 1])], cap)
    for _ in range(40):
        opt.ask(1)
    firsts = {f for f, _ in opt.parents}
    assert firsts == {0, 1, 2}
    for first, second in opt.parents:  # the specialist mates with a generalist, a generalist with it
        assert (first == 2) != (second == 2)


def test_asks_are_the_seeds_then_crossovers_of_archive_members():
    opt = M2N2(np.full(2, 0.5), 0.1, 4, 0, positions=[0, 1], seeds=[[0, 0], [1, 1], [0.5, 0.5]])
    assert opt.ask(3).tolist() == [[0, 0], [1, 1], [0.5, 0.5]]
    _told(opt, [([0, 0], [1, 0]), ([1, 1], [0, 1])], np.full(2, 0.5))
    for child in opt.ask(20):  # a piecewise mix of (0, 0) and (1, 1): each gene w or 1 - w
        assert np.all((child >= 0) & (child <= 1))
    assert opt.asked == 23
    with pytest.raises(ValueError, match="same items"):
        opt.tell_items(np.zeros(2), np.zeros(3), np.full(3, 1 / 3))


# ------------------------------------------------------------------ per-tensor genes
def test_tensor_granularity_gives_each_tensor_its_own_value_in_parameter_order(zoo_dir):
    layout = load_source(str(zoo_dir / "base")).layout
    space = SearchSpace.model_validate({"method": "task_arithmetic", "parameters": {"weight": {"low": 0, "high": 2}},
                                        "granularity": {"layers_per_group": 1, "tensors": True}})
    models = [str(zoo_dir / "spec_add"), str(zoo_dir / "spec_rev")]
    codec = Codec(space, models, str(zoo_dir / "base"), layout)
    per_model = len(layout.pre) + len(layout.post) + layout.num_layers * len(layout.layer_suffixes)
    assert codec.dim == 2 * per_model
    pos = codec.positions()
    assert pos.tolist() == list(range(per_model)) * 2  # each source's genes follow the parameter order
    assert codec.groups[0].startswith("embed ") and codec.groups[-1].startswith("head ")
    genome = np.random.default_rng(0).random(codec.dim)
    values = codec.decode(genome)
    recipe = codec.to_recipe(genome)
    for s, (lo, _) in zip(recipe.slices, codec.layer_groups, strict=True):
        for src, model in zip(s.sources[:2], models, strict=True):  # the base follows
            for sfx in layout.layer_suffixes:
                got = evaluate_setting(src.parameters["weight"], layout.layer_name(lo, sfx), 0.0)
                assert got == values[(model, "weight", f"layers {lo}-{lo} {sfx}")]
    mk = yaml.safe_load(mergekit_yaml(recipe))  # mergekit reads the same filters
    weights = mk["slices"][1]["sources"][0]["parameters"]["weight"]
    assert len(mk["slices"]) == layout.num_layers and len(weights) == len(layout.layer_suffixes)
    assert "cannot run" not in mergekit_yaml(recipe)
    seeds = seed_genomes(codec, ("sources", "start", "plain"))
    assert seeds[0][:per_model].tolist() == [0.5] * per_model  # weight 1 in [0, 2]
    assert seeds[0][per_model:].tolist() == [0.0] * per_model
    assert np.array_equal(seeds[2], codec.x0) and seeds[3].tolist() == [0.1] * codec.dim  # start, plain 0.1
    # the start is the middle of the cube: the plain merge at 0.5 repeats it and is left out
    assert len(seeds) == 7 and [s[0] for s in seeds[2:]] == [0.5, 0.1, 0.3, 0.7, 0.9]


def test_a_crossover_of_per_tensor_recipes_builds_the_piecewise_mix_of_its_parents(tmp_path):
    # task arithmetic is linear in its weights: the child's model is, tensor by tensor, the
    # parents' models mixed with the ratio of the tensor's side of the split; the in-place merger
    # builds it as the engine does
    import torch
    from merge_helpers import model_family

    from evomerge.merge.engine import merge_state_dict
    from evomerge.merge.inplace import InPlaceMerger

    fam = [str(p) for p in model_family(tmp_path, "llama", n=2, layers=2, hidden=16)]
    layout = load_source(fam[0]).layout
    space = SearchSpace.model_validate({"method": "task_arithmetic", "parameters": {"weight": {"low": 0, "high": 2}},
                                        "granularity": {"layers_per_group": 1, "tensors": True}})
    codec = Codec(space, fam[1:], fam[0], layout)
    rng = np.random.default_rng(1)
    a, b = rng.random(codec.dim), rng.random(codec.dim)
    pos = codec.positions()
    split, w = int(pos.max()) // 2, 0.3
    child = crossover(a, b, pos, split, w)
    merger = InPlaceMerger(fam[1:], fam[0], "task_arithmetic", dtype="float32")
    built = {n: merge_state_dict(codec.to_recipe(g), dtype=torch.float32) for n, g in (("a", a), ("b", b))}
    got = {k: v.detach().clone() for k, v in merger.build(codec.to_recipe(child)).state_dict().items()}
    place = {}  # full tensor name -> its group's place along the parameter order
    for i, grp in enumerate(codec.groups):
        kind, rest = grp.split(" ", 1)
        if kind in ("embed", "head"):
            place[rest] = i
        else:
            layers, sfx = rest.split(" ", 1)
            place[layout.layer_name(int(layers.split("-")[0]), sfx)] = i
    assert set(place) == set(built["a"])
    for name, want_a in built["a"].items():
        t = w if place[name] < split else 1 - w
        want = (1 - t) * want_a + t * built["b"][name]
        assert torch.allclose(got[name], want, atol=1e-6), name
    assert any(place[n] < split for n in place) and any(place[n] >= split for n in place)


def test_tensor_granularity_refusals():
    with pytest.raises(ValueError, match="split_attn_mlp: false"):
        SearchSpace.model_validate({"method": "linear", "parameters": {"weight": {"low": 0, "high": 1}},
                                    "granularity": {"tensors": True, "split_attn_mlp": True}})
    with pytest.raises(ValueError, match="embeddings: own"):
        SearchSpace.model_validate({"method": "linear", "parameters": {"weight": {"low": 0, "high": 1}},
                                    "granularity": {"tensors": True, "embeddings": "with_layers"}})


# ------------------------------------------------------------------ config refusals
@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "over", "message"), [
    ({"name": "m2n2", "m2n2": {"archive_size": 1}}, {}, "archive_size"),
    ({"name": "m2n2", "m2n2": {"alpha": -1}}, {}, "alpha"),
    ({"name": "m2n2", "m2n2": {"in_flight": 0}}, {}, "in_flight"),
    ({"name": "m2n2", "m2n2": {"archive": 3}}, {}, "archive: unknown key"),
    ({"name": "m2n2", "m2n2": {"seeds": ["start"]}}, {}, "gives 1 seed genome"),
    ({"name": "m2n2", "m2n2": {"seeds": ["parents"]}}, {}, "seeds"),
    ({"name": "cma", "m2n2": {"archive_size": 4}}, {}, "m2n2 applies to name: m2n2"),
    ({"name": "m2n2"}, {"search_space": {"method": "ties", "parameters": {"density": {"low": 0.1, "high": 1}}}},
     "searches no per-model weight"),
    ({"name": "m2n2"}, {"tasks": [{"name": "zoo_add", "limit": 12, "weight": -1}]}, "negative weight"),
], ids=["archive", "alpha", "in-flight", "unknown-key", "one-seed", "seed-kind", "not-m2n2", "no-weight",
        "negative-weight"])
def test_bad_m2n2_settings_are_refused_before_the_run_folder(zoo_dir, tmp_path, capsys, optimizer, over, message):
    cfg = search_config(zoo_dir, tmp_path, optimizer=optimizer, racing=None, **over)
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and message in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ searches
@pytest.mark.slow
def test_an_m2n2_search_scores_every_candidate_on_the_same_items(zoo_dir, tmp_path):
    out = search(fake_config(zoo_dir, tmp_path, **M2N2_CFG))
    assert out.finished
    run = RunFolder.open(tmp_path / "run")
    cands = sorted((r for r in run.records() if r.type == "candidate"), key=lambda r: (r.generation, r.index))
    assert len(cands) == 16 and len({r.eval_key for r in cands}) == 1
    assert [len(set(r.genome)) for r in cands[:3]] == [2, 2, 2]  # the three sources alone (two gene values)
    state = run.path.joinpath("optimizer.json")
    saved = __import__("json").loads(state.read_text())
    assert saved["optimizer"] == "m2n2" and saved["told"] == 16 and len(saved["archive"]) == 5
    # the archive holds told genomes, and each member's mean score is its logged fitness
    fit = {tuple(r.genome): r.fitness for r in cands}
    for g, m in zip(saved["archive"], saved["mean_score"], strict=True):
        assert fit[tuple(g)] == pytest.approx(m)


@pytest.mark.slow
def test_a_pipelined_m2n2_search_has_the_history_of_an_in_process_one(zoo_dir, tmp_path):
    search(fake_config(zoo_dir, tmp_path, "inproc", **M2N2_CFG))
    expected = history(RunFolder.open(tmp_path / "inproc").records())
    Pipelined.slots = 2
    search(fake_config(zoo_dir, tmp_path, "piped", **M2N2_CFG), Pipelined)
    records = RunFolder.open(tmp_path / "piped").records()
    order = [(r.generation, r.index) for r in records if r.type == "candidate"]
    assert order != sorted(order)
    assert history(records) == expected


@pytest.mark.slow
@pytest.mark.parametrize("executor", [FakeExecutor, Pipelined], ids=["in-process", "pipelined"])
def test_an_m2n2_search_killed_and_resumed_equals_uninterrupted(zoo_dir, tmp_path, executor):
    Pipelined.slots = 2
    check_killed_and_resumed(zoo_dir, tmp_path, executor, M2N2_CFG, (2, 5, 1, 4), candidates=16)  # mid-block


def test_a_frozen_m2n2_config_round_trips(zoo_dir, tmp_path):
    cfg = fake_config(zoo_dir, tmp_path, **M2N2_CFG)
    again = type(cfg).from_dict(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again.optimizer.m2n2_options == M2N2Options(archive_size=5)
    assert again.search_key() == cfg.search_key()


def test_a_task_whose_metric_is_no_item_mean_is_refused_before_the_run_folder(zoo_dir, tmp_path, capsys,
                                                                             monkeypatch):
    # the zoo's tasks all report item means; a task that does not (a corpus-level metric) is
    # stood in for by the one rule's answer, read by the search plan
    from evomerge.runs import start

    monkeypatch.setattr(start, "per_item_means", lambda tasks, evs: {t.name: False for t in tasks})
    cfg = search_config(zoo_dir, tmp_path, optimizer={"name": "m2n2"}, racing=None)
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "needs per-item scores" in err and "not a mean over items" in err, err
    assert not (tmp_path / "run").exists()
