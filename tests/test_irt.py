"""The IRT fitness estimator (evaluation/irt.py, search/irt_fitness.py; docs/irt.md)."""

from __future__ import annotations

import numpy as np
import pytest
from test_racing import Crash, FakeExecutor, fake_config, fake_search

from evomerge.core.errors import ConfigError
from evomerge.evaluation import irt
from evomerge.runs.folder import LOG, RunFolder, history


def _responses(seed: int, models: int = 8, items: int = 120):
    rng = np.random.default_rng(seed)
    a, d = rng.uniform(0.5, 2.0, items), rng.normal(0, 1.5, items)
    p = irt._sigmoid(np.outer(rng.normal(0, 1, models), a) + d)
    return (rng.random(p.shape) < p).astype(np.float64)


# ----------------------------------------------------------------------------- the estimator itself
def test_estimate_of_a_candidate_scored_on_every_item_is_its_mean():
    y = _responses(0)
    params, _ = irt.fit_2pl(y[:5])
    for row in y[5:]:
        order = np.random.default_rng(1).permutation(len(row))  # any item order
        assert irt.estimate(params, order, row[order]) == sum(row.tolist()) / len(row)
    # on anchors only it is a prediction: observed items count as scored, the rest predicted in (0, 1)
    anchors = irt.choose_anchors(params, 10, [0, 0])
    est = irt.estimate(params, anchors, y[6, anchors])
    lo, hi = y[6, anchors].sum() / 120, (y[6, anchors].sum() + 110) / 120
    assert lo < est < hi


def test_fit_and_anchors_are_deterministic():
    y = _responses(2)
    y[3, ::3] = np.nan  # a partly scored model (the population: its anchors only)
    (p1, t1), (p2, t2) = irt.fit_2pl(y), irt.fit_2pl(y.copy())
    assert p1.a.tobytes() == p2.a.tobytes() and p1.d.tobytes() == p2.d.tobytes() and t1.tobytes() == t2.tobytes()
    assert np.all(p1.a > 0) and np.all(np.isfinite(p1.d))
    # the fitted items order the models as their scores do (a sanity check of the fit's direction)
    full = np.isfinite(y).all(1)
    assert np.corrcoef(t1[full], np.nanmean(y[full], 1))[0, 1] > 0.9
    for how in ("cluster", "random"):
        a = irt.choose_anchors(p1, 12, [5, 1], how)
        assert a == irt.choose_anchors(p1, 12, [5, 1], how) and len(set(a)) == 12 and a == sorted(a)
    assert irt.choose_anchors(p1, 12, [5, 1], "random") != irt.choose_anchors(p1, 12, [6, 1], "random")
    with pytest.raises(ConfigError, match="only 120 items"):
        irt.choose_anchors(p1, 121, [0, 0], task="t")


# ----------------------------------------------------------------------------- in a search
@pytest.fixture(autouse=True)
def fake_sources(monkeypatch):
    """The sources' whole-split scores by FakeExecutor's rule (a source is a constant genome), so
    that these searches load no model; the real scoring (lm-eval in the driver) runs in
    scripts/bench_fitness.py."""
    from evomerge.search import irt_fitness

    def score(cfg, fitness, tokenizer):
        qs = [0.15, 0.5, 0.85, 0.3][: len(cfg.models) + 1]
        return {t.name: np.array([[1.0 if FakeExecutor.u(ti, d) < q else 0.0 for d in range(fitness.n_docs(t.name))]
                                  for q in qs]) for ti, t in enumerate(fitness.tasks)}

    monkeypatch.setattr(irt_fitness, "score_sources", score)


IRT = {"fitness": {"estimator": "irt", "anchors": 12}, "racing": None}


