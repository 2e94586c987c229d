"""Cheaper fitness, against honest baselines: CMA-ES on the zoo's three tasks, several seeds, each
fitness running its own search (the fitness drives the optimizer):

    full-dev      every candidate on the whole dev split (500 items per task)
    random-N      a seeded random subset of N items per task (``tasks[].limit``, redrawn per
                  generation), N = the anchors' count: the same items per candidate as IRT
    random-M      the same at M items, M chosen so its total item budget is about IRT's
                  (IRT's one-off scoring of the sources spent on more items per candidate instead)
    racing        racing [30, 100, null], keep 0.25 (today's default)
    irt           fitness {estimator: irt, anchors: N}: anchors only, p-IRT estimate
    irt+racing    the anchors as the race's first stage, then [100, null], keep 0.25

Every run: item-evaluations (every item scored: the sources' scoring for IRT, the starting point,
every candidate and stage, the final re-scoring; items reused are not scored again and not
counted; the winner's test scoring is not counted), the candidates' own items (``search items``),
wall time (the sources' scoring for IRT is done once for all runs, real lm-eval, and its items are
counted in every IRT run; its wall time is printed once), the winner's full-dev and test fitness
(mean accuracy over the tasks). The table gives medians over seeds, the spread (min-max and the
interquartile range of the winner's test fitness) and the item ratios against full-dev.

Spearman: over every candidate of the full-dev searches (each scored on the whole dev split, per-
item scores in RUN_DIR/items/), per task, the rank correlation with the full-dev metric of (a) the
IRT estimate from the anchors (the pre-search fit: the sources and the starting point, as the
search does at generation -1), (b) the anchors' plain mean, (c) a random subset of N items.

Time budget: full mode (10 seeds x 3 generations x popsize 8, 6 fitnesses) 37 minutes measured (2204 s) on 2
busy cores at 1 torch thread (the full-dev runs are two thirds of it); --quick (1 seed x 1
generation x popsize 4) about 2 minutes (141 s measured at load average 7). Results go to --out as JSON lines as each run ends;
--report FILE prints the table from such a file (a partial bench too).

    PYTHONPATH=. python scripts/bench_fitness.py [--quick] [--seeds 10] [--out /tmp/bench.jsonl]
"""

from __future__ import annotations

import argparse
import json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation import irt  # noqa: E402
from evomerge.evaluation.report import Table  # noqa: E402
from evomerge.runs.folder import RunFolder  # noqa: E402
from evomerge.runs.start import run_search  # noqa: E402
from evomerge.search import irt_fitness  # noqa: E402
from evomerge.search.config import SearchConfig  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, cache_key, read_manifest  # noqa: E402

COUNTED = ("reference", "candidate", "rescore", "irt")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def variants(n: int, m: int) -> dict[str, dict]:
    return {
        "full-dev": {"racing": None},
        f"random-{n}": {"racing": None, "limit": n},
        f"random-{m}": {"racing": None, "limit": m},
        "racing": {"racing": {"stages": [30, 100, None], "keep": 0.25}},
        "irt": {"racing": None, "fitness": {"estimator": "irt", "anchors": n}},
        "irt+racing": {"racing": {"stages": [100, None], "keep": 0.25}, "fitness": {"estimator": "irt", "anchors": n}},
    }


def config(args, m, tasks, name: str, over: dict, seed: int, run_dir: Path) -> SearchConfig:
    data = {
        "models": [str(args.zoo / m["models"][s]["path"]) for s in m["specialists"]],
        "base_model": str(args.zoo / m["base"]), "search_space": "ps_task_arithmetic",
        "tasks": [{"name": t, "weight": 1 / len(tasks), **({"limit": over["limit"]} if "limit" in over else {})}
                  for t in tasks],
        "batch_size": 64, "threads": args.threads, "seed": seed, "study": None,
        "optimizer": {"name": "cma", "popsize": args.popsize}, "budget": {"generations": args.generations},
        "rescore_top_k": args.top_k, "racing": over["racing"], "run_dir": str(run_dir)}
    if "fitness" in over:
        data["fitness"] = over["fitness"]
    return SearchConfig.from_dict(data)


