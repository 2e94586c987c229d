"""`evomerge status`: what a run folder says about its search, and its fitness plot.

Reads only the run folder (no model, no lm-eval), so it works while the search runs (the log is
append-only; a torn last line is ignored) and after it ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evomerge.config import SearchConfig
from evomerge.report import Table
from evomerge.run import RunFolder, RunFolderError

PLOT = "fitness.png"


@dataclass
class RunStatus:
    run_dir: Path
    config: SearchConfig
    records: list[dict]
    generations: int
    max_generations: float
    popsize: int | None
    evaluations: int
    failed: int
    cached: int
    busy_s: float
    reference: dict | None
    best: dict | None  # best candidate by search (subset) fitness
    final: dict | None  # the winner after re-scoring, when the search finished

    @property
    def finished(self) -> bool:
        return self.final is not None and self.final["generations"] >= self.max_generations

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


def read_status(run_dir: str | Path) -> RunStatus:
    run = RunFolder.open(run_dir)
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    records = run.records()
    cands = [r for r in records if r["type"] == "candidate"]
    gens = [r for r in records if r["type"] == "generation"]
    popsize = gens[0]["popsize"] if gens and "popsize" in gens[0] else cfg.optimizer.popsize
    b = cfg.budget
    limits = [math.inf]
    if b.generations:
        limits.append(b.generations)
    if b.evaluations and popsize:
        limits.append(math.ceil(b.evaluations / popsize))
    evaluated = [r for r in records if r["type"] in ("reference", "candidate", "rescore")]
    busy = sum(r["timings"]["merge_s"] + r["timings"]["eval_s"] for r in evaluated if "timings" in r)
    return RunStatus(
        run_dir=Path(run_dir), config=cfg, records=records, generations=len(gens), max_generations=min(limits),
        popsize=popsize, evaluations=len(cands), failed=sum(r["status"] != "ok" for r in cands),
        cached=sum(bool(r.get("cached_from")) for r in cands), busy_s=busy,
        reference=next((r for r in records if r["type"] == "reference"), None),
        best=max(cands, key=lambda r: r["fitness"]) if cands else None,
        final=next((r for r in reversed(records) if r["type"] == "final"), None),
    )


def _metric_line(rec: dict, cfg: SearchConfig) -> str:
    parts = []
    for t in cfg.tasks:
        v = rec.get("metrics", {}).get(t.name, {}).get(t.metric)
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
    if st.reference:
        rows.append(["starting point", f"{st.reference['fitness']:.4f} (full dev)"])
    if st.best:
        rows.append(["best (search subsets)", f"{st.best['fitness']:.4f}: {_metric_line(st.best, cfg)}"])
    if st.final:
        rows.append(["winner (full dev)", f"{st.final['fitness']:.4f}: {_metric_line(st.final, cfg)}"])
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
    gens = [r for r in st.records if r["type"] == "generation"]
    if not gens:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.io import atomic_write_bytes

    cands = {(r["generation"], r["index"]): r for r in st.records if r["type"] == "candidate"}
    xs = [g["generation"] for g in gens]
    best_recs = [cands[(g["best"]["generation"], g["best"]["index"])] for g in gens]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, [g["best"]["fitness"] for g in gens], "-o", lw=2, ms=3, label="best so far (fitness)")
    ax.plot(xs, [g["median"] for g in gens], "--", lw=1.5, label="population median")
    for t in st.config.tasks:
        ys = [r["metrics"].get(t.name, {}).get(t.metric, float("nan")) for r in best_recs]
        ax.plot(xs, ys, lw=1, alpha=0.8, label=f"{t.name} {t.metric} (best so far)")
    if st.reference:
        ax.axhline(st.reference["fitness"], color="grey", lw=0.8, ls=":", label="starting point")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness / metric")
    ax.set_title(f"{st.run_dir.name}: {st.evaluations} evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = path or st.run_dir / PLOT
    atomic_write_bytes(out, buf.getvalue())
    return out


__all__ = ["PLOT", "RunFolderError", "RunStatus", "plot_fitness", "read_status", "status_table"]
