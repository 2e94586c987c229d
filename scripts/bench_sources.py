"""Driver memory with ``--sources object_store``: peak RSS with a 100 MB and a 1 GB synthetic source.

Each measurement runs in a fresh process (peak RSS cannot be reset): a local Ray (2 CPUs), then
a `RayExecutor` with one worker and ``sources="object_store"`` over three source folders, the
zoo's base and two specialists, one of which carries an extra synthetic shard (random bytes, in
a valid safetensors file) that makes it SIZE large; the worker copies every source into its local
folder, the executor is closed. Reported: the driver's peak RSS (VmHWM) after Ray started and at
the end, and the time the sources took to reach the worker. The worker gets a builder that loads
no weights: what is measured is the shipping, not the merge. For contrast, ``--whole`` also
measures the way it was done before (the driver reads each folder into memory and ray.puts it).

    python scripts/bench_sources.py              # 100 MB and 1 GB; about a minute on 2 cores
    python scripts/bench_sources.py --whole      # and the old whole-folder shipping, for contrast
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from synthetic_llama import write_safetensors_header  # noqa: E402

MB = 1 << 20


def write_shard(path: Path, size: int, piece: int = 64 * MB) -> None:
    """A safetensors file of ~``size`` bytes of random U8 tensors, written piece by piece."""
    n = max(1, size // piece)
    header, off = {}, 0
    for i in range(n):
        ln = piece if i < n - 1 else size - piece * (n - 1)
        header[f"pad.{i}"] = {"dtype": "U8", "shape": [ln], "data_offsets": [off, off + ln]}
        off += ln
    with open(path, "wb") as f:
        write_safetensors_header(f, header)
        for i in range(n):
            f.write(os.urandom(header[f"pad.{i}"]["data_offsets"][1] - header[f"pad.{i}"]["data_offsets"][0]))


def make_sources(zoo: Path, root: Path, size: int) -> dict:
    big = root / "spec_big"
    shutil.copytree(zoo / "spec_add", big)
    write_shard(big / "pad.safetensors", size)
    return {"models": [str(big), str(zoo / "spec_rev")], "base_model": str(zoo / "base"),
            "search_space": "ps_task_arithmetic", "tasks": [{"name": "zoo_rev", "metric": "acc", "limit": 4}],
            "threads": 1, "optimizer": {"name": "cma", "popsize": 2}, "budget": {"generations": 1}}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NoWeights:
    """A builder factory whose builder loads nothing (pickled by value: this is __main__)."""

    def __call__(self, cfg):
        return object()


def child(cfg_file: Path, whole: bool) -> dict:
    import ray

    from evomerge.execution.ray import RayExecutor, source_names
    from evomerge.search.config import SearchConfig

    cfg = SearchConfig.from_dict(json.loads(cfg_file.read_text()))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    started = peak_rss_mb()
    t0 = time.perf_counter()
    if whole:  # before: every file of every folder in the driver's memory, then into the object store
        refs = []
        for src in source_names(cfg):
            root = Path(src)
            refs.append(ray.put({str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}))
        del refs
    else:
        ex = RayExecutor(cfg, None, None, workers=1, threads=1, sources="object_store", builder_factory=NoWeights())
        ex.close()
    out = {"after_init_mb": started, "peak_mb": peak_rss_mb(), "ship_s": time.perf_counter() - t0}
    ray.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the tests' cached zoo)")
    ap.add_argument("--sizes", default="100,1000", help="synthetic shard sizes, MB")
    ap.add_argument("--whole", action="store_true", help="also measure the old whole-folder shipping")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-whole", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.child_whole)))
        return 0
    zoo = args.zoo
    if zoo is None:
        from evomerge.zoo.build import ZooParams, cache_key

        cache = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
        zoo = cache / "zoo" / cache_key(ZooParams())
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    try:
        for mb in (int(s) for s in args.sizes.split(",")):
            root = tmp / f"{mb}"
            root.mkdir()
            (root / "cfg.json").write_text(json.dumps(make_sources(zoo, root, mb * MB)))
            total = sum(p.stat().st_size for src in ("spec_big",) for p in (root / src).rglob("*") if p.is_file())
            for whole in ((False, True) if args.whole else (False,)):
                env = dict(os.environ, TMPDIR=str(root), PYTHONPATH=str(REPO))
                r = subprocess.run([sys.executable, __file__, "--child", str(root / "cfg.json"),
                                    *(["--child-whole"] if whole else [])], capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
                    return 1
                res = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append({"mb": mb, "source_mb": total / MB, "mode": "whole folder (before)" if whole else "streamed",
                             **res})
                print(f"{mb} MB {rows[-1]['mode']}: peak {res['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
                left = list(root.glob("evomerge-sources-*/*"))
                if left:
                    print(f"left behind: {left}", file=sys.stderr)
                    return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}; seconds: streamed = the executor's start (worker process, "
          "tokenizer, tasks and the sources' copy); before = reading and ray.put only")
    print("\n| synthetic shard | largest source | shipping | driver RSS after ray.init | driver peak RSS | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mb']} MB | {r['source_mb']:.0f} MB | {r['mode']} | {r['after_init_mb']:.0f} MB | "
              f"{r['peak_mb']:.0f} MB | {r['ship_s']:.1f} |")
    streamed = [r for r in rows if r["mode"] == "streamed"]
    ratio = streamed[-1]["peak_mb"] / streamed[0]["peak_mb"]
    print(f"\nstreamed, driver peak RSS {streamed[-1]['mb']} MB vs {streamed[0]['mb']} MB: {ratio:.2f}x "
          f"(target <= 1.2x: {'met' if ratio <= 1.2 else 'missed'})")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
