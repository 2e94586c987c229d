"""Ray workers: the busy pipeline against a barrier after each generation, with uneven evaluation times.

A fixed amount of work: a CMA-ES search of N generations (popsize P) on the zoo, with background
work on (the full-dev re-scoring of the top-k candidates after each generation and the test-split
scores of each new best). Every build of a candidate sleeps an extra delay drawn per recipe
(seeded, lognormal: uneven), so that on a 2-core machine the scheduling shows, not the cores.

For 1 and 2 CPU workers (1 torch thread each), two schedules do the same work:
- barrier: each generation's candidates, then the background work it implies, then the next
  generation (workers idle while the slowest job of a phase finishes);
- pipelined: the background work runs on workers that the generation leaves idle, while it runs.
Reported: the wall time from the first candidate to the final record (median of repeats; two
workers start once, the 1-worker runs use one of them, and their start is not counted), the workers' busy fraction
(merge + delay + evaluation time over workers x wall), the speed-up over the barrier baseline with
the same workers, and whether every run has the same history. The table is printed last.

    python scripts/bench_workers.py --quick      # 1 repeat, 2 generations of 4: under 2 minutes on 2 cores
    python scripts/bench_workers.py              # 3 repeats, 4 generations of 6: about 10 minutes
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


class DelayedBuilder:
    """The search's candidate builder, plus a sleep drawn from the recipe's hash (uneven, seeded:
    the same recipe waits the same on any worker)."""

    def __init__(self, seed: int, mean_s: float, sigma: float):
        self.seed, self.mean_s, self.sigma = seed, mean_s, sigma

    def __call__(self, cfg):
        from evomerge.evaluation.trial import make_builder

        inner = make_builder(cfg)
        outer = self

        class Builder:
            model = inner.model

            def build(self, recipe):
                time.sleep(outer.delay(recipe.hash()))
                return inner.build(recipe)

        return Builder()

    def delay(self, recipe_hash: str) -> float:
        import numpy as np

        rng = np.random.default_rng([self.seed, int(recipe_hash[:12], 16)])
        return float(self.mean_s * rng.lognormal(-self.sigma**2 / 2, self.sigma))


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
        "tasks": [{"name": "zoo_rev", "metric": "acc", "limit": 16}],
        "batch_size": 32, "threads": 1, "seed": seed, "rescore_top_k": 2, "background": True,
        "optimizer": {"name": "cma", "popsize": popsize}, "budget": {"generations": gens},
    }


def measure(run_dir: Path, workers: int) -> dict:
    from evomerge.runs.folder import RunFolder

    recs = RunFolder.open(run_dir).records()
    ref = next(r for r in recs if r.type == "reference")
    final = recs[-1]
    wall = final.time - ref.time
    work = [r for r in recs if r.type in ("candidate", "rescore", "test") and getattr(r, "timings", None)]
    busy = sum(r.timings["merge_s"] + r.timings["eval_s"] for r in work)
    return {"wall": wall, "busy": busy / (workers * wall), "jobs": len(work)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 generations of 4 (under 2 minutes)")
    ap.add_argument("--zoo", type=Path, default=REPO / "artifacts" / "zoo")
    ap.add_argument("--delay", type=float, default=None, help="mean extra delay per build, seconds")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    gens, popsize, repeats = (2, 4, 1) if args.quick else (4, 6, 3)
    mean = args.delay if args.delay is not None else 1.2
    t_start = time.monotonic()

    import ray

    from evomerge.execution.ray import RayExecutor
    from evomerge.models.sources import load_source
    from evomerge.runs.folder import RunFolder, history
    from evomerge.runs.start import run_search
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig
    from evomerge.search.jobs import EvalJob

    cfg = SearchConfig.from_dict(config(args.zoo, gens, popsize, args.seed))
    builder = DelayedBuilder(args.seed, mean, sigma=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows, histories = [], []
    try:
        # Two workers start once; the 1-worker runs use the first only.
        ex = RayExecutor(cfg, None, None, workers=2, threads=1, builder_factory=builder)
        both = list(ex.slots)
        # Warm-up (not measured): one evaluation on each worker, so no run pays for a fresh process.
        codec = make_codec(cfg, load_source)
        job = EvalJob("candidate", 0, 0, tuple(codec.x0), codec.to_recipe(codec.x0), {"zoo_rev": list(range(16))},
                      "warm-up")
        ray.get([s.actor.run.remote(job) for s in both])
        try:
            for workers in (1, 2):
                ex.slots = both[:workers]
                for mode in ("barrier", "pipelined"):
                    runs = []
                    for rep in range(repeats):
                        run_dir = tmp / f"w{workers}-{mode}-{rep}"
                        run_search(cfg, run_dir=run_dir, quiet=True,
                                   executor_factory=lambda c, f, t, m=mode, e=ex: Shared(e, m == "pipelined"))
                        runs.append(measure(run_dir, workers))
                        histories.append(history(RunFolder.open(run_dir).records()))
                        print(f"workers {workers} {mode} repeat {rep}: {runs[-1]['wall']:.1f} s, busy "
                              f"{runs[-1]['busy']:.0%}", file=sys.stderr, flush=True)
                    rows.append({"workers": workers, "mode": mode, "jobs": runs[0]["jobs"],
                                 "wall": statistics.median(r["wall"] for r in runs),
                                 "busy": statistics.median(r["busy"] for r in runs)})
        finally:
            ex.slots = both
            ex.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    same = all(h == histories[0] for h in histories)
    base = {r["workers"]: r["wall"] for r in rows if r["mode"] == "barrier"}
    print(f"\nbench_workers: CMA-ES, {gens} generations x {popsize} + top-2 re-scoring (full dev, 500 items) and "
          f"test scores of each new best; zoo_rev, 16 items per candidate; extra delay per build lognormal, mean "
          f"{mean:.1f} s (seed {args.seed}); CPU workers, 1 thread each; median of {repeats}; "
          f"total {time.monotonic() - t_start:.0f} s; same history in all {len(histories)} runs: {same}\n")
    print("| workers | schedule | jobs | wall s | busy | speed-up vs barrier |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['mode']} | {r['jobs']} | {r['wall']:.1f} | {r['busy']:.0%} | "
              f"{base[r['workers']] / r['wall']:.2f}x |")
    speedup = base[2] / next(r["wall"] for r in rows if r["workers"] == 2 and r["mode"] == "pipelined")
    target = speedup >= 1.2
    print(f"\n2 workers, pipelined vs barrier: {speedup:.2f}x (target >= 1.2x: {'met' if target else 'missed'})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