def test_anchor_set_larger_than_the_split_is_refused(zoo_dir, tmp_path):
    cfg = fake_config(zoo_dir, tmp_path, fitness={"estimator": "irt", "anchors": 501}, racing=None)
    with pytest.raises(ConfigError, match=r"fitness.anchors: 501 .* only 500 items in its dev split"):
        fake_search(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder exists
    with pytest.raises(ConfigError, match="apply to estimator: irt"):
        fake_config(zoo_dir, tmp_path, fitness={"anchors": 20})
    with pytest.raises(ConfigError, match="larger than the anchors"):
        fake_config(zoo_dir, tmp_path, fitness={"estimator": "irt", "anchors": 30}, racing={"stages": [30, None]})


@pytest.mark.slow
def test_irt_search_scores_anchors_and_logs_its_fits(zoo_dir, tmp_path, capsys):
    fake_search(fake_config(zoo_dir, tmp_path, budget={"generations": 2}, **IRT))
    from evomerge.cli.main import main

    assert main(["status", str(tmp_path / "run")]) == 0  # an irt record does not trouble the report
    assert "item evaluations" in capsys.readouterr().out
    records = RunFolder.open(tmp_path / "run").records()
    fits = [r for r in records if r.type == "irt"]
    assert [f.generation for f in fits] == [-1, 0, 1]
    anchors = fits[0].anchors
    assert sorted(anchors) == ["zoo_add", "zoo_sub"] and all(len(v) == 12 for v in anchors.values())
    assert fits[0].items_scored == {"zoo_add": 4 * 500, "zoo_sub": 4 * 500}  # 3 sources + base, whole split
    assert fits[0].rows == {"zoo_add": 5, "zoo_sub": 5} and fits[1].rows == {"zoo_add": 13, "zoo_sub": 13}
    cands = [r for r in records if r.type == "candidate"]
    assert len(cands) == 16
    for r in cands:
        assert r.items_scored == {"zoo_add": 12, "zoo_sub": 12}
        est = r.estimated
        assert r.fitness == pytest.approx(0.5 * est["zoo_add"]["acc"] + 0.5 * est["zoo_sub"]["acc"])
        assert r.metric("zoo_add", "acc") == est["zoo_add"]["acc"]  # what the search used
    gen = [r for r in records if r.type == "generation"][-1]
    assert gen.item_evaluations == sum(sum(r.items_scored.values()) for r in records
                                       if r.type in ("reference", "candidate", "irt"))
    final = records[-1]
    assert final.type == "final" and not any(r.estimated for r in records if r.type == "rescore")


@pytest.mark.slow
@pytest.mark.parametrize("over", [IRT, {"fitness": {"estimator": "irt", "anchors": 8},
                                        "racing": {"stages": [24, None], "keep": 0.5}}],
                         ids=["irt", "irt+racing"])
def test_irt_search_killed_and_resumed_equals_uninterrupted(zoo_dir, tmp_path, over):
    fake_search(fake_config(zoo_dir, tmp_path, "ref", **over))
    ref = RunFolder.open(tmp_path / "ref").records()
    cfg = fake_config(zoo_dir, tmp_path, "run", **over)
    for crash in (2, 9, 14):  # killed mid-generation by a crashing executor, three times
        with pytest.raises(Crash):
            fake_search(cfg, crash_after=crash, **({"resume": True, "run_dir": tmp_path / "run"}
                                                  if (tmp_path / "run" / LOG).is_file() else {}))
        cfg = None
    fake_search(None, resume=True, run_dir=tmp_path / "run")
    got = RunFolder.open(tmp_path / "run").records()
    assert history(got) == history(ref)  # the fits (their input hashes) and every estimate, bit for bit
    assert sum(r.type == "irt" and r.generation == -1 for r in got) == 1  # the sources scored once
    if "stages" in (over.get("racing") or {}):
        anchors = next(r for r in got if r.type == "irt").anchors
        st0 = [r for r in got if r.type == "candidate" and r.stage == 0]
        assert all(r.items == {"zoo_add": 8, "zoo_sub": 8} and r.estimated for r in st0)
        st1 = [r for r in got if r.type == "candidate" and r.stage == 1]
        assert st1 and all(r.items_scored == {"zoo_add": 16, "zoo_sub": 16} and not r.estimated for r in st1)
        assert all(len(v) == 8 for v in anchors.values())


@pytest.mark.slow
def test_resume_refuses_a_changed_fit_input(zoo_dir, tmp_path):
    fake_search(fake_config(zoo_dir, tmp_path, budget={"generations": 1}, **IRT))
    import json

    log = tmp_path / "run" / LOG
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        d = json.loads(line)
        if d.get("type") == "irt" and d["generation"] == 0:
            d["inputs"] = "0" * 64
            lines[i] = json.dumps(d)
    # drop the final record so the resume replays generation 0 and meets the changed fit
    lines = [ln for ln in lines if json.loads(ln).get("type") not in ("final", "rescore", "test")]
    log.write_text("\n".join(lines) + "\n")
    from evomerge.core.errors import RunFolderError

    with pytest.raises(RunFolderError, match="IRT fit after generation 0"):
        fake_search(fake_config(zoo_dir, tmp_path, budget={"generations": 2}, **IRT), resume=True,
                    run_dir=tmp_path / "run")


@pytest.mark.slow
def test_nsga2_objectives_are_the_estimates(zoo_dir, tmp_path):
    import json

    from evomerge.runs.folder import PARETO

    fake_search(fake_config(zoo_dir, tmp_path, budget={"generations": 1}, optimizer={"name": "nsga2", "popsize": 6},
                            **IRT))
    recs = {(r.generation, r.index): r for r in RunFolder.open(tmp_path / "run").records() if r.type == "candidate"}
    front = json.loads((tmp_path / "run" / PARETO).read_text())["front"]
    assert front
    for m in front:
        est = recs[(m["generation"], m["index"])].estimated
        assert m["objectives"] == [est["zoo_add"]["acc"], est["zoo_sub"]["acc"]]
