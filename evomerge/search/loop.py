"""The search loop: ask -> evaluate -> tell -> checkpoint, with exact resume.

Resume replays the run log: a fresh optimizer (same seed) is asked for each logged generation and
must return the logged genomes bit for bit (else the code, config or platform changed and the run
cannot continue exactly); it is then told the logged fitness. Candidates already in the log are
never evaluated again, so a search killed at any moment loses at most the candidate in flight.

With ``racing`` a generation is several batches (stages, search/racing.py); each stage's records
carry ``stage`` and the promotion is a function of the logged scores, so the replay re-runs the
race from the log. Evaluations reuse per-item scores already in the run folder (evaluation/items.py).

The loop writes through a `RunJournal` (runs.RunFolder) and reports to a `SearchObserver`
(runs.progress.Display); executors (search/jobs.py) build and score the jobs it hands out.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from evomerge.core.errors import RunFolderError
from evomerge.evaluation.fitness import FitnessFunction
from evomerge.evaluation.items import ItemStore
from evomerge.evaluation.trial import TrialResult
from evomerge.models.folders import load_tokenizer
from evomerge.models.sources import load_source
from evomerge.recipes.layer_path import AnyRecipe
from evomerge.recipes.mergekit import mergekit_yaml
from evomerge.search import budget, optimizers, racing, ranking
from evomerge.search.background import SearchBackground
from evomerge.search.codecs.parameter import make_codec
from evomerge.search.config import SearchConfig
from evomerge.search.history import RunHistory
from evomerge.search.irt_fitness import IrtFitness
from evomerge.search.jobs import TEST_KEY, EvalJob, SearchStopped
from evomerge.search.journal import RunJournal, SearchObserver
from evomerge.search.optimizers import Batch, make_optimizer
from evomerge.search.pareto import pareto_front
from evomerge.search.records import (
    CandidateRef,
    EvalRecord,
    FinalRecord,
    GenerationRecord,
    Metrics,
    RaceSummary,
    Record,
    RecordKind,
    TestRecord,
)
from evomerge.search.steady import run_steady


@dataclass
class SearchOutcome:
    run_dir: Path
    generations: int
    evaluations: int
    best_fitness: float | None
    best_recipe: AnyRecipe | None
    finished: bool
    reference_fitness: float | None


def _genome_list(x: np.ndarray) -> list[float]:
    return [float(v) for v in x]


def _timings(res: TrialResult) -> dict[str, float]:
    return {"merge_s": round(res.merge_s, 4), "eval_s": round(res.eval_s, 4)}


class Search:
    """One search in one run journal. ``run_loop()`` returns when the budget is spent.

    Background work (background.py) uses the public methods ``job``, ``cached``, ``log``,
    ``log_test``, ``check_stop`` and ``top_candidates``."""

    def __init__(self, cfg: SearchConfig, run: RunJournal, display: SearchObserver, executor_factory):
        self.cfg, self.run, self.display = cfg, run, display
        self.executor_factory = executor_factory
        self.stop_signal: int | None = None  # set by a signal handler (runs/start.py): stop at the next record
        self._running = False  # an executor run is being consumed (a nested one is refused)

    # ------------------------------------------------------------------ set-up
    def _setup(self, evaluators, records: list) -> None:
        cfg = self.cfg
        self.codec = make_codec(cfg, load_source)  # the space's kind picks it: parameter space or data flow
        o = cfg.optimizer
        self.kind = optimizers.kind(o.name)  # what the optimizer declares: its objectives and batch rule
        self.multi = self.kind.multi_objective
        kw = optimizers.optimizer_options(o, len(cfg.tasks), self.codec.x0,
                                          lambda: np.array([g.model is not None for g in self.codec.genes]),
                                          codec=self.codec)
        self.optimizer = make_optimizer(o.name, self.codec.x0, o.sigma0 or cfg.space.sigma0, o.popsize, cfg.seed,
                                        **kw)
        self.fitness = FitnessFunction(cfg.tasks, evaluators, cfg.seed, floors=cfg.floors)
        self.items = ItemStore(self.run.path, self.fitness, self._extra())
        self.irt = IrtFitness(cfg, self.fitness, self.items, self.run.path, records) if cfg.fitness.irt else None
        self.max_generations = budget.max_generations(cfg.budget, self.optimizer.popsize)
        # A time budget counts the time of earlier sessions (up to their last generation or final).
        self.spent_before = budget.spent_s(records)
        self.session_start = time.monotonic()
        self.time_limit = cfg.budget.time_limit_s or math.inf

    def elapsed(self) -> float:
        """Search time so far, this session and the earlier ones."""
        return self.spent_before + time.monotonic() - self.session_start

    def _time_left(self) -> bool:
        return self.elapsed() < self.time_limit

    # ------------------------------------------------------------------ the loop
    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def run_loop(self, evaluators) -> SearchOutcome:
        hist = RunHistory(self.run.records())
        records = hist.records
        self._setup(evaluators, records)
        # (generation, index, stage) -> logged evaluation of a candidate (stage 0 without racing)
        logged = {(r.generation, r.index, r.depth): r for r in hist.candidates}
        candidates: dict[tuple[int, int], EvalRecord] = {}  # (generation, index) -> its last evaluation
        done_gens = {r.generation for r in hist.generations}
        final, reference = hist.final, hist.reference
        if budget.finished(final, self.cfg.budget, self.elapsed()):
            self.display.message(f"this run is finished: {final.generations} generations, "
                                 f"best fitness {final.fitness:.4f}; raise the budget to continue it")
            return self._outcome(hist)

        tok = self._open(hist)
        pipelined = self._bg_run is not None
        try:
            self.check_stop()
            if reference is None:
                reference = self._evaluate([self.job(RecordKind.REFERENCE, -1, 0, self.codec.x0, None)])[(-1, 0)]
            if self.irt is not None and (rec := self.irt.prepare(reference, tok, self._append, self.display.message)):
                self.items_spent += sum(rec.items_scored.values())

            if self.kind.batch is Batch.STEADY:  # one candidate at a time, fed to the workers (steady.py)
                g = run_steady(self, logged, candidates, done_gens)
            else:
                g = self._generations(logged, candidates, done_gens, reference, pipelined)

            self._drain()
            self._rescore(candidates, g)
        finally:
            self.executor.close()
        return self._outcome(RunHistory(self.run.records()))

    def _open(self, hist: RunHistory):
        """The executor, the caches of the log's scores and the background work (after ``_setup``);
        returns the tokenizer."""
        records = hist.records
        tok = load_tokenizer(self.cfg.tokenizer_folder(), trust_remote_code=self.cfg.trust_remote_code)
        self.display.message("loading models...")
        self.executor = self.executor_factory(self.cfg, self.fitness, tok)
        self.executor.should_stop = lambda: self.stop_requested
        self.display.start(self.max_generations, self.optimizer.popsize, records)
        # (recipe hash, settings key) -> the record that scored it: a repeated recipe is not re-evaluated.
        # The first one, as in the session that logged them (a repeat served from it comes later).
        self.cache: dict[tuple[str, str | None], EvalRecord] = {}
        for r in hist.evaluations():
            if r.ok:
                self.cache.setdefault((r.recipe_hash, r.eval_key), r)
        self.items.load_logged(records)
        # items scored by the search's own evaluations (RecordKind.search_items)
        self.items_spent = hist.search_items()
        # Background work (top-k re-scoring, test scores of a new best): in idle slots of a
        # pipelined executor, else at the end of each generation (see background.py).
        self.background = SearchBackground(self, records) if self.cfg.background else None
        self.tested: dict[str, TestRecord] = (self.background.tested if self.background is not None else
                                              {r.recipe_hash: r for r in hist.of(RecordKind.TEST)})
        pipelined = self.background is not None and self.executor.pipelined
        self._bg_run = self.background if pipelined else None
        return tok

    def _generations(self, logged: dict, candidates: dict, done_gens: set[int], reference: EvalRecord,
                     pipelined: bool) -> int:
        """The generational engine: a generation (or a race) is asked, scored as a batch and told;
        returns the generations run."""
        g, asked = 0, 0  # asked: candidates of the generations so far (the optimizer sets each one's size)
        # Logged generations are replayed whatever the time left; new ones need budget (a time
        # budget runs at least one generation, so that there is a winner).
        while budget.generations_left(self.cfg.budget, g, asked) and (g in done_gens or g == 0 or self._time_left()):
            genomes = self.optimizer.ask()
            asked += len(genomes)
            for (lg, i, _), rec in logged.items():
                if lg == g and (i >= len(genomes) or _genome_list(genomes[i]) != rec.genome):
                    raise RunFolderError(
                        f"resume: the optimizer does not reproduce the logged genome of generation {g}, "
                        f"candidate {i}; the code, the config or the platform changed, so this run "
                        "cannot continue exactly")
            if self.cfg.racing is not None:
                gen, race = self._race(g, genomes, logged)
                told = race.told
            else:
                todo = [self.job(RecordKind.CANDIDATE, g, i, x, g) for i, x in enumerate(genomes)
                        if (g, i, 0) not in logged]
                gen = {i: logged[(g, i, 0)] for i in range(len(genomes)) if (g, i, 0) in logged}
                gen.update({i: r for (_, i), r in self._evaluate(todo).items()})
                race = None
                told = [gen[i].fitness for i in range(len(genomes))]
            gen_records = [gen[i] for i in range(len(genomes))]
            for i, r in enumerate(gen_records):
                candidates[(g, i)] = r
            if self.multi:
                self.optimizer.tell(genomes, self._objectives(gen_records))
            else:
                self.optimizer.tell(genomes, np.array(told, dtype=np.float64))
            if self.irt is not None:
                self.irt.refit(g, candidates, reference, self._append)
            if g not in done_gens:
                self._end_generation(g, gen_records, told, candidates, race)
            elif g + 1 not in done_gens:  # the last logged generation: its checkpoint may be stale
                self._checkpoint(candidates)
            if self.background is not None:
                self.background.plan(g, candidates)
                if not pipelined:
                    self._drain()
            g += 1
        return g

    def _extra(self) -> dict:
        cfg = self.cfg
        return {"dtype": cfg.dtype, "batch_size": cfg.batch_size, "device": cfg.device, **cfg.evaluator.settings()}

    def job(self, kind: str, generation: int, index: int, genome, subset_generation: int | None,
            samples=None, stage: int | None = None) -> EvalJob:
        """The job that scores ``genome``: on generation ``subset_generation``'s item subset, or
        on ``samples``, or (both None) on the whole dev split."""
        if samples is None and kind == RecordKind.CANDIDATE and self.irt is not None:
            samples = self.irt.anchor_samples()  # IRT: a candidate is scored on its anchors
        if samples is None:
            samples = self.fitness.samples(subset_generation)
        extra = self._extra()
        if self.irt is not None and self.irt.estimates(kind, samples):
            # its fitness is the current fit's estimate: a repeated recipe after a refit is estimated anew
            extra["irt_fit"] = self.irt.fit_key
        key = self.fitness.settings_key(samples, extra)
        genome = np.asarray(genome, dtype=np.float64)
        return EvalJob(kind, generation, index, tuple(_genome_list(genome)), self.codec.to_recipe(genome),
                       samples, key, stage)

    def _race(self, g: int, genomes: np.ndarray, logged: dict) -> tuple[dict[int, EvalRecord], RaceSummary]:
        """One generation of racing: stage by stage, each a batch of its own; returns each candidate's
        last evaluation and the race's summary (told values, stage reached, items spent)."""
        rc = self.cfg.racing
        sizes = self._stage_sizes()
        n_stages = len(sizes)
        alive = list(range(len(genomes)))
        last: dict[int, EvalRecord] = {}
        reached: dict[int, int] = {}
        spent = [0] * len(genomes)
        for k, n in enumerate(sizes):
            samples = self.irt.stage_samples(g, k, n) if self.irt else self.fitness.stage_samples(g, n)
            todo = [self.job(RecordKind.CANDIDATE, g, i, genomes[i], None, samples=samples, stage=k)
                    for i in alive if (g, i, k) not in logged]
            results = {i: logged[(g, i, k)] for i in alive if (g, i, k) in logged}
            results.update({i: r for (_, i), r in self._evaluate(todo).items()})
            for i in alive:
                last[i], reached[i] = results[i], k
                spent[i] += sum((results[i].items_scored or {}).values())
            if k < n_stages - 1:
                alive = racing.promote({i: (results[i].status, results[i].fitness) for i in alive}, rc.keep)
        told = racing.told_values(reached, {i: r.fitness for i, r in last.items()}, n_stages)
        n = len(genomes)
        return last, RaceSummary([told[i] for i in range(n)], [reached[i] for i in range(n)], spent)

    def _stage_sizes(self) -> list[int | None]:
        """The race's stages: with IRT the anchors come first (fitness_config.check_fitness)."""
        return ([self.irt.n_anchors] if self.irt is not None else []) + list(self.cfg.racing.stages)

    def _objectives(self, gen_records: list[EvalRecord]) -> np.ndarray:
        """One maximized objective per task (its metric); failed candidates get the penalty."""
        pen = self.cfg.penalty_fitness
        return np.array([[r.metric(t.name, t.metric, pen) if r.ok else pen for t in self.cfg.tasks]
                         for r in gen_records], dtype=np.float64)

    def _evaluate(self, jobs: list[EvalJob]) -> dict[tuple[int, int], EvalRecord]:
        """Scores a batch of jobs (a recipe already scored with the same settings is served from the
        cache, also within the batch) and appends each record to the log as its result arrives.
        Items of a recipe already scored (an earlier stage, another generation's subset) are not
        scored again: the executor gets only the missing items, and the loop combines."""
        out, todo, repeats = {}, {}, []
        for job in jobs:
            ck = (job.recipe.hash(), job.eval_key)
            hit = self.cache.get(ck)
            if hit is not None:
                out[(job.generation, job.index)] = self.log(job, self.cached(hit), hit)
            elif ck in todo:
                repeats.append(job)
            else:
                todo[ck] = job
        send, full = [], {}
        for job in todo.values():
            missing, reused = self.items.plan(job.recipe.hash(), job.samples)
            if reused and all(v is not None and len(v) == 0 for v in missing.values()):
                res = self.items.combine(job.recipe.hash(), job.samples, None, self.cfg.penalty_fitness)
                out[(job.generation, job.index)] = self.log(job, res, None, scored={})
                continue
            full[(job.generation, job.index)] = job
            send.append(replace(job, samples=missing) if reused else job)
        whole: dict[tuple[int, int], dict[str, int]] = {}  # did not combine: scored whole (items so far)
        for sent, res in self._run(send):
            job = full[(sent.generation, sent.index)]
            rec = self._finish(job, sent, res)
            if rec is None:
                whole[(job.generation, job.index)] = dict(res.items)
            else:
                out[(job.generation, job.index)] = rec
            self.check_stop()
        # the second pass, a batch of its own (never a run nested in the first): the results that did
        # not combine with the stored items, and repeats whose first evaluation failed
        again = [full[k] for k in whole]
        for job in repeats:  # the same recipe twice in one batch: the second is served from the first
            hit = self.cache.get((job.recipe.hash(), job.eval_key))
            if hit is not None:
                out[(job.generation, job.index)] = self.log(job, self.cached(hit), hit)
            else:
                again.append(job)
        for job, res in self._run(again) if again else ():
            before = whole.get((job.generation, job.index), {})
            scored = {t: before.get(t, 0) + n for t, n in res.items.items()}
            out[(job.generation, job.index)] = self.log(job, res, None, scored=scored)
            self.check_stop()
        return out

    def _finish(self, job: EvalJob, sent: EvalJob, res: TrialResult) -> EvalRecord | None:
        """A result on ``sent``'s items (the missing ones of ``job``) made into ``job``'s record;
        None when it does not combine with the stored items (the caller scores the whole subset)."""
        scored = dict(res.items)
        if sent is not job:
            combined = self.items.combine(job.recipe.hash(), job.samples, res, self.cfg.penalty_fitness)
            if combined is None:
                return None
            combined.item_scores = res.item_scores
            res = combined
        return self.log(job, res, None, scored=scored)

    def _run(self, jobs: list[EvalJob], background=None):
        """The executor's run. One at a time: a run nested in another (whose results are still
        being consumed) is refused, as Optuna's ``_optimize_lock`` does, since an executor that
        pipelines (Ray) would wait on, and drop, the outer run's jobs. Background work is offered
        only to a pipelined executor, or at a barrier (``background``)."""
        if self._running:
            raise RuntimeError("an executor run was started while another one is in flight")
        self._running = True
        try:
            bg = background or self._bg_run
            yield from (self.executor.run(jobs) if bg is None else self.executor.run(jobs, background=bg))
        except SearchStopped:  # raised by the executor (Ray): the signal that stopped it is the search's
            raise SearchStopped(self.stop_signal or signal.SIGTERM) from None
        finally:
            self._running = False

    def _drain(self) -> None:
        """Runs the queued background work to the end (a barrier)."""
        if self.background is not None and self.background.pending:
            for _ in self._run([], background=self.background):
                pass

    def check_stop(self) -> None:
        if self.stop_signal is not None:
            raise SearchStopped(self.stop_signal)

    def _append(self, rec: Record) -> None:
        """Every record goes through here: appended to the log, then told to the observers."""
        self.run.append(rec)
        self.display.logged(rec)

    @staticmethod
    def cached(hit: EvalRecord) -> TrialResult:
        """A logged evaluation as the result of scoring its recipe again."""
        return TrialResult(hit.recipe_hash, hit.fitness, hit.status, hit.reason, hit.metrics, hit.items)

    def log(self, job: EvalJob, res: TrialResult, hit: EvalRecord | None,
            scored: dict | None = None) -> EvalRecord:
        """Logs ``job``'s evaluation (``hit``: the record it was served from) and returns it."""
        items_file = None
        if hit is None and res.status == "ok" and res.item_scores:
            name = f"{job.kind}-g{job.generation}-i{job.index}" + (f"-s{job.stage}" if job.stage is not None else "")
            items_file = self.items.save(name + ".npz", res.recipe_hash, res.item_scores)
        scored = {} if hit is not None else dict(res.items if scored is None else scored)
        estimated = hit.estimated if hit is not None else self.irt.estimate(job, res) if self.irt else None
        fitness = res.fitness if estimated is None or hit is not None else self.irt.fitness_of(estimated)
        racing_on = job.stage is not None
        rec = EvalRecord(
            type=job.kind, generation=job.generation, index=job.index, genome=list(job.genome),
            recipe_hash=res.recipe_hash, eval_key=job.eval_key, fitness=fitness, status=res.status,
            reason=res.reason, metrics=res.metrics, items=res.items, items_scored=scored,
            cached_from=[hit.generation, hit.index] if hit is not None else None, timings=_timings(res),
            worker=res.worker, time=time.time(), stage=job.stage, node=res.node,
            stages=(len(self._stage_sizes()) if self.cfg.racing else None) if racing_on else None,
            items_file=items_file, items_key=self.items.base_key if items_file else None, estimated=estimated)
        if RecordKind(job.kind).search_items:
            self.items_spent += sum(scored.values())
        self._append(rec)
        if res.status == "ok" and hit is None:
            self.cache[(res.recipe_hash, job.eval_key)] = rec
        return rec

    def log_test(self, job: EvalJob, res: TrialResult) -> TestRecord:
        """Logs a test-split evaluation (for reports only, never for decisions); a failed one too."""
        rec = TestRecord(job.generation, job.index, list(job.genome), res.recipe_hash,
                         res.fitness if math.isfinite(res.fitness) else None, res.status, res.reason,
                         res.metrics, _timings(res), res.worker, time.time(), node=res.node)
        self._append(rec)
        self.tested[rec.recipe_hash] = rec
        return rec

    def test_job(self, r: EvalRecord) -> EvalJob:
        """The job that scores ``r``'s recipe on each task's test split."""
        job = self.job(RecordKind.RESCORE, r.generation, r.index, r.genome, None)
        return EvalJob(RecordKind.TEST, job.generation, job.index, job.genome, job.recipe, {}, TEST_KEY)

    def top_candidates(self, records) -> list[EvalRecord]:
        """The ``rescore_top_k`` best distinct recipes among candidate records (search.ranking)."""
        return ranking.top_candidates(records, self.cfg.rescore_top_k)

    def _end_generation(self, g: int, gen_records: list[EvalRecord], told: list[float], candidates: dict,
                        race: RaceSummary | None, items: int | None = None, optimizer: bool = True) -> None:
        best = ranking.best_of(candidates.values())
        rec = GenerationRecord(
            generation=g, popsize=len(gen_records), evaluations=len(candidates),
            best=CandidateRef(best.generation, best.index, best.fitness), median=float(np.median(told)),
            max=float(np.max(told)), item_evaluations=self.items_spent if items is None else items, time=time.time(),
            elapsed_s=round(self.elapsed(), 3), racing=race, steady=True if self.kind.batch is Batch.STEADY else None)
        self._append(rec)
        self._checkpoint(candidates, optimizer)

    def _checkpoint(self, candidates: dict, optimizer: bool = True) -> None:
        """The optimizer's state (unless ``optimizer`` is False: the steady engine writes it when it
        tells), the best so far and (NSGA-II) the Pareto front, after a generation."""
        if optimizer:
            self.run.write_optimizer(self.optimizer.state_dict())
        if self.multi:
            self._write_pareto(candidates)
        best = ranking.best_of(candidates.values())
        self._write_best(np.array(best.genome), f"best so far: generation {best.generation}, candidate "
                         f"{best.index}, subset fitness {best.fitness:.4f}")

    def _write_pareto(self, candidates: dict) -> None:
        objectives = [f"{t.name}:{t.metric}" for t in self.cfg.tasks]
        ok = sorted((r for r in candidates.values() if r.ok), key=lambda r: (r.generation, r.index))
        vecs = self._objectives(ok).tolist() if ok else []
        front = [{"generation": r.generation, "index": r.index, "recipe_hash": r.recipe_hash,
                  "genome": r.genome, "objectives": v, "fitness": r.fitness, "metrics": r.metrics}
                 for r, v in zip(ok, vecs, strict=True)]
        self.run.write_pareto({"objectives": objectives, "front": pareto_front(front)})

    def _write_best(self, genome: np.ndarray, note: str) -> None:
        recipe = self.codec.to_recipe(genome)
        self.run.write_best(f"# {note}\n" + recipe.to_yaml(), mergekit_yaml(recipe, note))

    def _rescore(self, candidates: dict, generations: int) -> None:
        """Top-k distinct recipes re-scored on the full dev split; the best one is the winner."""
        rescored = {r.recipe_hash: r for r in self.run.records() if r.type == RecordKind.RESCORE}
        top = self.top_candidates(candidates.values())
        if not top:
            raise RunFolderError("every candidate failed; see the reasons in the log (evomerge status)")
        self.display.message(f"re-scoring the top {len(top)} candidates on the full dev split...")
        jobs = [self.job(RecordKind.RESCORE, r.generation, r.index, r.genome, None)
                for r in top if r.recipe_hash not in rescored]
        for rec in self._evaluate(jobs).values():
            rescored[rec.recipe_hash] = rec
        win = ranking.pick_winner([rescored[r.recipe_hash] for r in top])
        self._write_best(np.array(win.genome), f"winner: generation {win.generation}, candidate "
                         f"{win.index}, full-dev fitness {win.fitness:.4f}")
        final = FinalRecord(generations=generations, evaluations=len(candidates), generation=win.generation,
                            index=win.index, recipe_hash=win.recipe_hash, fitness=win.fitness,
                            metrics=win.metrics, test_metrics=self._test_metrics(win),
                            time=time.time(), elapsed_s=round(self.elapsed(), 3))
        self._append(final)

    def _test_metrics(self, win: EvalRecord) -> Metrics:
        """The winner's scores on each task's held-out ``test`` split, where the task has one: a
        test job like any other, logged as a ``test`` record (one already logged, by background
        work or before a kill, is reused). For reports only: test scores never enter the search's
        decisions; a failed test split leaves its finite metrics, or none, and the search ends."""
        done = self.tested.get(win.recipe_hash)
        if done is None:
            for job, res in self._run([self.test_job(win)]):
                done = self.log_test(job, res)
        return done.metrics

    def _outcome(self, hist: RunHistory) -> SearchOutcome:
        final, ref = hist.final, hist.reference
        evals = len({(r.generation, r.index) for r in hist.candidates})
        recipe = self.run.read_best() if final else None
        return SearchOutcome(self.run.path, len(hist.generations), evals, final.fitness if final else None, recipe,
                             True, ref.fitness if ref else None)
