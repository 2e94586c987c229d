"""Does the search work, seed after seed? A search config on the zoo with several seeds.

For each seed: `evomerge search` with the config (configs/zoo_ps.yaml unless --config; its run
folder resumed if present), then the winner on the test split beside the base, every specialist,
the uniform average and default TIES. The table gives, per seed, the winner's test score per skill,
their mean, its lowest skill against the base's score on that skill, the item-evaluations the search
spent (every item scored: the starting point, the candidates, the re-scores and, with base floors,
the base's measurement) and the search's wall time (this session's; a resumed run says so).

Checks (exit status): best dev fitness >= starting point + 0.05 for every seed, and each evolved
merge beats every specialist, the uniform average and default TIES on the combined test fitness;
with --goal MEAN also: the median of the winners' test means >= MEAN and no skill of any winner
below the base's. Decisions about configs belong on dev: the test columns are for reporting.

    python scripts/search_seeds.py [--zoo artifacts/zoo] [--config configs/zoo_quality.yaml]
                                   [--seeds 0 1 2] [--quick] [--goal 0.80]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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
from evomerge.runs.folder import RunFolder  # noqa: E402
from evomerge.runs.start import run_search  # noqa: E402
from evomerge.search.config import SearchConfig  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402
from evomerge.zoo.table import merged_model, plain_merge_recipes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WALL = "search_seeds_wall.json"  # the wall time of the session that ran the search


def item_evaluations(run_dir: Path, cfg: SearchConfig, dev_sizes: dict[str, int]) -> int:
    """Every item the search scored: its log's records, plus the floors' base measurement."""
    records = RunFolder.open(run_dir).records()
    n = sum(sum((getattr(r, "items_scored", None) or {}).values()) for r in records
            if r.type in ("reference", "candidate", "rescore"))
    if cfg.floors is not None and cfg.floors.base:
        n += sum(dev_sizes[t.name] for t in cfg.tasks)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--zoo-seed", type=int, default=0, help="the seed the zoo was built with "
                    "(`evomerge zoo --seed N`): the same config on another zoo")
    ap.add_argument("--config", type=Path, default=REPO / "configs/zoo_ps.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("artifacts/runs"))
    ap.add_argument("--quick", action="store_true", help="4 generations, 100 dev items per task")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    ap.add_argument("--goal", type=float, default=None, help="also check: median winner test mean "
                    ">= GOAL and no winner's skill below the base's")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    build_zoo(args.zoo, ZooParams(seed=args.zoo_seed))
    manifest = read_manifest(args.zoo)
    base = load_causal_lm(args.zoo / manifest["base"])
    tok = load_tokenizer(args.zoo / manifest["base"])

    raw = yaml.safe_load(args.config.read_text())
    raw["models"] = [str(args.zoo / manifest["models"][s]["path"]) for s in manifest["specialists"]]
    raw["base_model"] = str(args.zoo / manifest["base"])
    if args.threads:
        raw["threads"] = args.threads
    torch.set_num_threads(raw.get("threads") or torch.get_num_threads())
    if args.quick:
        raw["budget"] = {"generations": 4}
        for t in raw["tasks"]:
            if t.get("limit"):
                t["limit"] = 100
    tasks = [t["name"] for t in raw["tasks"]]
    weights = {t["name"]: t.get("weight", 1.0) for t in raw["tasks"]}
    test = LmEvalEvaluator(tasks, split="test", batch_size=raw.get("batch_size", 32))
    dev_sizes = {t: LmEvalEvaluator([t], split="dev", batch_size=32).n_docs(t) for t in tasks}

    def combined(res) -> float:
        return sum(weights[t] * res[t].metrics["acc"] for t in tasks)

    def acc(res, t) -> float:
        return res[t].metrics["acc"]

    rows: dict[str, dict] = {"base": test.evaluate(base, tok)}
    base_acc = {t: acc(rows["base"], t) for t in tasks}
    for name in manifest["specialists"]:
        rows[name] = test.evaluate(load_causal_lm(args.zoo / manifest["models"][name]["path"]), tok)
    plain = plain_merge_recipes(args.zoo)
    for name in ("uniform average", "TIES w=1 d=0.5"):
        rows[name] = test.evaluate(merged_model(plain[name], load_causal_lm(args.zoo / manifest["base"])), tok)
    baselines = {k: combined(v) for k, v in rows.items() if k != "base"}

    seed_rows, means, ok, floors_ok = [], [], True, True
    for seed in args.seeds:
        zoo_tag = f"_zoo{args.zoo_seed}" if args.zoo_seed else ""
        run_dir = args.runs / f"{args.config.stem}{zoo_tag}{'_quick' if args.quick else ''}_seed{seed}"
        cfg = SearchConfig.from_dict(dict(raw, seed=seed, run_dir=str(run_dir)))
        resume = (run_dir / "config.yaml").is_file()
        print(f"seed {seed}: {'resuming' if resume else 'running'} {run_dir}", flush=True)
        t0 = time.perf_counter()
        out = run_search(None if resume else cfg, run_dir=run_dir, resume=resume, quiet=True)
        if not resume:
            (run_dir / WALL).write_text(json.dumps({"wall_s": time.perf_counter() - t0,
                                                    "load": os.getloadavg()[0]}))
        wall = json.loads((run_dir / WALL).read_text()) if (run_dir / WALL).is_file() else None
        res = test.evaluate(merged_model(yaml.safe_load(out.best_recipe.to_yaml()),
                                         load_causal_lm(args.zoo / manifest["base"])), tok)
        rows[f"evolved, seed {seed}"] = res
        gain = out.best_fitness - out.reference_fitness
        beats = combined(res) > max(baselines.values())
        mean = sum(acc(res, t) for t in tasks) / len(tasks)
        means.append(mean)
        low = min(tasks, key=lambda t: acc(res, t) - base_acc[t])
        margin = acc(res, low) - base_acc[low]
        floors_ok &= margin >= 0
        ok &= gain >= 0.05 and beats
        seed_rows.append([str(seed), f"{out.reference_fitness:.3f}", f"{out.best_fitness:.3f}",
                          *(f"{acc(res, t):.3f}" for t in tasks), f"{mean:.3f}",
                          f"{low} {margin:+.3f}", str(item_evaluations(run_dir, cfg, dev_sizes)),
                          f"{wall['wall_s']:.0f} (load {wall['load']:.1f})" if wall else "-",
                          "yes" if beats else "NO"])

    cols = ["seed", "dev start", "dev best", *(f"test {t}" for t in tasks), "test mean",
            "lowest skill vs base (test)", "item-evaluations", "wall s", "beats all baselines"]
    dev = Table(f"{args.config.name}: dev fitness (full dev split) and the winner on test", cols,
                seed_rows)
    test_rows = [[k, *(f"{acc(v, t):.3f}" for t in tasks), f"{combined(v):.3f}"] for k, v in rows.items()]
    test_table = Table("test split (500 items per task)", ["model", *tasks, "fitness"], test_rows)
    dev.print()
    test_table.print()
    if args.markdown:
        print(dev.markdown() + "\n\n" + test_table.markdown())
    median = statistics.median(means)
    print(f"median winner test mean {median:.3f}; every skill of every winner >= the base's: "
          f"{'yes' if floors_ok else 'NO'}")
    if args.goal is not None:
        ok &= median >= args.goal and floors_ok
    print("PASS" if ok else "FAIL", "(gain >= 0.05 for every seed, every winner beats every baseline on test"
          + (f", median test mean >= {args.goal}, no skill below the base's)" if args.goal is not None else ")"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
