"""Racing (successive halving in a generation), per-item reuse, NSGA-II and its Pareto front."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import numpy as np
import pytest

from evomerge.cli.main import main
from evomerge.evaluation.trial import TrialResult
from evomerge.execution.registry import in_process
from evomerge.runs.folder import LOG, PARETO, RunFolder, dominates, history
from evomerge.runs.start import run_search
from evomerge.search import racing
from evomerge.search.config import ConfigError, SearchConfig

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- pure racing logic
def test_promote_constructed_case():
    res = {0: ("ok", 0.5), 1: ("ok", 0.7), 2: ("failed", -1.0), 3: ("ok", 0.7), 4: ("ok", 0.1)}
    assert racing.n_keep(5, 0.5) == 3
    assert racing.promote(res, 0.5) == [0, 1, 3]  # the three best; 1 and 3 tie, both go
    assert racing.promote(res, 0.3) == [1, 3]
    assert racing.promote(res, 0.2) == [1]  # a tie at the cut goes to the lower index
    assert racing.promote(res, 0.9) == [0, 1, 3, 4]  # a failed candidate is never promoted
    assert racing.stage_cost(20, [30, 100, 500], 0.25) == 20 * 30 + 5 * 70 + 2 * 400


def test_told_values_agree_with_elimination():
    reached = {0: 0, 1: 2, 2: 1, 3: 2, 4: 0, 5: 1}
    last = {0: 0.9, 1: 0.6, 2: 0.3, 3: 0.4, 4: 0.2, 5: 0.1}
    told = racing.told_values(reached, last, 3)
    assert told[1] == 0.6 and told[3] == 0.4  # survivors: their last-stage score
    for i in told:
        for j in told:
            if reached[i] > reached[j]:
                assert told[i] > told[j]  # went further -> told more
            if reached[i] == reached[j] and last[i] > last[j]:
                assert told[i] > told[j]  # same stage: the order of the scores is kept
    assert told[2] == 0.3 and told[5] == 0.1  # already below everyone who went further: not lowered
    assert told[0] == pytest.approx(0.1 - racing.MARGIN)  # stage 0 lowered just below stage 1
    told = racing.told_values({0: 1, 1: 0, 2: 1}, {0: 0.2, 1: 0.9, 2: 0.5}, 2)
    assert told[0] == 0.2 and told[2] == 0.5 and told[1] == pytest.approx(0.2 - racing.MARGIN)


# ----------------------------------------------------------------------------- a constructed fitness
class Crash(Exception):
    pass


class FakeExecutor:
    """Per-item accuracy with a known answer: item d of task t is right iff u(t, d) < q, where q is
    the candidate's first gene (second for the second task, ...). Per-item scores come back like
    lm-eval's; ``crash_after`` raises after that many jobs (a kill mid-generation)."""

    jobs_done = 0
    items_scored = 0
    crash_after: int | None = None
    pipelined = False

    def __init__(self, cfg, fitness, tokenizer):
        self.fitness = fitness

    @staticmethod
    def u(t: int, d: int) -> float:
        return (d * 0.6180339887498949 + t * 0.377) % 1.0

    def run(self, jobs, background=None):
        for job in jobs:
            yield job, self._job(job)
        if not jobs and background is not None:  # as LocalExecutor: the work source, one job at a time
            while (job := background.next()) is not None:
                background.done(job, self._job(job))

    def _job(self, job) -> TrialResult:
        if FakeExecutor.crash_after is not None and FakeExecutor.jobs_done >= FakeExecutor.crash_after:
            raise Crash()
        FakeExecutor.jobs_done += 1
        return self.score(job)

    def score(self, job) -> TrialResult:
        if job.kind == "test":  # the zoo's tasks have no test split here
            return TrialResult(job.recipe.hash(), math.nan, "ok", None, {}, {})
        metrics, items, per, total = {}, {}, {}, 0.0
        for ti, t in enumerate(self.fitness.tasks):
            idx = job.samples.get(t.name)
            if idx is not None and len(idx) == 0:
                continue
            docs = list(range(self.fitness.n_docs(t.name))) if idx is None else list(idx)
            q = job.genome[ti % len(job.genome)]
            vals = [1.0 if self.u(ti, d) < q else 0.0 for d in docs]
            metrics[t.name] = {"acc": sum(vals) / len(vals)}
            items[t.name] = len(docs)
            per[t.name] = {"doc": docs, "acc": vals}
            total += t.weight * metrics[t.name]["acc"]
            FakeExecutor.items_scored += len(docs)
        return TrialResult(job.recipe.hash(), total, "ok", None, metrics, items, item_scores=per)

    def close(self):
        pass


