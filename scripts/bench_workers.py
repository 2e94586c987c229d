"""Ray workers: the busy pipeline against a barrier after each generation, with real, uneven work.

A fixed amount of work: a CMA-ES search of N generations (popsize P) on the zoo with racing (each
generation scores its candidates on 4 items of each of two tasks, the better half on 8 more, the
best quarter on 16 more, as successive halving does) and background work (the full-dev
re-scoring, 500 items per task, of the top-k candidates after each generation, and the
test-split scores of each new best). So jobs cost from a few items to a thousand: uneven because
the work is, no sleeps.

For 1 and 2 CPU workers (1 torch thread each), two schedules do the same work:
- barrier: each generation's candidates, then the background work it implies, then the next
  generation (workers idle while the slowest job of a phase finishes);
- pipelined: the background work runs on workers that the generation leaves idle, while it runs.
Reported: the wall time from the reference candidate's start to the final record (median of
repeats; two workers start once, the 1-worker runs use one of them, and their start is not
counted), the workers' busy fraction from CPU time (the worker processes' user + system CPU
seconds over the run, from /proc, over workers x wall: a worker waiting for work, or for a core
that another process holds, is not busy), the speed-up over the barrier with the same workers,
and whether every run has the same history. The table is printed last.

Beside them, random search without racing (each candidate on 16 items of each task, a population
of P + 1, so that 2 workers leave one idle at each generation's tail), the same background work:
- barrier: generational random search, background work at the barriers;
- generation: generational random search, pipelined (background work in the idle slots);
- steady: the steady-state engine (``random_steady``, search/steady.py): the next candidate is
  asked as soon as a worker frees, so no worker waits for a generation's last candidate.
Both draw the same genomes (SteadyRandomSearch's draws are RandomSearch's, row by row).
And M2N2 (``m2n2``, steady, two candidates in flight), on the random search's tasks and items: its
asks depend on the results, two at a time, so this row says whether 2 workers stay busy with it.

    python scripts/bench_workers.py --quick      # 1 repeat, 2 generations of 4: about 3 minutes on 2 cores
    python scripts/bench_workers.py              # 3 repeats, 3 generations of 6
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_seconds(pids) -> float:
    """User + system CPU time of these processes (their threads included)."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


class Shared:
    """One RayExecutor for several searches (its workers start once); close() is a no-op."""

    def __init__(self, ex, pipelined: bool):
        object.__setattr__(self, "_ex", ex)
        object.__setattr__(self, "pipelined", pipelined)

    def __getattr__(self, name):
        return getattr(self._ex, name)

    def __setattr__(self, name, value):
        setattr(self._ex, name, value)

    def run(self, jobs, *, background=None):
        return self._ex.run(jobs, background=background)

    def close(self):
        pass


def config(zoo: Path, gens: int, popsize: int, seed: int) -> dict:
    return {
        "models": [str(zoo / f"spec_{s}") for s in ("add", "rev", "sub")],
        "base_model": str(zoo / "base"),
        "search_space": "ps_task_arithmetic",
        "tasks": [{"name": "zoo_rev", "metric": "acc"}, {"name": "zoo_add", "metric": "acc"}],
        "racing": {"stages": [4, 8, 16], "keep": 0.5},
        "batch_size": 32, "threads": 1, "seed": seed, "rescore_top_k": 2, "background": True,
        "optimizer": {"name": "cma", "popsize": popsize}, "budget": {"generations": gens},
    }


def random_config(zoo: Path, gens: int, popsize: int, seed: int, steady: bool) -> dict:
    cfg = config(zoo, gens, popsize + 1, seed)
    cfg.update(racing=None, optimizer={"name": "random_steady" if steady else "random", "popsize": popsize + 1},
               tasks=[{"name": "zoo_rev", "metric": "acc", "limit": 16}, {"name": "zoo_add", "metric": "acc", "limit": 16}])
    return cfg


def m2n2_config(zoo: Path, gens: int, popsize: int, seed: int) -> dict:
    cfg = random_config(zoo, gens, popsize, seed, True)
    cfg["optimizer"] = {"name": "m2n2", "popsize": popsize + 1, "m2n2": {"archive_size": popsize + 1, "in_flight": 2}}
    return cfg


