"""Does the search work, seed after seed? CMA-ES on the zoo with several seeds.

For each seed: `evomerge search` with configs/zoo_ps.yaml (its run folder resumed if present),
then the winner on the test split beside every specialist, the uniform average and default TIES
(weight 1, density 0.5). Checks: best dev fitness >= starting point + 0.05 for every seed, and each
evolved merge beats every specialist, the uniform average and default TIES on the combined
test-split fitness.

    python scripts/search_seeds.py [--zoo artifacts/zoo] [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
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
from evomerge.zoo.table import merged_model, plain_merge_recipes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--config", type=Path, default=REPO / "configs/zoo_ps.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("artifacts/runs"))
    ap.add_argument("--quick", action="store_true", help="4 generations, 100 dev items per task")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    build_zoo(args.zoo, ZooParams())
    manifest = read_manifest(args.zoo)
    base = load_causal_lm(args.zoo / manifest["base"])
    tok = load_tokenizer(args.zoo / manifest["base"])

    raw = yaml.safe_load(args.config.read_text())
    raw["models"] = [str(args.zoo / manifest["models"][s]["path"]) for s in manifest["specialists"]]
    raw["base_model"] = str(args.zoo / manifest["base"])
    if args.threads:
        raw["threads"] = args.threads
        torch.set_num_threads(args.threads)
    if args.quick:
        raw["budget"] = {"generations": 4}
        for t in raw["tasks"]:
            t["limit"] = 100
    tasks = [t["name"] for t in raw["tasks"]]
    weights = {t["name"]: t.get("weight", 1.0) for t in raw["tasks"]}
    test = LmEvalEvaluator(tasks, split="test", batch_size=raw.get("batch_size", 32))

    def combined(res) -> float:
        return sum(weights[t] * res[t].metrics["acc"] for t in tasks)

    rows: dict[str, dict] = {}
    for name in manifest["specialists"]:
        rows[name] = test.evaluate(load_causal_lm(args.zoo / manifest["models"][name]["path"]), tok)
    plain = plain_merge_recipes(args.zoo)
    for name in ("uniform average", "TIES w=1 d=0.5"):
        rows[name] = test.evaluate(merged_model(plain[name], base), tok)
    baselines = {k: combined(v) for k, v in rows.items()}

    seed_rows, ok = [], True
    for seed in args.seeds:
        run_dir = args.runs / f"{args.config.stem}{'_quick' if args.quick else ''}_seed{seed}"
        cfg = SearchConfig.from_dict(dict(raw, seed=seed, run_dir=str(run_dir)))
        resume = (run_dir / "config.yaml").is_file()
        print(f"seed {seed}: {'resuming' if resume else 'running'} {run_dir}", flush=True)
        out = run_search(None if resume else cfg, run_dir=run_dir, resume=resume, quiet=True)
        res = test.evaluate(merged_model(yaml.safe_load(out.best_recipe.to_yaml()), base), tok)
        rows[f"evolved, seed {seed}"] = res
        gain = out.best_fitness - out.reference_fitness
        beats = combined(res) > max(baselines.values())
        ok &= gain >= 0.05 and beats
        seed_rows.append([str(seed), f"{out.reference_fitness:.3f}", f"{out.best_fitness:.3f}", f"{gain:+.3f}",
                          str(out.evaluations), f"{combined(res):.3f}", "yes" if beats else "NO"])

    dev = Table("dev fitness (full dev split) and test", ["seed", "start", "best", "gain", "evaluations",
                                                           "test fitness", "beats all baselines"], seed_rows)
    cols = ["model", *tasks, "fitness"]
    test_rows = [[k, *(f"{v[t].metrics['acc']:.3f}" for t in tasks), f"{combined(v):.3f}"] for k, v in rows.items()]
    test_table = Table("test split (500 items per task)", cols, test_rows)
    dev.print()
    test_table.print()
    if args.markdown:
        print(dev.markdown() + "\n\n" + test_table.markdown())
    print("PASS" if ok else "FAIL", "(gain >= 0.05 for every seed, every winner beats every baseline on test)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
