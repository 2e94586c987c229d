"""`evomerge status`: what a run folder says about its search, and its fitness plot.

Reads only the run folder (no model, no lm-eval), so it works while the search runs (the log is
append-only; a torn last line is ignored) and after it ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evomerge.evaluation.report import Table
from evomerge.runs.folder import RunFolder, RunFolderError
from evomerge.search import budget
from evomerge.search.config import SearchConfig
from evomerge.search.records import EvalRecord, FinalRecord, RecordKind

PLOT = "fitness.png"
PARETO_PLOT = "pareto.png"


@dataclass
class RunStatus:
    run_dir: Path
    config: SearchConfig
    records: list
    generations: int
    max_generations: float
    popsize: int | None
    evaluations: int
    failed: int
    cached: int
    busy_s: float
    reference: EvalRecord | None
    best: EvalRecord | None  # best candidate so far (search.ranking: the one best.yaml names)
    final: FinalRecord | None  # the winner after re-scoring, when the search finished
    item_evaluations: int = 0  # items scored (every task, every evaluation; reused items not counted)
    stage_evaluations: int = 0  # racing: evaluations of candidates at stages after the first

    @property
    def finished(self) -> bool:
        return budget.finished(self.final, self.config.budget, budget.spent_s(self.records))

    @property
    def seconds_per_candidate(self) -> float | None:
        evaluated = self.evaluations - self.cached
        return self.busy_s / evaluated if evaluated else None

    @property
    def eta_s(self) -> float | None:
        per = self.seconds_per_candidate
        if per is None or self.popsize is None or math.isinf(self.max_generations) or self.finished:
            return None
        return max(0.0, self.max_generations * self.popsize - self.evaluations) * per


def read_status(run_dir: str | Path, run: RunFolder | None = None) -> RunStatus:
    """The run folder's status; ``run`` (``status --watch``): the same folder read again, which
    parses only the records appended since (RunFolder.read_history)."""
    run = run or RunFolder.open(run_dir)
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    hist = run.read_history()
    stage_recs = hist.candidates
    cands = [r for r in stage_recs if not r.stage]  # one per candidate (racing: its first stage)
    gens = hist.generations
    popsize = gens[0].popsize if gens else cfg.optimizer.popsize
    evaluated = hist.evaluations()
    busy = sum(r.timings.get("merge_s", 0) + r.timings.get("eval_s", 0) for r in evaluated)
    return RunStatus(
        run_dir=Path(run_dir), config=cfg, records=list(hist.records), generations=len(gens),
        max_generations=budget.max_generations(cfg.budget, popsize),
        popsize=popsize, evaluations=len(cands), failed=sum(not r.ok for r in cands),
        cached=sum(bool(r.cached_from) for r in cands), busy_s=busy,
        reference=hist.reference, best=hist.best, final=hist.final,
        item_evaluations=sum(sum((r.items_scored or {}).values()) for r in evaluated),
        stage_evaluations=len(stage_recs) - len(cands),
    )


def _metric_line(rec, cfg: SearchConfig) -> str:
    parts = []
    for t in cfg.tasks:
        v = rec.metrics.get(t.name, {}).get(t.metric)
        if v is not None:
            parts.append(f"{t.name} {t.metric} {v:.3f}")
    return ", ".join(parts)


def status_table(st: RunStatus) -> Table:
    cfg = st.config
    rows = [["run folder", str(st.run_dir)],
            ["state", "finished" if st.finished else ("stopped or running" if st.evaluations else "not started")],
            ["optimizer", cfg.optimizer.name + (f" ({cfg.optimizer.sampler})" if cfg.optimizer.name == "optuna" else "")],
            ["generations", f"{st.generations} / {st.max_generations if not math.isinf(st.max_generations) else '-'}"],
            ["evaluations", f"{st.evaluations} ({st.failed} failed, {st.cached} from the cache)"]]
    if cfg.racing is not None:
        rows.append(["racing", f"stages {cfg.racing.stages}, keep {cfg.racing.keep}: "
                     f"{st.stage_evaluations} later-stage evaluations"])
    if st.item_evaluations:
        rows.append(["item evaluations", f"{st.item_evaluations} (items scored, all tasks; reused items not counted)"])
    if st.reference:
        rows.append(["starting point", f"{st.reference.fitness:.4f} (full dev)"])
    if st.best and st.config.optimizer.multi_objective:
        front = read_pareto(st.run_dir)
        if front is not None:
            rows.append(["Pareto front", f"{len(front['front'])} non-dominated candidates (pareto.json; "
                         "pick one with evomerge export --weights)"])
    if st.best:
        rows.append(["best (search subsets)", f"{st.best.fitness:.4f}: {_metric_line(st.best, cfg)}"])
    if st.final:
        rows.append(["winner (full dev)", f"{st.final.fitness:.4f}: {_metric_line(st.final, cfg)}"])
    per = st.seconds_per_candidate
    if per:
        rows.append(["speed", f"{60 / per:.1f} evaluations per minute ({per:.2f} s each)"])
    rows.append(["time so far", f"{st.busy_s / 60:.1f} min of merging and scoring"])
    if st.eta_s is not None:
        rows.append(["time left (estimate)", f"{st.eta_s / 60:.1f} min"])
    return Table(f"evomerge status: {st.run_dir}", ["", ""], rows)


def plot_fitness(st: RunStatus, path: Path | None = None) -> Path | None:
    """Best-so-far and population median per generation, and one line per task (best-so-far
    candidate's metric). Returns the PNG's path, or None when no generation is complete."""
    gens = [r for r in st.records if r.type == RecordKind.GENERATION]
    if not gens:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    cands = {(r.generation, r.index): r for r in st.records if r.type == RecordKind.CANDIDATE}
    xs = [g.generation for g in gens]
    best_recs = [cands[(g.best.generation, g.best.index)] for g in gens]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, [g.best.fitness for g in gens], "-o", lw=2, ms=3, label="best so far (fitness)")
    ax.plot(xs, [g.median for g in gens], "--", lw=1.5, label="population median")
    for t in st.config.tasks:
        ys = [r.metric(t.name, t.metric) for r in best_recs]
        ax.plot(xs, ys, lw=1, alpha=0.8, label=f"{t.name} {t.metric} (best so far)")
    if st.reference:
        ax.axhline(st.reference.fitness, color="grey", lw=0.8, ls=":", label="starting point")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness / metric")
    ax.set_title(f"{st.run_dir.name}: {st.evaluations} evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save_png(fig, path or st.run_dir / PLOT)


def read_pareto(run_dir: Path) -> dict | None:
    import json

    from evomerge.runs.folder import PARETO

    p = Path(run_dir) / PARETO
    return json.loads(p.read_text()) if p.is_file() else None


def plot_pareto(st: RunStatus, path: Path | None = None) -> Path | None:
    """Multi-objective runs: one panel per pair of objectives, every successful candidate in grey,
    the Pareto front (pareto.json) highlighted. None for single-objective runs or before the
    first generation ends."""
    if not st.config.optimizer.multi_objective:
        return None
    front = read_pareto(st.run_dir)
    if front is None:
        return None
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    tasks = st.config.tasks
    names = front["objectives"]
    pts = [[r.metric(t.name, t.metric) for t in tasks]
           for r in st.records if r.type == RecordKind.CANDIDATE and r.ok]
    fpts = sorted(m["objectives"] for m in front["front"])
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), dpi=110, squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ax.scatter([p[a] for p in pts], [p[b] for p in pts], s=10, c="lightgrey", label="candidates")
        ax.scatter([p[a] for p in fpts], [p[b] for p in fpts], s=22, c="crimson", label="Pareto front (all objectives)")
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{st.run_dir.name}: {len(front['front'])} non-dominated of {len(pts)} candidates")
    fig.tight_layout()
    return _save_png(fig, path or st.run_dir / PARETO_PLOT)


__all__ = ["PARETO_PLOT", "PLOT", "plot_pareto", "read_pareto", "RunFolderError", "RunStatus", "plot_fitness", "read_status", "status_table"]


def _save_png(fig, out: Path) -> Path:
    """Writes a matplotlib figure atomically (a reader never sees half a PNG) and closes it."""
    import io

    import matplotlib.pyplot as plt

    from evomerge.core.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