def read_items(run_dir: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    with np.load(run_dir / "items" / name) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            task, col = key.rsplit("/", 1)
            out.setdefault(task, {})[col] = z[key]
    return out


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


def correlations(run_dir: Path, records, sources, tasks, seed: int, n: int) -> dict:
    """Per task: the full-dev metric of every full-dev candidate against the IRT estimate, the
    anchors' mean and a random subset's mean (module docstring)."""
    ref = next(r for r in records if r.type == "reference")
    ref_items = read_items(run_dir, ref.items_file)
    cands = {}
    for r in records:
        if r.type == "candidate" and r.ok and r.items_file and r.recipe_hash not in cands:
            cands[r.recipe_hash] = read_items(run_dir, r.items_file)
    out = {}
    for ti, t in enumerate(tasks):
        y = np.vstack([sources[t], ref_items[t]["acc"][np.argsort(ref_items[t]["doc"])][None]])
        params = irt.fit_2pl(y)[0]
        anchors = irt.choose_anchors(params, n, [seed, ti, 11], "cluster", t)
        rnd = sorted(np.random.default_rng([seed, ti, 99]).choice(y.shape[1], n, replace=False))
        full, est, amean, rmean = [], [], [], []
        for c in cands.values():
            v = c[t]["acc"][np.argsort(c[t]["doc"])]
            full.append(v.mean())
            est.append(irt.estimate(params, anchors, v[anchors]))
            amean.append(v[anchors].mean())
            rmean.append(v[rnd].mean())
        out[t] = {"irt": spearman(full, est), "anchor mean": spearman(full, amean),
                  f"random-{n}": spearman(full, rmean), "n": len(full),
                  "irt mae": float(np.mean(np.abs(np.array(est) - full))),
                  "random mae": float(np.mean(np.abs(np.array(rmean) - full)))}
    return out


def run(args) -> None:
    quiet_libraries()
    torch.set_num_threads(args.threads)
    build_zoo(args.zoo, ZooParams())
    m = read_manifest(args.zoo)
    tasks = list(m["tasks"].values())
    vs = variants(args.anchors, args.matched)
    runs = Path(tempfile.mkdtemp(prefix="bench_fitness_"))
    out = open(args.out, "a")  # noqa: SIM115
    t0 = time.perf_counter()
    print(f"load average at start {load()}; {args.seeds} seeds x {args.generations} generations x popsize "
          f"{args.popsize}, top-{args.top_k} re-scoring, {args.threads} torch thread(s)", flush=True)
    # the sources' whole-split scores: once (real lm-eval, in the driver as a search does), reused by
    # every IRT run (their items counted in each run's irt record)
    cfg0 = config(args, m, tasks, "full-dev", vs["full-dev"], 0, runs / "probe")
    from evomerge.evaluation.fitness import FitnessFunction
    from evomerge.models.folders import load_tokenizer
    from evomerge.runs.start import validate

    ts = time.perf_counter()
    sources = irt_fitness.score_sources(cfg0, FitnessFunction(cfg0.tasks, validate(cfg0), 0),
                                        load_tokenizer(cfg0.base_model))
    src_s = time.perf_counter() - ts
    print(f"sources scored on the whole dev split once: {sum(int(v.size) for v in sources.values())} items, "
          f"{src_s:.0f} s (load {load()})", flush=True)
    out.write(json.dumps({"kind": "sources", "wall": src_s, "load": load()}) + "\n")
    irt_fitness.score_sources = lambda cfg, fitness, tok: {k: v.copy() for k, v in sources.items()}
    try:
        for seed in range(args.seeds):
            for name, over in vs.items():
                d = runs / f"{name}_{seed}"
                cfg = config(args, m, tasks, name, over, seed, d)
                t1 = time.perf_counter()
                res = run_search(cfg, quiet=True)
                wall = time.perf_counter() - t1
                records = RunFolder.open(res.run_dir).records()
                final = records[-1]
                row = {"kind": "run", "variant": name, "seed": seed, "wall": wall, "load": load(),
                       "items": sum(sum((r.items_scored or {}).values()) for r in records if r.type in COUNTED),
                       "search_items": sum(sum((r.items_scored or {}).values()) for r in records if r.type == "candidate"),
                       "dev": final.fitness, "test": statistics.fmean(v["acc"] for v in final.test_metrics.values())}
                if name == "full-dev":
                    row["spearman"] = correlations(d, records, sources, tasks, seed, args.anchors)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"seed {seed} {name}: {row['items']} item-evaluations ({row['search_items']} by candidates), "
                      f"{wall:.0f} s, winner dev {row['dev']:.3f} test {row['test']:.3f} (load {row['load']}, "
                      f"{time.perf_counter() - t0:.0f} s so far)", flush=True)
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
        out.close()
    print(f"bench time {time.perf_counter() - t0:.0f} s; load average at the end {load()}")


