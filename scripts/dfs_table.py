"""The spec / PS / DFS / PS+DFS table on the zoo (docs/dataflow.md): runs (or resumes) the DFS and
the PS+DFS searches, builds each winner with `evomerge merge`, and scores it on the dev and the
held-out test split (the searches saw only dev).

    python scripts/dfs_table.py [--case zoo|blocks] [--zoo artifacts/zoo] [--runs runs] [--generations N]

`--case zoo`: spec_rev and spec_sub (configs/zoo_dfs.yaml, zoo_ps_dfs.yaml; about 5 minutes on
2 cores). `--case blocks`: the block-expanded specialists (`evomerge zoo --blocks`;
configs/blocks_dfs.yaml, blocks_ps_dfs.yaml; about 10 minutes). The PS row is the PS+DFS run's
first stage.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Case:
    dfs_config: str  # configs/<name>.yaml: DFS alone
    ps_dfs_config: str  # configs/<name>.yaml: stages ps, dfs
    tasks: tuple[str, ...]
    specialists: tuple[str, ...]  # folders under the zoo; the first is model A
    ps_label: str
    dfs_label: str
    ps_dfs_label: str


CASES = {
    "zoo": Case("zoo_dfs", "zoo_ps_dfs", ("zoo_rev", "zoo_sub"), ("spec_rev", "spec_sub"),
                "PS (task arithmetic)", "DFS (spec_rev, spec_sub)", "PS+DFS (PS winner, spec_sub)"),
    "blocks": Case("blocks_dfs", "blocks_ps_dfs", ("zoo_add", "zoo_rev", "zoo_sub"),
                   ("blocks/spec_add", "blocks/spec_rev", "blocks/spec_sub"),
                   "PS (task arithmetic, per layer)", "DFS (the three specialists)",
                   "PS+DFS (PS winner, spec_add, spec_sub)"),
}


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
    return next(r for r in reversed(RunFolder.open(run_dir).records()) if r.type == "final").fitness


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="zoo")
    ap.add_argument("--zoo", type=Path, default=REPO / "artifacts" / "zoo")
    ap.add_argument("--runs", type=Path, default=REPO / "runs")
    ap.add_argument("--generations", type=int, default=None, help="override every stage's budget")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    case = CASES[args.case]
    zoo, runs = args.zoo.resolve(), args.runs.resolve()
    for name in (case.dfs_config, case.ps_dfs_config):
        cfg = localized(REPO / "configs" / f"{name}.yaml", zoo, runs, args.generations)
        search(cfg, runs / name)
    rows: dict[str, tuple[float | None, Path]] = {}
    for i, spec in enumerate(case.specialists):
        rows[spec + (" (model A)" if i == 0 else "")] = (None, zoo / spec)
    ps_dfs = runs / case.ps_dfs_config
    rows[case.ps_label] = (final_dev(ps_dfs / "stages" / "ps"), ps_dfs / "models" / "ps")
    rows[case.dfs_label] = (final_dev(runs / case.dfs_config), runs / case.dfs_config / "best.yaml")
    rows[case.ps_dfs_label] = (final_dev(ps_dfs / "stages" / "dfs"), ps_dfs / "best.yaml")

    tasks = list(case.tasks)
    test = LmEvalEvaluator(tasks, split="test", batch_size=64)
    dev = LmEvalEvaluator(tasks, split="dev", batch_size=64)
    tok = load_tokenizer(zoo / "base")
    short = [t.removeprefix("zoo_") for t in tasks]
    print("\n| model | dev fitness (search) | " + " | ".join(f"dev {s}" for s in short) + " | "
          + " | ".join(f"test {s}" for s in short) + " | test mean |")
    print("|---|---|" + "---|" * (2 * len(tasks) + 1))
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
        cells = [f"{d[x]:.3f}" for x in tasks] + [f"{t[x]:.3f}" for x in tasks]
        print(f"| {label} | {fit} | " + " | ".join(cells) + f" | {sum(t.values()) / len(t):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