def fake_config(zoo_dir, tmp_path, name="run", **over) -> SearchConfig:
    data = {
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
        "tasks": [{"name": "zoo_add", "weight": 0.5}, {"name": "zoo_sub", "weight": 0.5}],
        "optimizer": {"name": "cma", "popsize": 8, "sigma0": 0.3}, "budget": {"generations": 3},
        "racing": {"stages": [8, 24, None], "keep": 0.5}, "seed": 1, "rescore_top_k": 2,
        "run_dir": str(tmp_path / name)}
    data.update(over)
    return SearchConfig.from_dict(data)


def fake_search(cfg, **kw):
    FakeExecutor.crash_after = kw.pop("crash_after", None)
    FakeExecutor.jobs_done = 0
    return run_search(cfg, quiet=True, executor_factory=in_process(FakeExecutor), **kw)


def test_racing_promotes_the_right_candidates(zoo_dir, tmp_path):
    cfg = fake_config(zoo_dir, tmp_path)
    FakeExecutor.items_scored = 0
    fake_search(cfg)
    records = RunFolder.open(tmp_path / "run").records()
    n = 500  # dev items per zoo task
    for g in range(3):
        st = {k: {r.index: r for r in records if r.type == "candidate" and r.generation == g
                  and r.stage == k} for k in range(3)}
        assert sorted(st[0]) == list(range(8))
        for k in (1, 2):  # the promoted are exactly the best half of the stage before (ties: index)
            prev = st[k - 1]
            ranked = sorted(prev, key=lambda i: (-prev[i].fitness, i))
            assert sorted(st[k]) == sorted(ranked[: racing.n_keep(len(prev), 0.5)])
        # nested items: each stage scores only its new items
        assert all(r.items == {"zoo_add": 8, "zoo_sub": 8} and r.items_scored == r.items for r in st[0].values())
        assert all(r.items_scored == {"zoo_add": 16, "zoo_sub": 16} for r in st[1].values())
        assert all(r.items == {"zoo_add": n, "zoo_sub": n} and r.items_scored == {"zoo_add": n - 24, "zoo_sub": n - 24}
                   for r in st[2].values())
        gen = next(r for r in records if r.type == "generation" and r.generation == g)
        told, reached = gen.racing.told, gen.racing.stage
        for i in range(8):
            assert reached[i] == max(k for k in range(3) if i in st[k])
            assert gen.racing.items[i] == sum(sum(st[k][i].items_scored.values()) for k in range(3) if i in st[k])
            for j in range(8):
                if reached[i] > reached[j]:
                    assert told[i] > told[j]
        # a stage score equals the constructed fitness on that stage's items
        r = st[0][0]
        q = r.genome[:2]
        assert r.metrics["zoo_add"]["acc"] == pytest.approx(np.mean(
            [FakeExecutor.u(0, d) < q[0] for d in _stage_items(cfg, g, 0, 8)]))
    # the last stage is the whole dev split: re-scoring is served from the cache; every item counted
    rescore = [r for r in records if r.type == "rescore"]
    assert rescore and all(r.cached_from is not None and r.items_scored == {} for r in rescore)
    spent = sum(sum(r.items_scored.values()) for r in records if hasattr(r, "items_scored"))
    assert spent == FakeExecutor.items_scored
    last_gen = [r for r in records if r.type == "generation"][-1]
    assert last_gen.item_evaluations == spent


