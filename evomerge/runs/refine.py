"""``evomerge refine RUN_DIR``: a finished run's recipe trained by gradient (search/refine.py),
then logged into the run like any candidate (search/refine_log.py).

Every check comes before the lease is taken or a weight is read: the run folder and its frozen
config as a resume checks them (the sources and tasks unchanged), a finished run, a parameter
space whose method is differentiated (merge/differentiable.py). Then the run's lock is taken (a
running or locked run is refused by it), the start genome is trained and the result scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from evomerge.execution.registry import default_builder, local_factory
from evomerge.models.folders import load_tokenizer
from evomerge.models.sources import load_source
from evomerge.runs.folder import RunFolder
from evomerge.runs.progress import Display
from evomerge.runs.start import plan_search
from evomerge.search.codecs.parameter import make_codec
from evomerge.search.history import RunHistory
from evomerge.search.refine import RefineOptions, RefineResult, check_refinable, refine
from evomerge.search.refine_log import Logged, RefineLog, winner_of


class Start(StrEnum):
    BEST = "best"  # the run's winner
    BEST_PLAIN = "best-plain"  # the run's reference: the space's start, a plain merge


@dataclass(frozen=True)
class RefineOutcome:
    start: Start
    result: RefineResult
    logged: Logged


def start_genome(hist: RunHistory, start: Start) -> tuple[np.ndarray, str]:
    """The genome refine starts from, and what it is."""
    if start is Start.BEST:
        win = winner_of(hist)
        return np.array(win.genome), f"the winner (generation {win.generation}, candidate {win.index})"
    winner_of(hist)  # a finished run, whichever start
    ref = hist.reference
    return np.array(ref.genome), "the reference (the space's start: its plain merge)"


def refine_run(run_dir: str | Path, options: RefineOptions, *, start: Start = Start.BEST, quiet: bool = False,
               builder_factory=default_builder) -> RefineOutcome:
    options.check()
    factory = local_factory(builder_factory)
    plan = plan_search(None, run_dir=run_dir, executor=factory, resume=True)  # as a resume checks it
    cfg, evaluators = plan.cfg, plan.evaluators
    codec = make_codec(cfg, load_source)
    check_refinable(codec)
    run = RunFolder.open(plan.run_dir)
    genome, what = start_genome(RunHistory(run.records()), start)
    run.acquire()  # a running or locked run is refused here
    display = Display(quiet=quiet, tasks=[t.name for t in cfg.tasks])
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        display.message(f"refining {what}: {options.steps} steps of {options.objective.value}")
        builder = builder_factory(cfg)
        model = builder.build(codec.to_recipe(genome))
        tok = load_tokenizer(cfg.tokenizer_folder(), trust_remote_code=cfg.trust_remote_code)
        result = refine(codec, genome, model, tok, cfg.tasks, evaluators, options, allow_pickle=cfg.allow_pickle)
        del builder, model  # the scoring below loads its own
        display.message(f"training loss {result.start_loss:.4f} -> {result.end_loss:.4f}; scoring the refined genome")
        logged = RefineLog(cfg, run, display, factory).add(evaluators, result.genome, f"refined from {start.value}")
    finally:
        display.close()
        run.close()
    return RefineOutcome(start, result, logged)
