"""A NaN or infinite metric, even one the fitness does not use, fails that candidate with the
penalty fitness and a reason that names it; the search goes on and its log stays strict JSON."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from ray_helpers import tiny_config

from evomerge.evaluation.evaluator import LmEvalEvaluator
from evomerge.runs.folder import RunFolder
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

pytestmark = pytest.mark.slow


def test_a_nan_metric_gets_the_penalty_and_the_search_goes_on(zoo_dir, tmp_path, monkeypatch, capsys):
    original = LmEvalEvaluator.evaluate
    calls = itertools.count()

    def evaluate(self, model, tokenizer, **kw):
        """Adds a perplexity that the fitness does not use: NaN on every third dev evaluation,
        infinite on every test-split one."""
        out = original(self, model, tokenizer, **kw)
        k = next(calls)
        bad = math.inf if self.split == "test" else math.nan if k % 3 == 1 else 12.5
        return {t: dataclasses.replace(r, metrics={**r.metrics, "perplexity": bad}) for t, r in out.items()}

    monkeypatch.setattr(LmEvalEvaluator, "evaluate", evaluate)
    cfg = SearchConfig.from_dict(tiny_config(zoo_dir, background=False))
    out = run_search(cfg, run_dir=tmp_path / "run", quiet=True)
    assert out.finished
    records = RunFolder.open(tmp_path / "run").records()  # every line parsed as strict JSON
    cands = [r for r in records if r.type == "candidate"]
    failed = [r for r in cands if r.status == "failed"]
    assert failed and len(failed) < len(cands) and records[-1].type == "final"
    for r in failed:
        assert r.fitness == cfg.penalty_fitness
        assert r.reason == "non-finite metric zoo_rev:perplexity=nan"
        assert r.metrics["zoo_rev"].keys() == {"acc"}  # the finite metrics are kept
    assert all(r.metrics["zoo_rev"]["perplexity"] == 12.5 for r in cands if r.status == "ok")
    assert "perplexity" not in records[-1].test_metrics["zoo_rev"] and "acc" in records[-1].test_metrics["zoo_rev"]
    cap = capsys.readouterr()
    assert "failed: non-finite metric zoo_rev:perplexity=nan" in cap.err + cap.out
