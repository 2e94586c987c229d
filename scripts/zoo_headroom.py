"""Does the zoo leave room for a search? A small CMA-ES over task-arithmetic weights.

pycma directly (no evomerge search machinery): one weight per specialist per layer group
(embeddings, each pair of layers, final norm + lm_head), fitness = mean dev accuracy over the zoo
tasks, about 150 evaluations. The winner is scored on the test split and printed beside the zoo
table (every zoo model and the plain merges). The zoo passes when the winner's mean is at least
0.05 above the best specialist's and above every plain merge.

    python scripts/zoo_headroom.py --zoo artifacts/zoo [--evals 150] [--seed 0] [--quick]
    python scripts/zoo_headroom.py --zoo artifacts/zoo --table-only --markdown   # the README's zoo table
    python scripts/zoo_headroom.py --table-only --rows SLERP,NuSLERP,"model stock"   # some rows only
    python scripts/zoo_headroom.py --table-only --gen --rows base,spec   # generation-task rows

The table's rows: the zoo models, the plain merges (uniform average, task arithmetic, TIES, DARE)
and the spherical/geometric methods (SLERP of spec_rev and spec_sub, NuSLERP of their task
vectors, model stock, SCE, the Karcher mean; TSV-Merge, Iso-C and Iso-CTS); `--rows` scores only the rows whose names start
with one of the given prefixes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import cma  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.evaluator import LmEvalEvaluator  # noqa: E402
from evomerge.evaluation.report import results_table  # noqa: E402
from evomerge.models.folders import load_causal_lm, load_tokenizer  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402
from evomerge.zoo.table import plain_merge_recipes, zoo_scores  # noqa: E402


def layer_group(name: str, n_layers: int, group_size: int) -> int:
    """0: embeddings; 1..: layers in groups of ``group_size``; last: final norm and lm_head."""
    if ".layers." in name:
        return 1 + int(name.split(".layers.")[1].split(".")[0]) // group_size
    if "embed" in name:
        return 0
    return 1 + (n_layers + group_size - 1) // group_size


class InPlaceTaskArithmetic:
    """Writes base + sum_i w[i, group] * (spec_i - base) into one model, in place."""

    def __init__(self, zoo_dir: Path, group_size: int = 2):
        m = read_manifest(zoo_dir)
        self.model = load_causal_lm(zoo_dir / m["base"])
        self.tok = load_tokenizer(zoo_dir / m["base"])
        n_layers = self.model.config.num_hidden_layers
        self.n_groups = 2 + (n_layers + group_size - 1) // group_size
        self.n_sources = len(m["specialists"])
        base = {k: v.clone() for k, v in self.model.state_dict().items()}
        specs = [load_causal_lm(zoo_dir / m["models"][s]["path"]).state_dict() for s in m["specialists"]]
        self.base = base
        self.deltas = {k: torch.stack([sd[k] - base[k] for sd in specs]) for k in base}
        self.group = {k: layer_group(k, n_layers, group_size) for k in base}

    @torch.no_grad()
    def build(self, weights: np.ndarray) -> torch.nn.Module:
        w = torch.as_tensor(weights.reshape(self.n_sources, self.n_groups), dtype=torch.float32)
        params = dict(self.model.named_parameters())
        for k, delta in self.deltas.items():
            coeff = w[:, self.group[k]].reshape(-1, *([1] * (delta.dim() - 1)))
            params[k].copy_(self.base[k] + (coeff * delta).sum(0))
        return self.model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--evals", type=int, default=150, help="CMA-ES evaluation budget (default 150)")
    ap.add_argument("--popsize", type=int, default=10)
    ap.add_argument("--sigma", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev-limit", type=int, default=200, help="dev items per task for the fitness")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="40 evaluations, 100 dev items: a smoke run")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--gen", action="store_true", help="with --table-only: the generation variants of the "
                    "zoo tasks (zoo_*_gen, exact_match of greedy answers) instead of the loglikelihood tasks")
    ap.add_argument("--table-only", action="store_true", help="only the zoo table (zoo models and plain merges, "
                    "test split), no search: about a minute")
    ap.add_argument("--rows", default=None, help="with --table-only: comma-separated prefixes of "
                    "the rows to score (e.g. SLERP,model stock); default: every row")
    args = ap.parse_args()
    if args.quick:
        args.evals, args.dev_limit = 40, 100
    quiet_libraries()
    torch.set_num_threads(args.threads)
    build_zoo(args.zoo, ZooParams())
    tasks = list(read_manifest(args.zoo)["tasks"].values())
    if args.table_only:
        rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
        ev = (LmEvalEvaluator([f"{t}_gen" for t in tasks], split="test", batch_size=64) if args.gen else None)
        table = results_table(zoo_scores(args.zoo, batch_size=64, rows=rows, evaluator=ev),
                              title="zoo table, test split" + (", generation tasks" if args.gen else ""))
        table.print()
        if args.markdown:
            print(table.markdown())
        return 0

    merger = InPlaceTaskArithmetic(args.zoo)
    dev = LmEvalEvaluator(tasks, split="dev", batch_size=64)
    n = merger.n_sources * merger.n_groups
    # pycma's randn defaults to NumPy's global generator (seeded through it): give it its own.
    rng = np.random.default_rng(args.seed)
    es = cma.CMAEvolutionStrategy(
        [1.0] * n, args.sigma,
        {"popsize": args.popsize, "bounds": [0.0, 2.5], "verbose": -9,
         "randn": lambda *shape: rng.standard_normal(shape)},
    )
    best_f, best_x, spent, t0 = -1.0, None, 0, time.perf_counter()
    while spent < args.evals:
        xs = es.ask()
        fs = []
        for x in xs:
            res = dev.evaluate(merger.build(np.asarray(x)), merger.tok, limit=args.dev_limit)
            f = float(np.mean([r.metrics["acc"] for r in res.values()]))
            fs.append(-f)  # pycma minimizes
            spent += 1
            if f > best_f:
                best_f, best_x = f, np.array(x)
        es.tell(xs, fs)
        print(f"  {spent:4d} evaluations  best dev {best_f:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    test = LmEvalEvaluator(tasks, split="test", batch_size=64)
    scores = zoo_scores(args.zoo, evaluator=test)
    scores["CMA-ES task arithmetic (winner)"] = test.evaluate(merger.build(best_x), merger.tok)
    table = results_table(scores, title=f"test split, {spent} CMA-ES evaluations, seed {args.seed}")
    print("\nwinner weights (rows: specialists; columns: embeddings, layer groups, final norm + lm_head):")
    print(np.round(np.clip(best_x, 0, 2.5).reshape(merger.n_sources, merger.n_groups), 2))
    table.print()
    if args.markdown:
        print(table.markdown())

    def mean(name):
        return float(np.mean([r.metrics["acc"] for r in scores[name].values()]))

    winner = mean("CMA-ES task arithmetic (winner)")
    manifest = read_manifest(args.zoo)
    best_spec = max(manifest["specialists"], key=mean)
    plain = [k for k in plain_merge_recipes(args.zoo) if k in scores]  # the criterion's merges
    best_plain = max(plain, key=mean)
    ok_spec = winner >= mean(best_spec) + 0.05
    ok_plain = winner > mean(best_plain)
    print(f"winner mean {winner:.3f}; best specialist {best_spec} {mean(best_spec):.3f} "
          f"(margin {winner - mean(best_spec):+.3f}, needs >= +0.050): {'PASS' if ok_spec else 'FAIL'}")
    print(f"best plain merge {best_plain} {mean(best_plain):.3f} "
          f"(margin {winner - mean(best_plain):+.3f}, needs > 0): {'PASS' if ok_plain else 'FAIL'}")
    return 0 if (ok_spec and ok_plain) else 1


if __name__ == "__main__":
    sys.exit(main())
