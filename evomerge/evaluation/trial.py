"""One candidate: genome -> recipe -> merged model -> score. Failures become a penalty fitness."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from evomerge.core.errors import ConfigError
from evomerge.evaluation.fitness import FitnessFunction, Samples
from evomerge.recipes.parameter_space import Recipe


class CandidateBuilder(Protocol):
    """Writes a recipe's merged weights into one resident model and returns it."""

    model: torch.nn.Module

    def build(self, recipe: Recipe) -> torch.nn.Module: ...


def make_builder(cfg) -> CandidateBuilder:
    """The candidate builder of a search config's space kind (loads the source models)."""
    if cfg.is_dfs:
        from evomerge.merge.dataflow import PathBuilder

        return PathBuilder(cfg.models, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle)
    from evomerge.merge.inplace.merger import InPlaceMerger

    # Parameter space: the sources are loaded once and each candidate is written into one model.
    # "auto" (a run frozen before the search decided it): the merger's memory plan chooses
    return InPlaceMerger(cfg.models, cfg.base_model, cfg.space.method, device=cfg.device,
                         dtype=None if cfg.dtype == "auto" else cfg.dtype,
                         placement=None if cfg.placement == "auto" else cfg.placement,
                         allow_pickle=cfg.allow_pickle)


@dataclass
class TrialResult:
    recipe_hash: str
    fitness: float
    status: str  # "ok" or "failed"
    reason: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    merge_s: float = 0.0
    eval_s: float = 0.0
    worker: str = "local"  # who scored it ("local", or a worker's name)
    node: str | None = None  # the Ray node that scored it (None: in-process)
    item_scores: dict | None = None  # per-item metric values (fitness.ItemScores), where logged


def non_finite_tensor(model: torch.nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def non_finite_metrics(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The task metrics that are NaN or infinite, as ``task:metric=value``."""
    return [f"{t}:{m}={v}" for t, ms in metrics.items() for m, v in ms.items() if not math.isfinite(v)]


def finite_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``metrics`` without its non-finite values (the run log is strict JSON: no NaN, no Infinity)."""
    return {t: {m: v for m, v in ms.items() if math.isfinite(v)} for t, ms in metrics.items()}


def non_finite_reason(bad: list[str]) -> str:
    return f"non-finite metric {', '.join(bad)}"


def result_of(recipe_hash: str, fitness: float, metrics: dict[str, dict[str, float]], items: dict[str, int],
              penalty: float, *, needs_fitness: bool = True, merge_s: float = 0.0, eval_s: float = 0.0,
              worker: str = "local", node: str | None = None, item_scores: dict | None = None) -> TrialResult:
    """Scores made into a trial's result: the non-finite rule, in one place for every path (a
    trial, a result combined from stored items, a test-split score). A non-finite metric, even one
    the fitness does not use (a perplexity, say), fails it, with that metric left out of its
    (JSON-safe) metrics; so does a non-finite fitness (``needs_fitness=False``: a test split's,
    NaN where a task has none). A failed result gets ``penalty`` as its fitness."""
    kw = {"merge_s": merge_s, "eval_s": eval_s, "worker": worker, "node": node}
    if bad := non_finite_metrics(metrics):
        return TrialResult(recipe_hash, penalty, "failed", non_finite_reason(bad), finite_metrics(metrics), items, **kw)
    if needs_fitness and not math.isfinite(fitness):
        return TrialResult(recipe_hash, penalty, "failed", f"non-finite fitness {fitness}", metrics, items, **kw)
    return TrialResult(recipe_hash, float(fitness), "ok", None, metrics, items, item_scores=item_scores, **kw)


def run_trial(recipe: Recipe, builder: CandidateBuilder, fitness: FitnessFunction, tokenizer,
              samples: Samples, penalty: float) -> TrialResult:
    """Builds ``recipe`` in place and scores it on ``samples`` (task -> items; None: full split)."""
    h = recipe.hash()
    t0 = time.perf_counter()
    try:
        model = builder.build(recipe)
        bad = non_finite_tensor(model)
        merge_s = time.perf_counter() - t0
        if bad is not None:
            return TrialResult(h, penalty, "failed", f"non-finite merged weights in {bad}", merge_s=merge_s)
        t1 = time.perf_counter()
        score = fitness.score(model, tokenizer, samples)
        eval_s = time.perf_counter() - t1
    except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:  # a bad candidate, not a bad search
        return TrialResult(h, penalty, "failed", f"{type(e).__name__}: {e}", merge_s=time.perf_counter() - t0)
    return result_of(h, score.fitness, score.metrics, score.items, penalty, merge_s=merge_s, eval_s=eval_s,
                     item_scores=score.item_scores)



def test_metrics(recipe: Recipe, builder: CandidateBuilder, tasks, tokenizer, batch_size: int) -> dict[str, dict[str, float]]:
    """A recipe's scores on each task's held-out ``test`` split, where the task has one.
    For reports only: test scores never enter the search's decisions."""
    return test_split_metrics(builder.build(recipe), tokenizer, tasks, batch_size)


def test_split_metrics(model: torch.nn.Module, tokenizer, tasks, batch_size: int) -> dict[str, dict[str, float]]:
    """A model's metrics on each task's ``test`` split (tasks without one are left out): the one
    test-split scoring of a search's winner, its background test records and materialize."""
    from evomerge.evaluation.evaluator import LmEvalEvaluator

    out = {}
    for t in tasks:
        try:
            ev = LmEvalEvaluator([t.name], split="test", batch_size=batch_size, **t.lm_eval_options())
        except ConfigError:  # no test split
            continue
        out[t.name] = ev.evaluate(model, tokenizer)[t.name].metrics
    return out