def test_status_of_a_racing_run(zoo_dir, tmp_path, capsys):
    fake_search(fake_config(zoo_dir, tmp_path, budget={"generations": 1}))
    assert main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "8 (0 failed, 0 from the cache)" in out and "6 later-stage evaluations" in out
    assert "item evaluations" in out


def cli(*args: str):
    """`evomerge search *args --quiet` in a process and session of its own (tests/cli_process.py)."""
    import cli_process

    return cli_process.start("search", *args, "--quiet")


def _stage_items(cfg, g, task_index, n):
    from evomerge.evaluation.fitness import FitnessFunction
    from evomerge.runs.start import validate

    return FitnessFunction(cfg.tasks, validate(cfg), cfg.seed).racing_subset(task_index, g, n)


@pytest.mark.parametrize("optimizer", ["cma", "nsga2"])
def test_resumed_search_equals_uninterrupted(zoo_dir, tmp_path, monkeypatch, optimizer):
    over = {} if optimizer == "cma" else {"optimizer": {"name": "nsga2", "popsize": 6}, "racing": None,
                                          "tasks": [{"name": "zoo_add", "limit": 30}, {"name": "zoo_sub", "limit": 30}]}
    fake_search(fake_config(zoo_dir, tmp_path, "ref", **over))
    expected = history(RunFolder.open(tmp_path / "ref").records())
    cfg = fake_config(zoo_dir, tmp_path, "run", **over)
    # killed mid-generation three times by a crashing executor ...
    for crash in (3, 5, 9):
        with pytest.raises(Crash):
            fake_search(cfg, crash_after=crash, **({"resume": True, "run_dir": tmp_path / "run"}
                                                  if (tmp_path / "run" / LOG).is_file() else {}))
        cfg = None
    # ... and once between writing a candidate's item file and its log record
    real_append = RunFolder.append
    hit = {"n": 0}

    def append(self, rec):
        if rec.type == "candidate" and rec.items_file and hit["n"] == 0:
            hit["n"] = 1
            raise Crash()
        real_append(self, rec)

    monkeypatch.setattr(RunFolder, "append", append)
    with pytest.raises(Crash):
        fake_search(None, resume=True, run_dir=tmp_path / "run")
    monkeypatch.setattr(RunFolder, "append", real_append)
    fake_search(None, resume=True, run_dir=tmp_path / "run")
    got = RunFolder.open(tmp_path / "run").records()
    assert history(got) == expected
    if optimizer == "nsga2":
        a = json.loads((tmp_path / "ref" / PARETO).read_text())
        b = json.loads((tmp_path / "run" / PARETO).read_text())
        assert a == b


# ----------------------------------------------------------------------------- per-item reuse, real lm-eval
def test_item_reuse_equals_lm_eval(zoo_dir, tmp_path):
    from evomerge.evaluation.fitness import FitnessFunction
    from evomerge.evaluation.items import ItemStore
    from evomerge.models.folders import load_causal_lm, load_tokenizer
    from evomerge.runs.start import validate

    cfg = fake_config(zoo_dir, tmp_path, tasks=[{"name": "zoo_add", "weight": 0.3}, {"name": "zoo_rev", "weight": 0.7}])
    fit = FitnessFunction(cfg.tasks, validate(cfg), cfg.seed)
    store = ItemStore(tmp_path, fit, {"dtype": "float32"})
    assert all(store.reusable.values())
    model = load_causal_lm(zoo_dir / "spec_rev")
    tok = load_tokenizer(zoo_dir / "base")
    h = "r" * 64
    small = fit.stage_samples(0, 40)
    s0 = fit.score(model, tok, small)
    store.save("a.npz", h, s0.item_scores)
    for big in (fit.stage_samples(0, 130), fit.stage_samples(0, None)):
        missing, reused = store.plan(h, big)
        assert reused == 80 and all(set(small[t]) & set(missing[t]) == set() for t in small if missing[t])
        part = fit.score(model, tok, missing)
        part_res = TrialResult(h, part.fitness, "ok", None, part.metrics, part.items, item_scores=part.item_scores)
        combined = store.combine(h, big, part_res, -1.0)
        direct = fit.score(model, tok, big)  # lm-eval on the whole subset
        assert combined.metrics == direct.metrics  # exactly
        assert combined.fitness == direct.fitness
        assert 0.0 < direct.metrics["zoo_rev"]["acc"] < 1.0 or direct.metrics["zoo_add"]["acc"] < 1.0


