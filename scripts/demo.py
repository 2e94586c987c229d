"""`make demo`: the whole story on the offline zoo, in a few minutes on 2 cores.

1. builds the model zoo (cached); 2. runs (or resumes) an evolutionary search over the
specialists' task-arithmetic weights (configs/demo.yaml); 3. `evomerge status` with its fitness
plot; 4. `evomerge export` in mergekit format; 5. `evomerge materialize` of the winner; 6. the
materialized folder scored by lm-eval's own CLI; 7. a closing table on the held-out test split:
the specialists, plain merges and the evolved winner.

    python scripts/demo.py [--zoo artifacts/zoo] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from evomerge.cli.main import main as evomerge  # noqa: E402
from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.evaluator import LmEvalEvaluator, TaskResult  # noqa: E402
from evomerge.evaluation.report import results_table  # noqa: E402
from evomerge.models.folders import load_causal_lm, load_tokenizer  # noqa: E402
from evomerge.search.config import SearchConfig  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo, read_manifest  # noqa: E402
from evomerge.zoo.table import merged_model, plain_merge_recipes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = 7


def step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)


def run(argv: list[str]) -> None:
    print("$ evomerge " + " ".join(argv), flush=True)
    if evomerge(argv) != 0:
        raise SystemExit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/demo_winner"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.chdir(REPO)  # the demo config names models relative to the repository
    quiet_libraries()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    step(1, f"model zoo -> {args.zoo}")
    build_zoo(args.zoo, ZooParams())

    cfg = SearchConfig.load(args.config)
    run_dir = Path(cfg.run_dir)
    step(2, "search")
    run(["search", "--resume", str(run_dir), "--quiet"] if (run_dir / "config.yaml").is_file()
        else ["search", str(args.config), "--quiet"])

    step(3, "status and fitness plot")
    run(["status", str(run_dir)])

    step(4, "export the winner for mergekit")
    run(["export", str(run_dir), "--format", "mergekit", "--out", str(run_dir / "winner.mergekit.yml"), "--force"])

    step(5, "materialize the winner as a Hugging Face folder")
    run(["materialize", str(run_dir), "--out", str(args.out), "--force"])

    manifest = read_manifest(args.zoo)
    tasks = list(manifest["tasks"].values())
    step(6, "score the materialized folder with lm-eval's own CLI")
    lm_out = run_dir / "lm_eval_winner"
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={args.out},dtype={cfg.dtype}",
           "--include_path", "evals", "--tasks", ",".join(tasks), "--device", "cpu",
           "--batch_size", str(cfg.batch_size), "--output_path", str(lm_out)]
    print("$ " + " ".join(cmd), flush=True)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    subprocess.run([str(lm_eval), *cmd[1:]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    newest = max(lm_out.rglob("results*.json"), key=lambda p: p.stat().st_mtime)
    lm_results = json.loads(newest.read_text())["results"]

    step(7, "the held-out test split (lm-eval, float32)")
    test = LmEvalEvaluator(tasks, split="test", batch_size=cfg.batch_size)
    tok = load_tokenizer(args.zoo / manifest["base"])
    scores = {name: test.evaluate(load_causal_lm(args.zoo / manifest["models"][name]["path"]), tok)
              for name in ("base", *manifest["specialists"])}
    base = load_causal_lm(args.zoo / manifest["base"])
    plain = plain_merge_recipes(args.zoo)
    for name in ("uniform average", "task arithmetic w=0.7", "TIES w=1 d=0.5"):
        scores[name] = test.evaluate(merged_model(plain[name], base), tok)
    scores["evolved (lm_eval CLI on the materialized folder)"] = {
        t: TaskResult(t, {"acc": lm_results[t]["acc,none"]}, -1) for t in tasks}
    results_table(scores, title=f"test split, acc ({time.perf_counter() - t0:.0f} s in all)").print()
    print(f"winner recipe: {run_dir / 'best.yaml'}  mergekit: {run_dir / 'winner.mergekit.yml'}  "
          f"model: {args.out}  plot: {run_dir / 'fitness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
