"""Per-item scores of evaluated recipes, kept in the run folder so a larger subset (a later racing
stage, the full-dev re-scoring, a repeated recipe on another generation's items) scores only the
items not yet scored.

    RUN_DIR/items/<kind>-g<generation>-i<index>[-s<stage>].npz

One small file per evaluation record that scored items: for each task, ``<task>/doc`` (item
indices, int32) and ``<task>/<metric>`` (float64 per item) of the items that evaluation scored,
written atomically before its log record, which names it (``items_file``). Only files named by a
logged record count: a file whose record a kill cut off is ignored and later overwritten, so a
resumed search scores exactly what an uninterrupted one does.

Combining: for a task whose metrics lm-eval aggregates by the mean (``mean_metrics``), the metric
on a subset is ``sum(values) / len(values)`` over the subset's items in index order, as lm-eval's
``mean`` computes it; other tasks are scored on the whole subset every time. The store is keyed by
recipe hash and a settings key without the item subset (tasks' settings, dtype, batch size,
device): per-item values do not depend on which other items are scored with them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from evomerge.core.io import atomic_write_bytes
from evomerge.evaluation.fitness import FitnessFunction, Samples
from evomerge.evaluation.floors import floored_fitness
from evomerge.evaluation.trial import TrialResult, result_of

ITEMS = "items"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)  # lm_eval.api.metrics.mean, item for item


def per_item_means(tasks, evaluators) -> dict[str, bool]:
    """Per task: are its metrics means over items (so a subset's per-item scores stand for them)?"""
    out = {}
    for t in tasks:
        ev = evaluators[t.name]
        mean = getattr(ev, "mean_metrics", None)
        out[t.name] = mean is not None and set(ev.metric_names(t.name)) <= set(mean(t.name))
    return out


class ItemStore:
    def __init__(self, run_path: Path, fitness: FitnessFunction, extra: dict):
        self.root = Path(run_path) / ITEMS
        self.fitness = fitness
        self.base_key = fitness.settings_key({t.name: "per-item" for t in fitness.tasks}, extra)
        self.reusable = per_item_means(fitness.tasks, fitness.evaluators)
        # recipe hash -> task -> item -> {metric: value}
        self.data: dict[str, dict[str, dict[int, dict[str, float]]]] = {}

    # ------------------------------------------------------------------ reading and writing
    def load_logged(self, records) -> None:
        """Loads the per-item files that logged records name (``items_file``, ``items_key``)."""
        for r in records:
            name = getattr(r, "items_file", None)
            if name and r.items_key == self.base_key:
                with np.load(self.root / name) as z:
                    self._add(r.recipe_hash, _unpack(z))

    def _add(self, recipe_hash: str, scores: dict[str, dict[str, list]]) -> None:
        per = self.data.setdefault(recipe_hash, {})
        for task, cols in scores.items():
            items = per.setdefault(task, {})
            metrics = [m for m in cols if m != "doc"]
            for j, doc in enumerate(cols["doc"]):
                items[int(doc)] = {m: float(cols[m][j]) for m in metrics}

    def save(self, name: str, recipe_hash: str, scores: dict[str, dict[str, list]] | None) -> str | None:
        """Writes the items one evaluation scored; returns the file name for its log record."""
        scores = {t: c for t, c in (scores or {}).items() if self.reusable.get(t) and c.get("doc")}
        if not scores:
            return None
        arrays = {}
        for task, cols in scores.items():
            arrays[f"{task}/doc"] = np.asarray(cols["doc"], dtype=np.int32)
            for m, v in cols.items():
                if m != "doc":
                    arrays[f"{task}/{m}"] = np.asarray(v, dtype=np.float64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.root / name, buf.getvalue())
        self._add(recipe_hash, scores)
        return name

    def vector(self, recipe_hash: str | None, samples: Samples) -> tuple[np.ndarray, np.ndarray]:
        """One recipe's per-item scores on ``samples`` (each task's metric, tasks in the fitness's
        order, items in index order; all 0 for ``recipe_hash`` None, a failed candidate) and each
        item's capacity, its task's weight over its item count: ``scores @ capacity`` is the
        weighted fitness. An optimizer that shares items as resources reads it (M2N2)."""
        have = self.data.get(recipe_hash, {}) if recipe_hash is not None else None
        scores, capacity = [], []
        for t in self.fitness.tasks:
            full = self.full_items(t.name, samples)
            if have is not None:
                known = have.get(t.name, {})
                missing = [i for i in full if t.metric not in known.get(i, {})]
                if missing:
                    raise ValueError(f"{t.name}: no per-item {t.metric} of item {missing[0]} for recipe "
                                     f"{recipe_hash} (the task's metric is not kept per item)")
                scores += [known[i][t.metric] for i in full]
            else:
                scores += [0.0] * len(full)
            capacity += [t.weight / len(full)] * len(full)
        return np.array(scores, dtype=np.float64), np.array(capacity, dtype=np.float64)

    # ------------------------------------------------------------------ planning and combining
    def full_items(self, task: str, samples: Samples) -> list[int]:
        idx = samples.get(task)
        return list(range(self.fitness.n_docs(task))) if idx is None else list(idx)

    def plan(self, recipe_hash: str, samples: Samples) -> tuple[Samples, int]:
        """The items still to score per task ([] : none; the task's full subset where it cannot
        reuse), and how many items are reused."""
        have = self.data.get(recipe_hash, {})
        todo: Samples = {}
        reused = 0
        for t in self.fitness.tasks:
            known = have.get(t.name) if self.reusable[t.name] else None
            if not known:
                todo[t.name] = samples.get(t.name)
                continue
            full = self.full_items(t.name, samples)
            missing = [i for i in full if i not in known]
            reused += len(full) - len(missing)
            todo[t.name] = missing if len(missing) < len(full) else samples.get(t.name)
        return todo, reused

    def combine(self, recipe_hash: str, samples: Samples, partial: TrialResult | None,
                penalty: float) -> TrialResult | None:
        """The result on the whole ``samples`` from the stored items plus ``partial`` (the result on
        the missing items, None when nothing was missing). None when they do not combine (the
        executor returned no per-item scores): the caller scores the whole subset instead."""
        if partial is not None and partial.status != "ok":
            return partial
        if partial is not None and partial.item_scores:
            fresh = partial.item_scores
        else:
            fresh = {}
        have = self.data.get(recipe_hash, {})
        metrics, items, total = {}, {}, 0.0
        for t in self.fitness.tasks:
            full = self.full_items(t.name, samples)
            known = dict(have.get(t.name, {}))
            cols = fresh.get(t.name)
            if cols:
                ms = [m for m in cols if m != "doc"]
                for j, doc in enumerate(cols["doc"]):
                    known[int(doc)] = {m: float(cols[m][j]) for m in ms}
            if self.reusable[t.name] and all(i in known for i in full):
                names = list(known[full[0]]) if full else []
                got = {m: _mean([known[i][m] for i in sorted(full)]) for m in names}
                if partial is not None and t.name in partial.metrics and set(partial.metrics[t.name]) - set(got):
                    return None  # lm-eval reported metrics the per-item log does not hold
            elif partial is not None and t.name in partial.metrics and not (self.reusable[t.name] and have.get(t.name)):
                got = partial.metrics[t.name]  # scored on the whole subset (plan sent it whole)
            else:
                return None
            if t.metric not in got:
                return None
            metrics[t.name] = got
            items[t.name] = len(full)
            total += t.weight * got[t.metric]
        total = floored_fitness(total, metrics, self.fitness.tasks, self.fitness.floors)
        h = recipe_hash
        merge_s = partial.merge_s if partial else 0.0
        eval_s = partial.eval_s if partial else 0.0
        worker = partial.worker if partial else "items"
        node = partial.node if partial else None
        return result_of(h, total, metrics, items, penalty, merge_s=merge_s, eval_s=eval_s, worker=worker, node=node)


def _unpack(z) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for key in z.files:
        task, col = key.rsplit("/", 1)
        out.setdefault(task, {})[col] = z[key].tolist()
    return out
