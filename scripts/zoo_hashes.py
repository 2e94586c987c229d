"""Builds the zoo in separate processes with different thread counts, one of them with torch
imported unpinned (the build then trains in a pinned child), and compares the weights' sha256 with
each other and with tests/golden/zoo_hashes.json (#33: one zoo per key on every x86-64 machine).

    python scripts/zoo_hashes.py                      # the default zoo (the tests' and the demo's)
    python scripts/zoo_hashes.py --tiny               # the unit tests' tiny zoo
    python scripts/zoo_hashes.py --write              # record the hashes as the committed ones
    python scripts/zoo_hashes.py --out ~/.cache/evomerge/zoo/KEY   # the first build goes there

The builds run at the same time (each trains on one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "zoo_hashes.json"
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")
BUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))   # the caller's thread count: the build must not depend on it
from evomerge.zoo.build import ZooParams, build_zoo, cache_key
from evomerge.zoo.train import ModelShape
p = ZooParams(shape=ModelShape(layers=2, hidden=32, intermediate=64, heads=2), base_steps=40, spec_max_steps=30,
              val_items=40) if sys.argv[3] == "tiny" else ZooParams()
build_zoo(sys.argv[1], p, log=lambda m: print(f"[{sys.argv[2]} threads] {m}", flush=True))
print("KEY", cache_key(p))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the hashes to tests/golden/zoo_hashes.json")
    ap.add_argument("--out", type=Path, help="the first build's folder (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zoo-hashes-"))
    outs = [args.out or tmp / "a", tmp / "b"]
    # build a: 1 thread, the pins in its environment (trains in process); b: 2 threads, torch
    # imported without the pins (trains in a pinned child process)
    env_a = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    env_b = {k: v for k, v in os.environ.items() if k not in PINS}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(out), threads, "tiny" if args.tiny else "default"],
                              env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
             for out, threads, env in ((outs[0], "1", env_a), (outs[1], "2", env_b))]
    keys = []
    for p in procs:
        out, _ = p.communicate()
        print(out, end="")
        if p.returncode:
            return p.returncode
        keys.append(out.split("KEY ")[-1].strip())
    assert keys[0] == keys[1], keys
    key = keys[0]
    hashes = [json.loads((o / "zoo.json").read_text())["weights_sha256"] for o in outs]
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    print(f"\nkey {key}, two builds in {time.perf_counter() - t0:.0f} s (at the same time)")
    print("| file | sha256 (1 thread, in process) | 2 threads, pinned child | committed |")
    print("|---|---|---|---|")
    for f in sorted(hashes[0]):
        c = golden.get(key, {}).get("weights_sha256", {}).get(f, "-")
        print(f"| {f} | {hashes[0][f][:16]} | {hashes[1].get(f, '-')[:16]} | {c[:16]} |")
    same = hashes[0] == hashes[1]
    print(f"the two builds {'agree' if same else 'DIFFER'}")
    if args.write and same:
        golden[key] = {"zoo": "tiny" if args.tiny else "default", "weights_sha256": hashes[0]}
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        print(f"written to {GOLDEN}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
