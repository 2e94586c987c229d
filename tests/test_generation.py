"""The zoo's generation tasks (generate_until, regex answer filter, exact_match) on the hf backend:
specialists, per-item scores and their reuse, lm-eval's prompt options passed through, a search."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.core.errors import ConfigError
from evomerge.evaluation.evaluator import LmEvalEvaluator
from evomerge.evaluation.fitness import FitnessFunction, item_values
from evomerge.evaluation.tasks import TaskConfig
from evomerge.zoo.gen_tasks import write_gen_tasks

REPO = Path(__file__).resolve().parent.parent
GEN = ["zoo_add_gen", "zoo_rev_gen", "zoo_sub_gen"]


@pytest.fixture(scope="module")
def tok(zoo_dir):
    from evomerge.models.folders import load_tokenizer

    return load_tokenizer(zoo_dir / "base")


@pytest.fixture(scope="module")
def spec(zoo_dir):
    from evomerge.models.folders import load_causal_lm

    return {s: load_causal_lm(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")}


def test_committed_generation_tasks_are_what_the_generator_writes(tmp_path):
    for path in write_gen_tasks(tmp_path):
        rel = path.relative_to(tmp_path)
        assert (REPO / "evals" / rel).read_bytes() == path.read_bytes(), rel


def test_specialists_generate_their_answers_item_for_item_as_teacher_forced_acc(spec, tok):
    """Greedy generation with the answer filter scores each item as the loglikelihood task's acc
    (which is greedy decoding teacher-forced): the same items right, so the same mean."""
    for skill, model in spec.items():
        gen = LmEvalEvaluator([f"zoo_{skill}_gen"], split="test", log_samples=True)
        ll = LmEvalEvaluator([f"zoo_{skill}"], split="test", log_samples=True)
        g = gen.evaluate(model, tok, limit=120)[f"zoo_{skill}_gen"]
        a = ll.evaluate(model, tok, limit=120)[f"zoo_{skill}"]
        assert set(g.metrics) == {"exact_match"} and g.metrics["exact_match"] >= 0.9, skill
        gv, av = item_values(g.samples), item_values(a.samples)
        assert gv["doc"] == av["doc"] == list(range(120))
        assert gv["exact_match"] == av["acc"], skill
        right = next(s for s in g.samples if s["exact_match"] == 1.0)
        assert right["filtered_resps"][0] == right["target"]  # the regex kept the answer only


def test_generation_item_reuse_equals_lm_eval(spec, tok):
    """Per-item exact_match of a subset, combined with the missing items, equals lm-eval on the
    whole subset (racing's and the re-scoring's reuse)."""
    from evomerge.evaluation.items import ItemStore
    from evomerge.evaluation.trial import TrialResult

    tasks = [TaskConfig(name="zoo_add_gen", metric="exact_match", weight=0.5),
             TaskConfig(name="zoo_rev_gen", metric="exact_match", weight=0.5)]
    evs = {t.name: LmEvalEvaluator([t.name], split="dev", log_samples=True) for t in tasks}
    fit = FitnessFunction(tasks, evs, seed=3)
    store = ItemStore(Path("/nonexistent"), fit, {"dtype": "float32"})
    assert all(store.reusable.values())
    h, model = "g" * 64, spec["rev"]
    small = fit.stage_samples(0, 30)
    s0 = fit.score(model, tok, small)
    store._add(h, s0.item_scores)  # as load_logged does for a logged file
    big = fit.stage_samples(0, 90)
    missing, reused = store.plan(h, big)
    assert reused == 60
    part = fit.score(model, tok, missing)
    combined = store.combine(h, big, TrialResult(h, part.fitness, "ok", None, part.metrics, part.items,
                                                 item_scores=part.item_scores), -1.0)
    direct = fit.score(model, tok, big)
    assert combined.metrics["zoo_rev_gen"]["exact_match"] == direct.metrics["zoo_rev_gen"]["exact_match"]
    assert combined.fitness == direct.fitness
    assert 0.0 < direct.metrics["zoo_add_gen"]["exact_match"] < 1.0


def test_gen_kwargs_reach_the_generation(spec, tok):
    # one token can never hold a two-digit sum: every item is wrong
    ev = LmEvalEvaluator(["zoo_add_gen"], split="dev", gen_kwargs={"max_gen_toks": 1})
    assert ev.evaluate(spec["add"], tok, limit=20)["zoo_add_gen"].metrics["exact_match"] == 0.0
    with pytest.raises(ConfigError, match="not a generation task"):
        LmEvalEvaluator(["zoo_add"], gen_kwargs={"max_gen_toks": 1})
    with pytest.raises(ConfigError, match="fewshot_as_multiturn needs apply_chat_template"):
        LmEvalEvaluator(["zoo_add_gen"], fewshot_as_multiturn=True)


def test_prompt_options_pass_through(spec, tok):
    """system_instruction and apply_chat_template change the prompt the way lm_eval's flags do;
    the 2-shot generation task's examples end with EOS and are the same in every evaluation."""
    opts = TaskConfig(name="zoo_rev_gen", apply_chat_template=True, system_instruction="be brief").lm_eval_options()
    ev = LmEvalEvaluator(["zoo_rev_gen"], split="dev", log_samples=True, **opts)
    prompt = ev.evaluate(spec["rev"], tok, limit=2)["zoo_rev_gen"].samples[0]["arguments"][0][0]
    assert prompt.startswith("<|system|>be brief<|user|>r:") and prompt.endswith("<|assistant|>")
    shot = LmEvalEvaluator(["zoo_rev_gen_2shot"], split="dev", log_samples=True)
    runs = [shot.evaluate(spec["rev"], tok, samples={"zoo_rev_gen_2shot": idx})["zoo_rev_gen_2shot"].samples
            for idx in ([3, 5], [5])]
    p3 = {s["doc_id"]: s["arguments"][0][0] for s in runs[0]}[5]
    assert p3 == runs[1][0]["arguments"][0][0]  # per-document examples
    assert p3.count("</s>") == 2 and p3.endswith("=")


