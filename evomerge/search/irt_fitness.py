"""The IRT fitness of a search (``fitness: {estimator: irt, anchors: N}``; docs/irt.md): the search
loop's side of evaluation/irt.py.

Before generation 0 (after the starting point, which is scored on the whole dev split as always)
the sources and the base are scored on the whole dev split here in the driver, a 2PL model is fitted
per task to those rows and the starting point's, and ``N`` anchor items are chosen per task (seeded
by the search seed and the task). Candidates are then scored on their anchors only (with racing:
the anchors are the race's first stage); a candidate's record keeps the anchors' measured means in
``metrics`` and the IRT estimates of the whole split in ``estimated``, whose weighted sum is its
fitness. At each generation's end the items are refitted (``refit``), adding each distinct
successful candidate recipe so far as a row with its anchor scores (its other items, where a later
racing stage or a background re-score scored them, are left out, so the fit does not depend on
timing); the fit is used from the next generation on. Anchors stay fixed.

Every fit is an ``irt`` record (search/records.py) naming its parameter file (``RUN_DIR/irt/``,
written atomically before the record) and the sha256 of its inputs; the sources' per-item scores
are ``RUN_DIR/irt/sources.npz``. A resumed search recomputes each logged fit's inputs, refuses to go
on if they differ, and loads the logged parameters instead of fitting again: the estimates of a
resumed search are those of an uninterrupted one bit for bit. With Ray workers all of this runs in
the driver; workers only score the items they are sent.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np

from evomerge.core.errors import ConfigError, RunFolderError
from evomerge.core.io import atomic_write_bytes
from evomerge.evaluation import irt
from evomerge.evaluation.fitness import FitnessFunction, Samples
from evomerge.evaluation.items import ItemStore
from evomerge.models.sources import load_source_lm
from evomerge.search.records import EvalRecord, IrtRecord, Metrics, RecordKind

IRT_DIR = "irt"
SOURCES = "sources.npz"


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def score_sources(cfg, fitness: FitnessFunction, tokenizer) -> dict[str, np.ndarray]:
    """The sources' and the base's per-item scores on the whole split: task -> models x items."""
    paths = list(dict.fromkeys([*cfg.models, *([cfg.base_model] if cfg.base_model else [])]))
    rows: dict[str, list[np.ndarray]] = {t.name: [] for t in fitness.tasks}
    for p in paths:
        model = load_source_lm(p, base=cfg.base_model, device=cfg.device, dtype=cfg.dtype,
                               allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
        score = fitness.score(model, tokenizer, {t.name: None for t in fitness.tasks})
        del model
        for t in fitness.tasks:
            cols = (score.item_scores or {}).get(t.name)
            if not cols or t.metric not in cols:
                raise ConfigError(f"fitness.estimator irt: task {t.name!r} reported no per-item {t.metric!r} "
                                  "scores; IRT needs them (use fitness.estimator: mean)")
            row = np.full(fitness.n_docs(t.name), np.nan)
            row[np.asarray(cols["doc"], dtype=np.int64)] = cols[t.metric]
            rows[t.name].append(row)
    return {t: np.stack(r) for t, r in rows.items()}


def check_anchors(cfg, evaluators) -> None:
    """Before the run folder exists: an anchor set larger than a task's split is refused."""
    if not cfg.fitness.irt:
        return
    for t in cfg.tasks:
        n = evaluators[t.name].n_docs(t.name)
        if cfg.fitness.n_anchors > n:
            raise ConfigError(f"fitness.anchors: {cfg.fitness.n_anchors} anchor items per task, but task "
                              f"{t.name!r} has only {n} items in its {t.split} split; give at most {n}")


