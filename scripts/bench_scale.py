"""`evomerge merge` against `mergekit-yaml` 0.1.5 on Llama-shaped bf16 models of about 0.5B, 3B
and 7B parameters: wall time, peak RSS and peak anonymous RSS (sampled from /proc every 20 ms),
with evomerge's as ratios to mergekit's.

The sources are written as *headers only* (scripts/bench_lora_memory.py's writer): each
safetensors shard (one per layer) is its header followed by a sparse hole, so a 7B model takes no
disk space and reads as zeros. Both tools read the same files and run the same recipe (bf16, on
CPU): task_arithmetic and ties over a base and three sources, slerp of two models. The outputs are
real (14.5 GB per 7B merge) and removed after each run; the sources' pages are dropped from the
page cache before each run, so neither tool finds what the other read.

    python scripts/bench_scale.py --mergekit-venv /work/mkvenv --sizes 0.5b,3b,7b

Without --mergekit-venv only evomerge runs (no ratios). Run it alone on the machine: the timings
and the memory figures are the whole machine's to take.
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

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_lora_memory import llama_config, write_sharded_header_only  # noqa: E402
from synthetic_llama import llama_shapes  # noqa: E402

# name -> (hidden, intermediate, layers, vocab): about 0.54B, 3.4B and 6.7B parameters
SIZES = {"0.5b": (2048, 5632, 8, 32000), "3b": (3200, 8640, 26, 32000),
         "7b": (4096, 11008, 32, 32000)}
METHODS = ("task_arithmetic", "ties", "slerp")
SOURCES = 3  # besides the base, for task_arithmetic and ties


def write_model(folder: Path, size: tuple[int, int, int, int]) -> int:
    """A header-only bf16 Llama folder; returns its parameter count."""
    shapes = llama_shapes(*size)
    folder.mkdir(parents=True)
    cfg = llama_config(*size)
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    write_sharded_header_only(folder, shapes, dtype="BF16")
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def recipe(method: str, models: list[Path]) -> dict:
    base, *others = (str(m) for m in models)
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": others[0]}],
                "parameters": {"t": 0.4}, "dtype": "bfloat16"}
    params = {"weight": 0.5, "density": 0.5} if method == "ties" else {"weight": 0.5}
    return {"merge_method": method, "base_model": base,
            "models": [{"model": m, "parameters": params} for m in others],
            "dtype": "bfloat16"}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def evict(folders: list[Path]) -> None:
    """The sources' pages out of the page cache, so that every run starts as cold as the first
    (a tool run second would otherwise find what the first read; only these files' clean pages
    are dropped, nothing of anyone else's)."""
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(folders: list[Path]) -> None:
    """The sources read once, into the page cache as far as it holds them (as a second merge of
    the same sources finds them)."""
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Wall time and peaks of a command (one process; sampled every 20 ms)."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    start = time.perf_counter()
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while p.poll() is None:
            for k, v in _status(p.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}); see {log}:\n"
                           + log.read_text(errors="replace")[-2000:])
    return {"wall": wall, "rss": max(peaks["VmRSS"], peaks["VmHWM"]), "anon": peaks["RssAnon"],
            "file": peaks["RssFile"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5b,3b,7b", help=f"of {', '.join(SIZES)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="folder for sources and outputs")
    ap.add_argument("--tools", default="evomerge,mergekit")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="each run starts with the sources out of the page cache (cold), or read "
                    "into it just before (warm: as far as memory holds them)")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tools = [t for t in args.tools.split(",") if t != "mergekit" or args.mergekit_venv]
    repo = HERE.parent
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    rows = []
    try:
        for size in sizes:
            folders = [work / size / f"m{i}" for i in range(SOURCES + 1)]
            params = [write_model(f, SIZES[size]) for f in folders][0]
            for method in methods:
                cfg = work / size / f"{method}.yml"
                cfg.write_text(yaml.safe_dump(recipe(method, folders), sort_keys=False))
                result = {}
                for tool in tools:
                    out = work / size / f"out-{tool}"
                    if tool == "evomerge":
                        cmd = [sys.executable, "-m", "evomerge.cli", "merge", str(cfg), str(out)]
                    else:
                        cmd = [str(args.mergekit_venv / "bin" / "mergekit-yaml"), str(cfg), str(out),
                               "--no-cuda", "--no-copy-tokenizer", "--quiet"]
                    evict(folders)
                    if args.cache == "warm":
                        warm(folders[:2] if method == "slerp" else folders)
                    result[tool] = measure(cmd, env, work / f"{size}-{method}-{tool}.log")
                    shutil.rmtree(out, ignore_errors=True)
                    r = result[tool]
                    print(f"# {size} {method} {tool}: {r['wall']:.1f} s, peak RSS "
                          f"{r['rss'] / 1e9:.2f} GB, anonymous {r['anon'] / 1e9:.2f} GB, "
                          f"file-backed {r['file'] / 1e9:.2f} GB", flush=True)
                rows.append((size, params, method, result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbf16 Llama shapes, header-only sources ({args.cache} page cache), CPU, "
          f"{os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| size | method | tool | wall s | peak RSS GB | anon RSS GB | file RSS GB | "
          "wall / mergekit | anon / mergekit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, params, method, result in rows:
        mk = result.get("mergekit")
        for tool, r in result.items():
            ratio_w = f"{r['wall'] / mk['wall']:.2f}" if mk else "-"
            ratio_a = f"{r['anon'] / mk['anon']:.2f}" if mk else "-"
            print(f"| {size} ({params / 1e9:.2f}B) | {method} | {tool} | {r['wall']:.1f} | "
                  f"{r['rss'] / 1e9:.2f} | {r['anon'] / 1e9:.2f} | {r['file'] / 1e9:.2f} | "
                  f"{ratio_w} | {ratio_a} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
