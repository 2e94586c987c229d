"""The PS / DFS / PS+DFS table on the zoo (docs/dataflow.md): runs (or resumes) the two searches,
builds each winner with `evomerge merge`, and scores it on the held-out test split.

    python scripts/dfs_table.py [--zoo artifacts/zoo] [--runs runs] [--generations N]

The PS row is the PS+DFS run's first stage. About 5 minutes on 2 cores with the configs' budgets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.cli.main import main as evomerge  # noqa: E402
from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.evaluator import LmEvalEvaluator  # noqa: E402
from evomerge.models.folders import load_causal_lm, load_tokenizer  # noqa: E402
from evomerge.runs.folder import RunFolder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = ["zoo_rev", "zoo_sub"]


def localized(config: Path, zoo: Path, runs: Path, generations: int | None) -> Path:
    data = yaml.safe_load(config.read_text().replace("artifacts/zoo", str(zoo)))
    data["run_dir"] = str(runs / config.stem)
    for d in data.get("stages", [data]):
        if generations:
            d["budget"] = {"generations": generations}
    out = Path(tempfile.mkdtemp()) / config.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def search(config: Path, run_dir: Path) -> None:
    args = ["search", "--resume", str(run_dir), str(config)] if run_dir.is_dir() else ["search", str(config)]
    if evomerge([*args, "--quiet"]) != 0:
        raise SystemExit(f"search {config} failed")


def final_dev(run_dir: Path) -> float:
    return next(r for r in reversed(RunFolder.open(run_dir).records()) if r["type"] == "final")["fitness"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / "artifacts" / "zoo")
    ap.add_argument("--runs", type=Path, default=REPO / "runs")
    ap.add_argument("--generations", type=int, default=None, help="override every stage's budget")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    zoo, runs = args.zoo.resolve(), args.runs.resolve()
    rows: dict[str, tuple[float | None, Path]] = {}
    for name in ("zoo_dfs", "zoo_ps_dfs"):
        cfg = localized(REPO / "configs" / f"{name}.yaml", zoo, runs, args.generations)
        search(cfg, runs / name)
    rows["spec_rev (model A)"] = (None, zoo / "spec_rev")
    rows["spec_sub"] = (None, zoo / "spec_sub")
    rows["PS (task arithmetic)"] = (final_dev(runs / "zoo_ps_dfs" / "stages" / "ps"), runs / "zoo_ps_dfs" / "models" / "ps")
    rows["DFS (spec_rev, spec_sub)"] = (final_dev(runs / "zoo_dfs"), runs / "zoo_dfs" / "best.yaml")
    rows["PS+DFS (PS winner, spec_sub)"] = (final_dev(runs / "zoo_ps_dfs" / "stages" / "dfs"), runs / "zoo_ps_dfs" / "best.yaml")

    test = LmEvalEvaluator(TASKS, split="test", batch_size=64)
    dev = LmEvalEvaluator(TASKS, split="dev", batch_size=64)
    tok = load_tokenizer(zoo / "base")
    print("\n| model | dev fitness (search) | dev rev | dev sub | test rev | test sub | test fitness |")
    print("|---|---|---|---|---|---|---|")
    for label, (dev_fit, source) in rows.items():
        folder = source
        if source.suffix == ".yaml":  # build the exported recipe as a user would
            folder = source.parent / "model"
            if not folder.is_dir() and evomerge(["merge", str(source), str(folder)]) != 0:
                raise SystemExit(f"evomerge merge {source} failed")
        model = load_causal_lm(folder)
        d = {t: r.metrics["acc"] for t, r in dev.evaluate(model, tok).items()}
        t = {t: r.metrics["acc"] for t, r in test.evaluate(model, tok).items()}
        fit = "-" if dev_fit is None else f"{dev_fit:.3f}"
        print(f"| {label} | {fit} | {d['zoo_rev']:.3f} | {d['zoo_sub']:.3f} | {t['zoo_rev']:.3f} | "
              f"{t['zoo_sub']:.3f} | {(t['zoo_rev'] + t['zoo_sub']) / 2:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