class IrtFitness:
    def __init__(self, cfg, fitness: FitnessFunction, items: ItemStore, run_path: Path, records: list):
        self.cfg, self.fitness, self.items = cfg, fitness, items
        self.root = Path(run_path) / IRT_DIR
        self.n_anchors = cfg.fitness.n_anchors
        self.logged: dict[int, IrtRecord] = {r.generation: r for r in records if r.type == RecordKind.IRT}
        self.params: dict[str, irt.ItemParams] = {}
        self.anchors: dict[str, list[int]] = {}
        self.sources: dict[str, np.ndarray] = {}
        self.fit_key: str | None = None  # the fit in use (its inputs' hash): part of an estimated job's settings key
        check_anchors(cfg, fitness.evaluators)
        for t in cfg.tasks:
            if not items.reusable[t.name]:
                raise ConfigError(f"fitness.estimator irt: task {t.name!r}'s metrics are not per-item means, "
                                  "so its full-split metric cannot be estimated from items; use estimator: mean")

    # ------------------------------------------------------------------ the items a candidate is scored on
    def anchor_samples(self) -> Samples:
        return {t: list(v) for t, v in self.anchors.items()}

    def stage_samples(self, generation: int, k: int, n: int | None) -> Samples:
        """Racing with IRT: stage 0 is the anchors; stage k > 0 the anchors and the first ``n - N``
        items of a seeded permutation of the others (nested, like racing's own stages)."""
        if k == 0:
            return self.anchor_samples()
        out: Samples = {}
        for ti, t in enumerate(self.fitness.tasks):
            total = self.fitness.n_docs(t.name)
            if n is None or n >= total:
                out[t.name] = None
                continue
            anchors = self.anchors[t.name]
            rest = np.setdiff1d(np.arange(total), anchors)
            perm = np.random.default_rng([self.cfg.seed, generation, ti, 7]).permutation(rest)
            out[t.name] = sorted(int(i) for i in [*anchors, *perm[: n - len(anchors)]])
        return out

    # ------------------------------------------------------------------ estimates
    def estimates(self, kind: RecordKind, samples: Samples) -> bool:
        """Whether an evaluation's fitness is an estimate: a candidate scored on its anchors."""
        return kind == RecordKind.CANDIDATE and samples == self.anchor_samples()

    def estimate(self, job, res) -> Metrics | None:
        """The IRT estimates of a candidate scored on its anchors (None for any other evaluation)."""
        if res.status != "ok" or not self.estimates(job.kind, job.samples):
            return None
        have = self.items.data.get(res.recipe_hash, {})
        out: Metrics = {}
        for t in self.cfg.tasks:
            known = have.get(t.name, {})
            anchors = self.anchors[t.name]
            if any(i not in known for i in anchors):
                raise RunFolderError(f"fitness.estimator irt: the executor returned no per-item scores of task "
                                     f"{t.name!r} for candidate {job.generation}/{job.index}")
            values = [known[i][t.metric] for i in anchors]
            out[t.name] = {t.metric: irt.estimate(self.params[t.name], anchors, values)}
        return out

    def fitness_of(self, estimated: Metrics) -> float:
        return float(sum(t.weight * estimated[t.name][t.metric] for t in self.cfg.tasks))

    # ------------------------------------------------------------------ fits
    def prepare(self, reference: EvalRecord, tokenizer, append, message) -> IrtRecord | None:
        """Before generation 0: the sources' scores, the first fit and the anchors (loaded when
        logged). Returns the new record (None when replayed)."""
        rec = self.logged.get(-1)
        if rec is not None:
            with np.load(self.root / SOURCES) as z:
                self.sources = {t.name: z[t.name] for t in self.cfg.tasks}
            self.anchors = {t: list(v) for t, v in rec.anchors.items()}
        else:
            message("fitness irt: scoring the sources and the base on the whole dev split...")
            self.sources = score_sources(self.cfg, self.fitness, tokenizer)
            atomic_write_bytes(self.root / SOURCES, _npz(self.sources))
        ys = self._rows(reference, [], with_population=False)
        if rec is not None:
            self._load(rec, ys)
            return None
        self.params = {t: irt.fit_2pl(y)[0] for t, y in ys.items()}
        self.anchors = {t.name: irt.choose_anchors(self.params[t.name], self.n_anchors, [self.cfg.seed, ti, 11],
                                                   self.cfg.fitness.anchor_choice, t.name)
                        for ti, t in enumerate(self.cfg.tasks)}
        scored = {t: int(np.isfinite(y).sum()) for t, y in self.sources.items()}
        return self._log(-1, ys, append, anchors=self.anchors, scored=scored)

    def refit(self, generation: int, candidates: dict, reference: EvalRecord, append) -> IrtRecord | None:
        """After ``generation``: the fit with the population so far (loaded when logged)."""
        if not self.cfg.fitness.refit:
            return None
        recs = [candidates[k] for k in sorted(candidates) if k[0] <= generation]
        ys = self._rows(reference, recs, with_population=True)
        rec = self.logged.get(generation)
        if rec is not None:
            self._load(rec, ys)
            return None
        self.params = {t: irt.fit_2pl(y)[0] for t, y in ys.items()}
        return self._log(generation, ys, append)

    def _rows(self, reference: EvalRecord, recs: list[EvalRecord], with_population: bool) -> dict[str, np.ndarray]:
        """Per task, the fit's response matrix: the sources, the starting point (whole split) and
        each distinct successful candidate recipe (its anchors only)."""
        out = {}
        seen: list[str] = []
        for r in recs:
            if r.ok and r.recipe_hash not in seen and r.recipe_hash != reference.recipe_hash:
                seen.append(r.recipe_hash)
        for t in self.cfg.tasks:
            n = self.fitness.n_docs(t.name)
            rows = [*self.sources[t.name]]
            ref = self.items.data.get(reference.recipe_hash, {}).get(t.name, {})
            if reference.ok and len(ref) == n:
                rows.append(np.array([ref[i][t.metric] for i in range(n)]))
            for h in seen:
                known = self.items.data.get(h, {}).get(t.name, {})
                row = np.full(n, np.nan)
                for i in self.anchors[t.name]:
                    if i in known:
                        row[i] = known[i][t.metric]
                rows.append(row)
            y = np.stack(rows)
            irt.check_responses(y, f"task {t.name!r}, metric {t.metric!r}")
            out[t.name] = y
        return out

    @staticmethod
    def _hash(ys: dict[str, np.ndarray], anchors: dict[str, list[int]]) -> str:
        h = hashlib.sha256()
        for t in sorted(ys):
            h.update(t.encode())
            h.update(np.asarray(ys[t].shape, dtype=np.int64).tobytes())
            h.update(np.nan_to_num(ys[t], nan=-1.0).astype(np.float64).tobytes())
            h.update(np.asarray(anchors.get(t, []), dtype=np.int64).tobytes())
        return h.hexdigest()

    def _log(self, generation: int, ys, append, anchors=None, scored=None) -> IrtRecord:
        name = f"fit-g{generation}.npz"
        arrays = {}
        for t, p in self.params.items():
            arrays[f"{t}/a"], arrays[f"{t}/d"] = p.a, p.d
        atomic_write_bytes(self.root / name, _npz(arrays))
        rec = IrtRecord(generation=generation, params_file=name,
                        inputs=self._hash(ys, self.anchors if generation >= 0 else {}),
                        rows={t: int(y.shape[0]) for t, y in ys.items()}, anchors=anchors,
                        items_scored=scored or {}, time=time.time())
        append(rec)
        self.logged[generation] = rec
        self.fit_key = rec.inputs
        return rec

    def _load(self, rec: IrtRecord, ys) -> None:
        if self._hash(ys, self.anchors if rec.generation >= 0 else {}) != rec.inputs:
            raise RunFolderError(f"resume: the inputs of the logged IRT fit after generation {rec.generation} "
                                 "differ from the run folder's scores; the code, the config or the platform "
                                 "changed, so this run cannot continue exactly")
        with np.load(self.root / rec.params_file) as z:
            self.params = {t.name: irt.ItemParams(z[f"{t.name}/a"], z[f"{t.name}/d"]) for t in self.cfg.tasks}
        self.fit_key = rec.inputs

