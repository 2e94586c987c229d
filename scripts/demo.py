"""`make demo`: the whole story on the offline zoo, in a few minutes on 2 cores.

1. builds the model zoo (cached), 2. runs (or resumes) an evolutionary search over the
specialists' task-arithmetic weights (configs/demo.yaml), 3. materializes the winner with
`evomerge merge`, 4. scores the specialists, the plain merges and the materialized winner on the
held-out test split, and prints the table.

    python scripts/demo.py [--zoo artifacts/zoo] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.cli import main as evomerge
from evomerge.config import SearchConfig  # noqa: E402
from evomerge.evaluate import LmEvalEvaluator, evaluate_model_dir  # noqa: E402
from evomerge.models import load_causal_lm, load_tokenizer  # noqa: E402
from evomerge.report import results_table  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402
from evomerge.zoo.table import merged_model, plain_merge_recipes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def step(n: int, text: str) -> None:
    print(f"\n[{n}/4] {text}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/demo_winner"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.chdir(REPO)  # the demo config names models relative to the repository
    _quiet_libraries()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    step(1, f"model zoo -> {args.zoo}")
    build_zoo(args.zoo, ZooParams(threads=args.threads))

    cfg = SearchConfig.load(args.config)
    run_dir = Path(cfg.run_dir)
    step(2, f"search: evomerge search {args.config} (run folder {run_dir})")
    argv = ["search", "--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else ["search", str(args.config)]
    if evomerge(argv) != 0:
        return 1

    step(3, f"materialize: evomerge merge {run_dir / 'best.yaml'} {args.out} --force")
    if evomerge(["merge", str(run_dir / "best.yaml"), str(args.out), "--force"]) != 0:
        return 1

    step(4, "scoring on the held-out test split (lm-eval, float32, batch 64)")
    manifest = read_manifest(args.zoo)
    tasks = list(manifest["tasks"].values())
    test = LmEvalEvaluator(tasks, split="test", batch_size=64)
    tok = load_tokenizer(args.zoo / manifest["base"])
    scores = {name: test.evaluate(load_causal_lm(args.zoo / manifest["models"][name]["path"]), tok)
              for name in ("base", *manifest["specialists"])}
    base = load_causal_lm(args.zoo / manifest["base"])
    plain = plain_merge_recipes(args.zoo)
    for name in ("uniform average", "task arithmetic w=0.7", "TIES w=1 d=0.5"):
        scores[name] = test.evaluate(merged_model(plain[name], base), tok)
    scores[f"evolved ({args.out})"] = evaluate_model_dir(args.out, tasks, split="test", batch_size=64)
    results_table(scores, title=f"test split, acc ({time.perf_counter() - t0:.0f} s in all)").print()
    print(f"winner recipe: {run_dir / 'best.yaml'}  mergekit: {run_dir / 'best.mergekit.yaml'}  model: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