# ----------------------------------------------------------------------------- NSGA-II on the zoo
@pytest.fixture(scope="module")
def nsga_run(zoo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nsga") / "run"
    cfg = SearchConfig.from_dict({
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
        "tasks": [{"name": t, "limit": 16} for t in ("zoo_add", "zoo_rev", "zoo_sub")],
        "optimizer": {"name": "nsga2", "popsize": 6}, "budget": {"generations": 2}, "rescore_top_k": 1,
        "threads": 1, "seed": 2, "run_dir": str(run_dir)})
    run_search(cfg, quiet=True)
    return run_dir


def test_pareto_front_is_non_dominated(nsga_run):
    front = json.loads((nsga_run / PARETO).read_text())
    assert front["objectives"] == ["zoo_add:acc", "zoo_rev:acc", "zoo_sub:acc"]
    members = front["front"]
    cands = [r for r in RunFolder.open(nsga_run).records() if r.type == "candidate" and r.status == "ok"]
    vec = lambda r: [r.metrics[t]["acc"] for t in ("zoo_add", "zoo_rev", "zoo_sub")]  # noqa: E731
    assert members
    for m in members:
        assert not any(dominates(vec(c), m["objectives"]) for c in cands)
    keys = {(m["generation"], m["index"]) for m in members}
    for c in cands:  # every other candidate is dominated by (or equal to) a front member
        if (c.generation, c.index) not in keys:
            assert any(dominates(m["objectives"], vec(c)) or m["objectives"] == vec(c) for m in members)


def test_export_weights_picks_by_the_floors_of_the_runs_config(nsga_run, tmp_path, capsys):
    import shutil

    import yaml

    from evomerge.recipes.parameter_space import Recipe

    run = tmp_path / "run"
    shutil.copytree(nsga_run, run)
    members = json.loads((run / PARETO).read_text())["front"]
    floor = max(m["objectives"][1] for m in members)  # a floor on zoo_rev that only the best meet
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["floors"] = {"base": False, "values": {"zoo_rev": floor}, "strength": 10.0}
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    best = max(members, key=lambda m: (m["objectives"][0] - 10.0 * max(0.0, floor - m["objectives"][1]),
                                       -m["generation"], -m["index"]))
    assert best["objectives"][1] == floor  # strength 10 outweighs any gain on zoo_add
    assert main(["export", str(run), "--weights", "zoo_add=1"]) == 0
    assert Recipe.from_yaml(capsys.readouterr().out).hash() == best["recipe_hash"]


def test_export_weights_picks_the_right_member(nsga_run, tmp_path, capsys):
    from evomerge.recipes.parameter_space import Recipe

    members = json.loads((nsga_run / PARETO).read_text())["front"]
    for w in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 1.0]):
        arg = ",".join(f"{t}={v}" for t, v in zip(("zoo_add", "zoo_rev", "zoo_sub"), w, strict=True))
        best = max(members, key=lambda m: (float(np.dot(w, m["objectives"])), -m["generation"], -m["index"]))
        assert main(["export", str(nsga_run), "--weights", arg]) == 0
        assert Recipe.from_yaml(capsys.readouterr().out).hash() == best["recipe_hash"]
    out = tmp_path / "mk.yml"
    assert main(["export", str(nsga_run), "--weights", "zoo_rev=1", "--format", "mergekit", "--out", str(out)]) == 0
    assert "Pareto pick" in out.read_text() and "mask_seed" not in out.read_text()
    capsys.readouterr()
    assert main(["status", str(nsga_run)]) == 0
    assert "non-dominated" in capsys.readouterr().out
    assert (nsga_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_weights_bad_inputs(nsga_run, zoo_dir, tmp_path, capsys):
    assert main(["export", str(nsga_run), "--weights", "zoo_mul=1"]) == 2
    assert "error: --weights: unknown task 'zoo_mul'; the run's tasks are zoo_add, zoo_rev, zoo_sub" in capsys.readouterr().err
    assert main(["export", str(nsga_run), "--weights", "zoo_add"]) == 2
    assert "is not TASK=NUMBER" in capsys.readouterr().err
    single = tmp_path / "single"
    cfg = fake_config(zoo_dir, tmp_path, "single", racing=None, budget={"generations": 1},
                      tasks=[{"name": "zoo_add", "limit": 8}])
    fake_search(cfg)
    assert main(["export", str(single), "--weights", "zoo_add=1"]) == 2
    err = capsys.readouterr().err
    assert "single-objective" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("over, msg", [
    ({"racing": {"stages": [50, 20, 100]}}, r"racing\.stages: stage sizes must increase strictly"),
    ({"racing": {"stages": [50]}}, r"racing\.stages: racing needs at least two stages"),
    ({"racing": {"stages": [None, 50]}}, r"only the last stage may be null"),
    ({"racing": {"stages": [10, 50], "keep": 1.5}}, r"racing\.keep: Input should be less than 1"),
    ({"racing": {"stages": [10, 50], "keep": 0}}, r"racing\.keep: Input should be greater than 0"),
    ({"racing": {"stages": [10, 50], "kep": 0.5}}, r"racing\.kep: unknown key \(did you mean 'keep'\?\)"),
    ({"tasks": [{"name": "zoo_add", "limit": 10}]}, r"tasks\.0\.limit: with racing the stages decide"),
    ({"optimizer": {"name": "nsga2"}}, r"does not combine with optimizer nsga2"),
    ({"racing": None, "optimizer": {"name": "nsga2"}, "tasks": [{"name": "zoo_add"}]}, r"needs at least two tasks"),
])
def test_bad_racing_and_nsga_configs(zoo_dir, tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        fake_config(zoo_dir, tmp_path, **over)


# ----------------------------------------------------------------------------- a real racing search, SIGKILLed
def test_racing_search_killed_equals_uninterrupted(zoo_dir, tmp_path):
    import yaml

    data = yaml.safe_load(fake_config(zoo_dir, tmp_path).to_yaml())
    data.update({"racing": {"stages": [6, 20, 40], "keep": 0.5}, "threads": 1, "run_dir": None,
                 "optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3}, "budget": {"generations": 2},
                 "rescore_top_k": 1})
    cfg_path = tmp_path / "race.yml"
    cfg_path.write_text(yaml.safe_dump(data))
    p = cli(str(cfg_path), "--run-dir", str(tmp_path / "ref"))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    expected = history(RunFolder.open(tmp_path / "ref").records())
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(7)
    for k, target in enumerate(sorted(rng.choice(np.arange(3, len(expected) - 2), size=2, replace=False))):
        p = cli(str(cfg_path), "--run-dir", str(run_dir)) if k == 0 else cli("--resume", str(run_dir))
        deadline = time.monotonic() + 200
        while p.poll() is None and time.monotonic() < deadline:
            log = run_dir / LOG
            if log.is_file() and log.read_bytes().count(b"\n") >= target:
                time.sleep(float(rng.uniform(0, 0.2)))
                break
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        # the kill landed mid-run: the process died of it, and the search had not finished
        assert p.returncode == -signal.SIGKILL, f"the search exited ({p.returncode}) before the kill"
        assert not any(r.type == "final" for r in RunFolder.open(run_dir).records())
    p = cli("--resume", str(run_dir))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert history(RunFolder.open(run_dir).records()) == expected
    assert not math.isnan(RunFolder.open(run_dir).records()[-1].fitness)
