"""`evomerge refine RUN_DIR`: a finished run's weights trained by gradient, logged as a candidate."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.core.env import quiet_libraries

_DESCRIPTION = """\
Trains the weight genes of a finished run's recipe (a weight per source per layer group, as its
search space defines them) by gradient descent (Adam) through the merged model's forward pass,
on the search split's items, then scores the result with the run's evaluator and logs it like any
candidate: on the last generation's items, on the whole search split, and on the test split
(reported only). If it beats the winner on the search split, best.yaml, export and materialize
name it. Every other gene (density, rank fraction, lambda) and every mask stay at the start's
values; the weights stay within the space's bounds. Methods: the task-arithmetic family, linear,
tsv (docs/search.md, "Refine").
"""


def cmd_refine(args: argparse.Namespace) -> int:
    from evomerge.runs.refine import Start, refine_run
    from evomerge.search.refine import Objective, RefineOptions

    quiet_libraries()
    opts = RefineOptions(steps=args.steps, lr=args.lr, batch_items=args.batch_items, items=args.items,
                         objective=Objective(args.objective), seed=args.seed)
    out = refine_run(args.run_dir, opts, start=Start(args.start), quiet=args.quiet)
    res, log = out.result, out.logged
    print(f"training loss ({opts.objective.value}): {res.start_loss:.4f} -> {res.end_loss:.4f}")
    print(f"refined: search-split fitness {log.rescore.fitness:.4f} (winner {log.winner.fitness:.4f})")
    for task, m in log.test.items():
        print(f"  test {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    print("the refined candidate is the run's new winner" if log.final else "the winner stays")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("refine", help="train a finished run's weights by gradient and log the result",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--from", dest="start", choices=["best", "best-plain"], default="best",
                   help="start at the run's winner (default) or at its reference, the space's plain merge")
    p.add_argument("--objective", choices=["cross_entropy", "entropy"], default="cross_entropy",
                   help="cross_entropy: the answers' negative log-likelihood (default); entropy: label-free "
                   "(AdaMerging)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's step in units of each weight's "
                   "range (default 0.05)")
    p.add_argument("--batch-items", type=int, default=16, help="items per task in a step")
    p.add_argument("--items", type=int, help="training items per task, a seeded subset of the search split "
                   "(default: all of it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_refine)
