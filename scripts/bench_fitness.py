"""Is racing a cheaper fitness that finds as good a winner? CMA-ES on the zoo, several seeds, with
full-dev fitness (every candidate on the whole dev split, 500 items per task) and with racing
(stages of nested seeded subsets, the better quarter promoted, the survivor on the whole split).

For every run: item-evaluations spent (items scored, all tasks, every evaluation: the starting
point, every stage, the re-scoring; items reused from an earlier stage are not scored again and
not counted; the winner's test-split scores are not counted), wall time (including the winner's
test-split scoring, the same for both), and the winner's test-split score (mean accuracy over the
tasks). The table gives medians over seeds (and the range), the item ratio against full-dev in the
same run, and the acceptance check: racing's median winner within 0.02 of full-dev's on the test
split with >= 5x fewer item-evaluations.

Time budget: the full mode (5 seeds x 3 generations x popsize 16, both fitnesses) takes about 25
minutes on 2 idle CPU cores at 1 torch thread (35 minutes at most); --quick (2 seeds x 1
generation x popsize 4, top-1 re-scoring) under 2 minutes (98 s measured); it checks that the
bench runs, not the acceptance: with one small generation the starting point's 1500 items dominate
and the item ratio is about 2.4x.

    PYTHONPATH=. python scripts/bench_fitness.py [--quick] [--zoo artifacts/zoo] [--seeds 5] [--generations 3]
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

from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.report import Table  # noqa: E402
from evomerge.runs.folder import RunFolder  # noqa: E402
from evomerge.runs.start import run_search  # noqa: E402
from evomerge.search.config import SearchConfig  # noqa: E402
from evomerge.search.racing import stage_cost  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402


def item_evaluations(records: list) -> int:
    return sum(sum((r.items_scored or {}).values()) for r in records
               if r.type in ("reference", "candidate", "rescore"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=16)
    ap.add_argument("--stages", default="30,100,all", help="racing stages: items per task (all: the whole split)")
    ap.add_argument("--keep", type=float, default=0.25, help="fraction promoted at each stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=3, help="candidates re-scored on the full dev split")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 1 generation, popsize 4, stages 20,60,all, top-1")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.generations, args.popsize, args.stages, args.top_k = 2, 1, 4, "20,60,all", 1
    stages = [None if s.strip() == "all" else int(s) for s in args.stages.split(",")]
    quiet_libraries()
    torch.set_num_threads(args.threads)
    build_zoo(args.zoo, ZooParams())
    m = read_manifest(args.zoo)
    tasks = list(m["tasks"].values())
    sized = [500 if s is None else s for s in stages]
    print(f"racing: stages {args.stages}, keep {args.keep}: {stage_cost(args.popsize, sized, args.keep)} items per "
          f"task per generation vs {args.popsize * 500} for full-dev", flush=True)
    runs = Path(tempfile.mkdtemp(prefix="bench_fitness_"))
    t0 = time.perf_counter()
    methods = {"full-dev": None, "racing": {"stages": stages, "keep": args.keep}}
    results: dict[str, list[tuple[int, float, float, float]]] = {k: [] for k in methods}
    try:
        for seed in range(args.seeds):
            for name, race in methods.items():
                cfg = SearchConfig.from_dict({
                    "models": [str(args.zoo / m["models"][s]["path"]) for s in m["specialists"]],
                    "base_model": str(args.zoo / m["base"]),
                    "search_space": "ps_task_arithmetic",
                    "tasks": [{"name": t, "weight": 1 / len(tasks)} for t in tasks],
                    "batch_size": 64, "threads": args.threads, "seed": seed,
                    "optimizer": {"name": "cma", "popsize": args.popsize},
                    "budget": {"generations": args.generations}, "rescore_top_k": args.top_k, "racing": race,
                    "run_dir": str(runs / f"{name}_{seed}"),
                })
                t1 = time.perf_counter()
                out = run_search(cfg, quiet=True)
                wall = time.perf_counter() - t1
                records = RunFolder.open(out.run_dir).records()
                final = records[-1]
                test = statistics.fmean(v["acc"] for v in final.test_metrics.values())
                items = item_evaluations(records)
                results[name].append((items, wall, test, out.best_fitness))
                print(f"seed {seed} {name}: {items} item-evaluations, {wall:.0f} s, winner dev "
                      f"{out.best_fitness:.3f} test {test:.3f} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    med = {k: [statistics.median(x[j] for x in v) for j in range(4)] for k, v in results.items()}
    rows = []
    for name, vals in results.items():
        tests = [x[2] for x in vals]
        rows.append([name, f"{med[name][0]:.0f}", f"{med['full-dev'][0] / med[name][0]:.1f}x",
                     f"{med[name][1]:.0f}", f"{med['full-dev'][1] / med[name][1]:.1f}x",
                     f"{med[name][3]:.3f}", f"{med[name][2]:.3f}", f"{min(tests):.3f}-{max(tests):.3f}"])
    gap = med["racing"][2] - med["full-dev"][2]
    ratio = med["full-dev"][0] / med["racing"][0]
    ok = gap >= -0.02 and ratio >= 5
    table = Table(f"CMA-ES, {args.seeds} seeds x {args.generations} generations x popsize {args.popsize}; racing "
                  f"stages {args.stages}, keep {args.keep}; {time.perf_counter() - t0:.0f} s; medians over seeds",
                  ["fitness", "item-evals", "fewer", "wall s", "faster", "winner dev", "winner test",
                   "test range"], rows)
    print(f"acceptance: racing's median winner {gap:+.3f} vs full-dev on test (needs >= -0.02), "
          f"{ratio:.1f}x fewer item-evaluations (needs >= 5): {'PASS' if ok else 'FAIL'}")
    table.print()
    if args.markdown:
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