def measure(run_dir: Path, workers: int, cpu_s: float) -> dict:
    from evomerge.runs.folder import RunFolder

    recs = RunFolder.open(run_dir).records()
    ref = next(r for r in recs if r.type == "reference")
    final = recs[-1]
    wall = final.time - ref.time + ref.timings["merge_s"] + ref.timings["eval_s"]  # from the reference's start
    work = [r for r in recs if r.type in ("reference", "candidate", "rescore", "test") and getattr(r, "timings", None)]
    items = [sum(r.items_scored.values()) for r in work if getattr(r, "items_scored", None)]
    return {"wall": wall, "busy": cpu_s / (workers * wall), "jobs": len(work), "items": (min(items), max(items))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 generations of 4 (under 2 minutes)")
    ap.add_argument("--zoo", type=Path, default=REPO / "artifacts" / "zoo")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    gens, popsize, repeats = (2, 4, 1) if args.quick else (3, 6, 3)
    t_start = time.monotonic()

    import ray

    from evomerge.execution import ExecutorKind
    from evomerge.execution.factory import Factory
    from evomerge.execution.ray import RayExecutor
    from evomerge.models.sources import load_source
    from evomerge.runs.folder import RunFolder, history
    from evomerge.runs.start import run_search
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig
    from evomerge.search.jobs import EvalJob

    cfg = SearchConfig.from_dict(config(args.zoo, gens, popsize, args.seed))
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows, histories = [], {}
    searches = {"cma": ("barrier", "pipelined"), "random": ("barrier", "generation", "steady"), "m2n2": ("steady",)}
    cfgs = {("cma", m): cfg for m in searches["cma"]}
    cfgs |= {("random", m): SearchConfig.from_dict(random_config(args.zoo, gens, popsize, args.seed, m == "steady"))
             for m in searches["random"]}
    cfgs[("m2n2", "steady")] = SearchConfig.from_dict(m2n2_config(args.zoo, gens, popsize, args.seed))
    try:
        # Two workers start once; the 1-worker runs use the first only.
        ex = RayExecutor(cfg, None, None, workers=2, threads=1)
        both = list(ex.slots)
        # Warm-up (not measured): one evaluation on each worker, so no run pays for a fresh process.
        codec = make_codec(cfg, load_source)
        job = EvalJob("candidate", 0, 0, tuple(codec.x0), codec.to_recipe(codec.x0),
                      {"zoo_rev": list(range(4)), "zoo_add": list(range(4))}, "warm-up")
        ray.get([s.actor.run.remote(job) for s in both])
        try:
            for search, modes in searches.items():
                for workers in (1, 2):
                    ex.slots = both[:workers]
                    for mode in modes:
                        runs = []
                        for rep in range(repeats):
                            run_dir = tmp / f"{search}-w{workers}-{mode}-{rep}"
                            pids = [s.info["pid"] for s in ex.slots]
                            cpu0 = cpu_seconds(pids)
                            shared = Factory(ExecutorKind.RAY, lambda c, f, t, m=mode, e=ex: Shared(e, m != "barrier"))
                            run_search(cfgs[(search, mode)], run_dir=run_dir, quiet=True, executor_factory=shared)
                            runs.append(measure(run_dir, workers, cpu_seconds(pids) - cpu0))
                            histories.setdefault((search, mode), []).append(history(RunFolder.open(run_dir).records()))
                            print(f"{search} workers {workers} {mode} repeat {rep}: {runs[-1]['wall']:.1f} s, busy "
                                  f"{runs[-1]['busy']:.0%}", file=sys.stderr, flush=True)
                        rows.append({"search": search, "workers": workers, "mode": mode, "jobs": runs[0]["jobs"],
                                     "items": runs[0]["items"], "wall": statistics.median(r["wall"] for r in runs),
                                     "busy": statistics.median(r["busy"] for r in runs)})
        finally:
            ex.slots = both
            ex.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    same = all(h == hs[0] for hs in histories.values() for h in hs)
    base = {(r["search"], r["workers"]): r["wall"] for r in rows if r["mode"] == "barrier"}
    print(f"\nbench_workers: CMA-ES, {gens} generations x {popsize}, racing 4/8/16 items on zoo_rev + zoo_add, "
          f"top-2 re-scoring (full dev, 500 items per task) and test scores of each new best (seed {args.seed}); "
          f"CPU workers, 1 thread each; busy from the workers' CPU time; median of {repeats}; "
          f"total {time.monotonic() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f}; "
          f"same history in each search's runs: {same}; random search: {popsize + 1} a generation, 16 items "
          "per task\n")
    print("| search | workers | schedule | jobs | items per job | wall s | busy (CPU) | speed-up vs barrier |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['search']} | {r['workers']} | {r['mode']} | {r['jobs']} | {r['items'][0]}-{r['items'][1]} | "
              f"{r['wall']:.1f} | {r['busy']:.0%} | "
              + (f"{base[(r['search'], r['workers'])] / r['wall']:.2f}x |" if (r["search"], r["workers"]) in base else "- |"))
    speedup = base[("cma", 2)] / next(r["wall"] for r in rows if r["workers"] == 2 and r["mode"] == "pipelined")
    target = speedup >= 1.2
    print(f"\n2 workers, pipelined vs barrier: {speedup:.2f}x (target >= 1.2x: {'met' if target else 'missed'})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
