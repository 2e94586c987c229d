"""Search progress: a live rich panel, or one plain line per generation with ``--quiet``."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from evomerge.search import ranking
from evomerge.search.history import RunHistory
from evomerge.search.records import EvalRecord, RecordKind


class Display:
    def __init__(self, quiet: bool, tasks: list[str]):
        self.quiet, self.tasks = quiet, tasks
        # soft_wrap: a line is never cut at the console's width (80 columns when not a terminal)
        self.console = Console(stderr=True, soft_wrap=True)
        self.live: Live | None = None
        self.t0 = time.monotonic()
        self.n_new = 0  # candidates evaluated in this session (for the time estimate)
        self.evaluations = 0
        self.gens_done = 0
        self.best: EvalRecord | None = None
        self.ref: EvalRecord | None = None
        self.max_generations = 0
        self.popsize = 0

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def start(self, max_generations, popsize: int, records: list) -> None:
        self.max_generations, self.popsize = max_generations, popsize
        hist = RunHistory(records)
        self.evaluations = sum(1 for r in hist.candidates if not r.stage)
        self.best = hist.best  # search.ranking's rule: the candidate best.yaml names
        self.gens_done = len(hist.generations)
        if self.evaluations:
            self.message(f"resuming: {self.evaluations} evaluations and {self.gens_done} generations in the log")
        if hist.reference is not None:
            self.reference(hist.reference)
        if not self.quiet and self.console.is_terminal:
            self.live = Live(self._panel(), console=self.console, refresh_per_second=4)
            self.live.start()

    def logged(self, rec) -> None:
        """A record the search appended (every one comes here: search.loop.Search._append)."""
        kind = RecordKind(rec.type)
        if kind is RecordKind.REFERENCE:
            self.reference(rec)
        elif kind is RecordKind.CANDIDATE:
            self.candidate(rec)
        elif kind is RecordKind.GENERATION:
            self.generation(rec, self.best)
        elif kind is RecordKind.FINAL:
            self.final(rec)

    def reference(self, rec) -> None:
        self.ref = rec
        self.message(f"starting point: fitness {rec.fitness:.4f} on the full dev split")

    def candidate(self, rec) -> None:
        if not rec.stage:  # racing: a candidate counts once, at its first stage
            self.evaluations += 1
            self.n_new += 1
        if self.best is None or ranking.better(rec, self.best):
            self.best = rec
        if not rec.ok:
            self.message(f"candidate g{rec.generation}/{rec.index} failed: {rec.reason}")
        if self.live:
            self.live.update(self._panel())

    def generation(self, rec, best) -> None:
        self.gens_done = rec.generation + 1
        if self.live:
            self.live.update(self._panel())
        else:
            self.message(f"generation {rec.generation}: evaluations {rec.evaluations}, median "
                         f"{rec.median:.4f}, max {rec.max:.4f}, best {best.fitness:.4f} "
                         f"{self._per_task(best)}{self._timing()}")

    def final(self, rec) -> None:
        self.close()
        self.message(f"winner (full dev split): fitness {rec.fitness:.4f} {self._per_task(rec)}, from "
                     f"generation {rec.generation}, candidate {rec.index}")

    def _per_task(self, rec) -> str:
        # an IRT-estimated candidate shows its estimates (what its fitness sums), marked "est."
        shown = getattr(rec, "estimated", None) or rec.metrics
        parts = [f"{t} {next(iter(m.values())):.3f}" for t, m in shown.items() if m]
        if shown is not rec.metrics and parts:
            parts[0] = "est. " + parts[0]
        return f"({', '.join(parts)})" if parts else ""

    def _timing(self) -> str:
        if not self.n_new:
            return ""
        per = (time.monotonic() - self.t0) / self.n_new
        left = (self.max_generations * self.popsize - self.evaluations) * per
        eta = f", about {left / 60:.1f} min left" if left < float("inf") else ""
        return f"; {per:.2f} s/candidate{eta}"

    def _panel(self) -> Table:
        t = Table(title="evomerge search", show_header=False)
        t.add_row("generation", f"{self.gens_done} / {self.max_generations}")
        t.add_row("evaluations", str(self.evaluations))
        if self.ref:
            t.add_row("starting point", f"{self.ref.fitness:.4f}")
        if self.best:
            t.add_row("best fitness", f"{self.best.fitness:.4f} {self._per_task(self.best)}")
        t.add_row("time", self._timing().lstrip("; ") or "-")
        return t

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None