def report(path: Path, markdown: bool) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in rows if r["kind"] == "run"]
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    seeds = {v: sorted(r["seed"] for r in rs) for v, rs in by.items()}
    common = sorted(set.intersection(*(set(s) for s in seeds.values())))  # seeds every variant finished
    by = {v: [r for r in rs if r["seed"] in common] for v, rs in by.items()}
    ref = by["full-dev"]

    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    table_rows = []
    for v, rs in by.items():
        tests = sorted(r["test"] for r in rs)
        q = np.percentile(tests, [25, 75])
        table_rows.append([v, f"{med(rs, 'items'):.0f}", f"{med(ref, 'items') / med(rs, 'items'):.1f}x",
                           f"{med(rs, 'search_items'):.0f}", f"{med(ref, 'search_items') / med(rs, 'search_items'):.1f}x",
                           f"{med(rs, 'wall'):.0f}", f"{med(rs, 'dev'):.3f}", f"{med(rs, 'test'):.3f}",
                           f"{med(rs, 'test') - med(ref, 'test'):+.3f}", f"{q[0]:.3f}-{q[1]:.3f}",
                           f"{tests[0]:.3f}-{tests[-1]:.3f}"])
    loads = [r["load"] for r in runs]
    src = next((r for r in rows if r["kind"] == "sources"), None)
    title = (f"CMA-ES on the zoo, {len(common)} seeds (medians); load average (1/5/15 min) from {loads[0]} to "
             f"{loads[-1]}" + (f"; the sources' one-off scoring took {src['wall']:.0f} s" if src else ""))
    table = Table(title, ["fitness", "item-evals", "fewer", "search items", "fewer", "wall s", "winner dev",
                          "winner test", "vs full-dev", "test IQR", "test range"], table_rows)
    table.print()
    if markdown:
        print(table.markdown())
    sp = [r["spearman"] for r in ref if "spearman" in r]
    if sp:
        tasks = list(sp[0])
        cols = [k for k in sp[0][tasks[0]] if k != "n"]
        srows = [[t, str(sum(s[t]["n"] for s in sp))] + [f"{statistics.median(s[t][c] for s in sp):.3f}" for c in cols]
                 for t in tasks]
        st = Table(f"Spearman with the full-dev metric over every candidate of the full-dev searches, per task "
                   f"(median over {len(sp)} seeds); mae: mean absolute error", ["task", "candidates", *cols], srows)
        st.print()
        if markdown:
            print(st.markdown())
    irt_row = by.get("irt")
    if irt_row:
        n_rand = next(v for v in by if v.startswith("random-"))
        gap = med(irt_row, "test") - med(ref, "test")
        ratio = med(ref, "items") / med(irt_row, "items")
        sratio = med(ref, "search_items") / med(irt_row, "search_items")
        vs_rand = med(irt_row, "test") - med(by[n_rand], "test")
        ok = gap >= -0.01 and ratio >= 20 and vs_rand > 0
        print(f"acceptance: IRT's median winner {gap:+.3f} vs full-dev on test (needs >= -0.01), {ratio:.1f}x fewer "
              f"item-evaluations in all ({sratio:.1f}x by candidates; needs >= 20), {vs_rand:+.3f} vs {n_rand} "
              f"(needs > 0): {'PASS' if ok else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "evomerge" / "zoo" / cache_key(ZooParams()))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=25, help="IRT anchors per task (and random-N's N)")
    ap.add_argument("--matched", type=int, default=100, help="random-M's M: about IRT's total item budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=2, help="candidates re-scored on the full dev split")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 generation, popsize 4, top-1")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines, one per run (default: a temporary file)")
    ap.add_argument("--report", type=Path, default=None, help="print the table of an --out file and exit")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.markdown)
        return 0
    if args.quick:
        args.seeds, args.generations, args.popsize, args.top_k = 1, 1, 4, 1
    if args.out is None:
        args.out = Path(tempfile.mkstemp(prefix="bench_fitness_", suffix=".jsonl")[1])
    run(args)
    report(args.out, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
