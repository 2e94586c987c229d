"""Which optimizer should be the default? pycma CMA-ES, Optuna CMA-ES, TPE and random search on the
zoo, with the same evaluation budget and the same evaluation subsets (a seed's subsets are the same
for every optimizer), several seeds each.

For every run: the winner's fitness on the full dev split (after the usual top-k re-scoring) and
its fitness on the held-out test split. The table gives, per optimizer, the median and the range
(min-max) over seeds, and the gain over random search in the same run.

Time budget: the full mode (5 seeds x 4 optimizers x 96 evaluations on 100 dev items per task)
takes about 20 minutes on 2 CPU cores; --quick (2 seeds x 24 evaluations on 50 items, top-1
re-scoring) about 2 minutes.

    python scripts/bench_search.py [--quick] [--zoo artifacts/zoo] [--seeds 5] [--evaluations 96]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.evaluator import LmEvalEvaluator  # noqa: E402
from evomerge.evaluation.report import Table  # noqa: E402
from evomerge.models.folders import load_causal_lm, load_tokenizer  # noqa: E402
from evomerge.runs.start import run_search  # noqa: E402
from evomerge.search.config import SearchConfig  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402
from evomerge.zoo.table import merged_model  # noqa: E402

OPTIMIZERS = {
    "pycma CMA-ES": {"name": "cma"},
    "Optuna CmaEsSampler": {"name": "optuna", "sampler": "CmaEsSampler"},
    "Optuna TPESampler": {"name": "optuna", "sampler": "TPESampler"},
    "random search": {"name": "random"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--evaluations", type=int, default=96)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--limit", type=int, default=100, help="dev items per task per evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=3, help="candidates re-scored on the full dev split")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 24 evaluations, 50 items, top-1 re-scoring")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.evaluations, args.limit, args.top_k = 2, 24, 50, 1
    quiet_libraries()
    torch.set_num_threads(args.threads)
    build_zoo(args.zoo, ZooParams())
    m = read_manifest(args.zoo)
    tasks = list(m["tasks"].values())
    base = load_causal_lm(args.zoo / m["base"])
    tok = load_tokenizer(args.zoo / m["base"])
    test = LmEvalEvaluator(tasks, split="test", batch_size=64)
    runs = Path(tempfile.mkdtemp(prefix="bench_search_"))
    t0 = time.perf_counter()
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in OPTIMIZERS}
    try:
        for seed in range(args.seeds):
            for name, opt in OPTIMIZERS.items():
                cfg = SearchConfig.from_dict({
                    "models": [str(args.zoo / m["models"][s]["path"]) for s in m["specialists"]],
                    "base_model": str(args.zoo / m["base"]),
                    "search_space": "ps_task_arithmetic",
                    "tasks": [{"name": t, "weight": 1 / len(tasks), "limit": args.limit} for t in tasks],
                    "batch_size": 64, "threads": args.threads, "seed": seed,
                    "optimizer": dict(opt, popsize=args.popsize),
                    "budget": {"evaluations": args.evaluations}, "rescore_top_k": args.top_k,
                    "run_dir": str(runs / f"{name.replace(' ', '_')}_{seed}"),
                })
                out = run_search(cfg, quiet=True)
                res = test.evaluate(merged_model(yaml.safe_load(out.best_recipe.to_yaml()), base), tok)
                test_fit = sum(r.metrics["acc"] for r in res.values()) / len(res)
                results[name].append((out.best_fitness, test_fit))
                print(f"seed {seed} {name}: dev {out.best_fitness:.3f} test {test_fit:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    rnd_dev = statistics.median(d for d, _ in results["random search"])
    rows = []
    for name, vals in results.items():
        dev, tst = [d for d, _ in vals], [t for _, t in vals]
        rows.append([name, f"{statistics.median(dev):.3f}", f"{min(dev):.3f}-{max(dev):.3f}",
                     f"{statistics.median(dev) - rnd_dev:+.3f}", f"{statistics.median(tst):.3f}",
                     f"{min(tst):.3f}-{max(tst):.3f}"])
    table = Table(f"{args.seeds} seeds x {args.evaluations} evaluations (popsize {args.popsize}, "
                  f"{args.limit} dev items per task), {time.perf_counter() - t0:.0f} s",
                  ["optimizer", "dev median", "dev range", "vs random", "test median", "test range"], rows)
    table.print()
    if args.markdown:
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
