"""Fitness: the weighted sum of task metrics, on seeded evaluation subsets.

During the search each generation scores every candidate on the same subset of each task's
split (``limit`` items chosen by a seed that depends on the search seed, the generation and the
task), so candidates of one generation are compared on equal terms and different generations
see different items. ``generation=None`` scores the whole split (the final re-scoring).

The item choice is made here, once, as ``Samples`` (task -> item indices, None for the whole
split); whoever scores a candidate (the in-process executor or a worker) is given the samples.

Racing (evomerge/racing.py) draws, per (seed, generation, task), one seeded permutation of the
split; stage k scores its first ``n_k`` items, so each stage's items contain the previous stage's.

``score`` also returns each item's per-metric values (``ItemScores``, from lm-eval's per-sample
log) where the evaluators log samples, so that scores on a larger subset can reuse the items
already scored (evomerge/items.py). An empty item list for a task skips that task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.evaluation.evaluator import Evaluator
from evomerge.evaluation.floors import FloorsConfig, floored_fitness
from evomerge.evaluation.tasks import TaskConfig

Samples = dict[str, list[int] | None]  # task -> item indices of its split (None: every item)
# task -> {"doc": [item index, ...], metric: [value per item, ...]} (lm-eval's "none" filter)
ItemScores = dict[str, dict[str, list]]


@dataclass(frozen=True)
class Score:
    fitness: float
    metrics: dict[str, dict[str, float]]  # task -> metric -> value
    items: dict[str, int]  # task -> items scored
    item_scores: ItemScores | None = None  # per-item values, where the evaluators log samples


class FitnessFunction:
    def __init__(self, tasks: list[TaskConfig], evaluators: dict[str, Evaluator], seed: int,
                 floors: FloorsConfig | None = None):
        self.tasks = tasks
        self.evaluators = evaluators
        self.seed = seed
        self.floors = floors  # per-task floors (floors.py): the weighted sum minus a lost skill's cost

    def subset(self, task_index: int, generation: int | None) -> list[int] | None:
        task = self.tasks[task_index]
        n = self.evaluators[task.name].n_docs(task.name)
        if generation is None or task.limit is None or task.limit >= n:
            return None
        rng = np.random.default_rng([self.seed, generation, task_index])
        return sorted(int(i) for i in rng.choice(n, size=task.limit, replace=False))

    def racing_subset(self, task_index: int, generation: int, n: int | None) -> list[int] | None:
        """The first ``n`` items of a seeded permutation of the split (None: the whole split).
        The permutation depends on (seed, generation, task) only: stages are nested."""
        total = self.evaluators[self.tasks[task_index].name].n_docs(self.tasks[task_index].name)
        if n is None or n >= total:
            return None
        perm = np.random.default_rng([self.seed, generation, task_index, 7]).permutation(total)
        return sorted(int(i) for i in perm[:n])

    def stage_samples(self, generation: int, n: int | None) -> Samples:
        """The items of one racing stage (``n`` per task) in ``generation``."""
        return {t.name: self.racing_subset(i, generation, n) for i, t in enumerate(self.tasks)}

    def n_docs(self, task: str) -> int:
        return self.evaluators[task].n_docs(task)

    def samples(self, generation: int | None) -> Samples:
        """The items every candidate of ``generation`` is scored on (None: the whole splits)."""
        return {t.name: self.subset(i, generation) for i, t in enumerate(self.tasks)}

    def settings_key(self, samples: Samples, extra: dict | None = None) -> str:
        """Hash of everything besides the recipe that decides a score: the tasks' settings and the
        items scored (plus ``extra``: dtype, batch size, device). Two evaluations with the same
        recipe hash and settings key give the same score."""
        data = {"tasks": [t.model_dump(mode="json") for t in self.tasks],
                "subsets": [samples.get(t.name) for t in self.tasks], "extra": extra or {}}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def score(self, model: torch.nn.Module, tokenizer, samples: Samples) -> Score:
        metrics, items, total, per_item = {}, {}, 0.0, {}
        for task in self.tasks:
            idx = samples.get(task.name)
            if idx is not None and len(idx) == 0:  # nothing to score for this task (items reused)
                continue
            res = self.evaluators[task.name].evaluate(
                model, tokenizer, samples={task.name: idx} if idx is not None else None)[task.name]
            metrics[task.name] = res.metrics
            items[task.name] = res.n_items
            total += task.weight * res.metrics[task.metric]
            if res.samples:
                per_item[task.name] = item_values(res.samples)
        total = floored_fitness(total, metrics, self.tasks, self.floors)
        return Score(float(total), metrics, items, per_item or None)


def item_values(samples: list[dict]) -> dict[str, list]:
    """lm-eval's logged samples (``log_samples=True``) as per-item metric values of the ``none``
    filter (or of the only filter, a generation task's answer extraction), sorted by item index:
    {"doc": [...], metric: [...]}."""
    filters = {s.get("filter", "none") for s in samples}
    keep = "none" if "none" in filters or len(filters) != 1 else filters.pop()
    rows = sorted((s for s in samples if s.get("filter", "none") == keep), key=lambda s: s["doc_id"])
    metrics = rows[0]["metrics"] if rows else []
    out: dict[str, list] = {"doc": [int(s["doc_id"]) for s in rows]}
    for m in metrics:
        out[m] = [float(s[m]) for s in rows]
    return out