def test_a_generation_search_runs_races_and_reuses_items(zoo_dir, tmp_path):
    """A small search on two generation tasks (hf backend): racing stages, the exact_match fitness,
    per-item files in RUN_DIR/items/, the fitness the weighted sum of exact_match."""
    from evomerge.runs.folder import RunFolder
    from evomerge.runs.start import run_search
    from evomerge.search.config import SearchConfig

    cfg = SearchConfig.from_dict({
        "models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev")], "base_model": str(zoo_dir / "base"),
        "search_space": "ps_task_arithmetic", "threads": 1,
        "tasks": [{"name": "zoo_add_gen", "metric": "exact_match", "weight": 0.5},
                  {"name": "zoo_rev_gen", "metric": "exact_match", "weight": 0.5}],
        "optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3}, "budget": {"generations": 2},
        "racing": {"stages": [10, 30], "keep": 0.5}, "rescore_top_k": 1, "seed": 0,
        "run_dir": str(tmp_path / "run")})
    run_search(cfg, quiet=True)
    records = RunFolder.open(tmp_path / "run").records()
    evals = [r for r in records if r.type == "candidate"]
    assert {r.stage for r in evals} == {0, 1}
    assert any(getattr(r, "items_file", None) for r in evals)
    assert list((tmp_path / "run" / "items").glob("*.npz"))
    for r in evals:
        if r.status == "ok":
            assert set(r.metrics) == {"zoo_add_gen", "zoo_rev_gen"}
            assert r.fitness == pytest.approx(0.5 * r.metrics["zoo_add_gen"]["exact_match"]
                                              + 0.5 * r.metrics["zoo_rev_gen"]["exact_match"])
    with pytest.raises(ConfigError, match="no metric 'acc'"):
        from evomerge.runs.start import validate

        validate(SearchConfig.from_dict({**cfg.model_dump(mode="json"), "tasks": [{"name": "zoo_add_gen"}]}))


def test_vllm_backend_is_refused_where_it_cannot_run(zoo_dir, tmp_path, monkeypatch):
    """Before any weights load: without an importable vLLM (the reason named), and with a data-flow
    space (candidates change the layer count, which one resident engine cannot take)."""
    from evomerge.evaluation import vllm_engine
    from evomerge.runs.start import validate
    from evomerge.search.config import SearchConfig

    base = {"models": [str(zoo_dir / "spec_add"), str(zoo_dir / "spec_rev")], "base_model": str(zoo_dir / "base"),
            "search_space": "ps_task_arithmetic", "evaluator": {"backend": "vllm"}, "budget": {"generations": 1},
            "tasks": [{"name": "zoo_add_gen", "metric": "exact_match"}], "run_dir": str(tmp_path / "r")}
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: "ModuleNotFoundError: No module named 'vllm'")
    with pytest.raises(ConfigError, match=r"tasks.0: evaluator backend 'vllm' needs vLLM .*No module named"):
        validate(SearchConfig.from_dict(base))
    dfs = {**base, "search_space": {"kind": "dfs", "repeats": 1, "max_path_length": 8}, "base_model": None}
    with pytest.raises(ConfigError, match="data-flow search"):
        validate(SearchConfig.from_dict(dfs))
    with pytest.raises(ConfigError, match="evaluator.backend"):
        SearchConfig.from_dict({**base, "evaluator": {"backend": "tgi"}})


def test_requests_built_once_score_as_freshly_built(spec, tok):
    """The evaluator builds a document's requests once and reuses them: a later call on an
    overlapping subset logs what a fresh evaluator logs (doc ids, prompts, answers, scores)."""
    def rows(res):
        return [(s["doc_id"], s["arguments"][0][0], s["filtered_resps"][0], s["exact_match"]) for s in res.samples]

    ev = LmEvalEvaluator(["zoo_add_gen"], split="dev", log_samples=True)
    ev.evaluate(spec["add"], tok, samples={"zoo_add_gen": [3, 5, 7]})
    again = ev.evaluate(spec["rev"], tok, samples={"zoo_add_gen": [5, 9]})["zoo_add_gen"]
    fresh = LmEvalEvaluator(["zoo_add_gen"], split="dev", log_samples=True)
    assert rows(again) == rows(fresh.evaluate(spec["rev"], tok, samples={"zoo_add_gen": [5, 9]})["zoo_add_gen"])
    assert [r[0] for r in rows(again)] == [5, 9]
    assert rows(ev.evaluate(spec["rev"], tok, limit=4)["zoo_add_gen"]) == rows(fresh.evaluate(spec["rev"], tok, limit=4)["zoo_add_gen"])


def test_prefix_caching_is_no_part_of_a_scores_settings_key():
    """Prefix caching changes no score (tests/test_vllm_prefix_cache.py), so turning it off reuses
    the cached scores; a block size given enters the key, the default one does not (runs made
    before the option keep their keys)."""
    from evomerge.evaluation.backends import EvaluatorConfig

    on = EvaluatorConfig(backend="vllm")
    assert on.prefix_caching is True
    assert EvaluatorConfig(backend="vllm", prefix_caching=False).settings() == on.settings()
    assert on.settings() == {"evaluator": {"backend": "vllm", "kv_cache_gib": 1, "max_model_len": None,
                                           "enforce_eager": True}}
    assert EvaluatorConfig(backend="vllm", block_size=32).settings()["evaluator"]["block_size"] == 32
    assert EvaluatorConfig().settings() == {}
