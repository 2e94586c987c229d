"""`make demo`: builds the zoo, then scores every zoo model and the plain merges on every zoo task.

Later stages (search, export, a materialized winner) are added here as evomerge grows.

    python scripts/demo.py [--zoo artifacts/zoo] [--split test]
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
from evomerge.report import results_table  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo  # noqa: E402
from evomerge.zoo.table import zoo_scores  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    _quiet_libraries()
    torch.set_num_threads(args.threads)

    print(f"[1/2] model zoo -> {args.zoo}")
    build_zoo(args.zoo, ZooParams(threads=args.threads))
    print(f"[2/2] scoring the zoo and plain merges on the {args.split} split (lm-eval, float32, batch 64)")
    t0 = time.perf_counter()
    scores = zoo_scores(args.zoo, split=args.split)
    results_table(scores, title=f"zoo: acc on the {args.split} split ({time.perf_counter() - t0:.0f} s)").print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
