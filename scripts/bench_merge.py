"""Benchmark the in-place merger against a memory copy of the same bytes, per merge method.

For each method: the median time to build one candidate in place (`InPlaceMerger.build`), and in
the same run the median time of torch copies that move the method's ideal bytes: every resident
input that a candidate must read, read once, plus the target written once:

  linear                      (m + 1) * N * s     m sources (the base is one of them)
  task_arithmetic             (n + 2) * N * s     base + n task vectors + target
  ties, breadcrumbs*          (n + 2) * N * s + n * N * 4     + int32 magnitude ranks
  dare_*                      (n + 2) * N * s + n * N * 8     + float64 mask uniforms
  della*                      (n + 2) * N * s + n * N * 12    + uniforms + int32 ranks

(N parameters, s bytes per element, n = 3 non-base sources.) On CPU the merger keeps, for ties
and breadcrumbs, each element's rank in the stable magnitude order (int32) and reads it for every
candidate (the mask is one integer comparison), so those bytes are counted. (Until 2026-11 it
read only the deltas and compared |delta| with a looked-up threshold; its ideal was then
(n + 2) * N * s: 20 instead of 32 bytes per parameter in float32 with n = 3, so a ratio here
is 1.6x the ratio against that older reference.) A copy of B/2 bytes reads B/2 and writes B/2:
it moves B bytes. The table's ratio is copy time / merger time (1.0 = as fast as a copy of the
ideal bytes).

Full mode: sources of about 200M float32 parameters each (a base and three fine-tunes, 3.3 GB
on disk), 5 repeats; about 15 minutes and 12 GB of memory on 2 cores. --quick: about 20M
parameters (80 MB per model, 400 MB touched per candidate: far beyond the caches), 3 repeats, under 2 minutes.
With --mergekit-venv (or mergekit importable), mergekit-yaml's time for the same recipe is
added (its process: load, merge, write).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.merge.inplace import InPlaceMerger  # noqa: E402
from evomerge.recipes.parameter_space import Recipe  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear")
TARGETS = {"linear": 0.5, "task_arithmetic": 0.5, "ties": 0.25, "dare_ties": 0.25, "della": 0.25}
SIZES = {  # hidden, intermediate, layers, vocab
    "full": (1024, 2816, 14, 16000),  # 209M parameters
    "quick": (384, 1024, 8, 8000),  # 20M parameters
}


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_sources(root: Path, size: tuple[int, int, int, int], n: int) -> list[Path]:
    """A random base and n fine-tunes (base + small noise), float32 safetensors, no tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = size
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    shapes = llama_shapes(*size)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    out = []
    for i in range(n + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        state = base if i == 0 else {
            k: v + torch.randn(v.shape, generator=g) * 0.005 for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out.append(folder)
        del state
    return out


def recipe_for(method: str, base: Path, sources: list[Path]) -> Recipe:
    params = []
    for i, s in enumerate(sources):
        p: dict = {"weight": [0.4 + 0.1 * i, 0.8]}
        if method != "linear" and method != "task_arithmetic":
            p["density"] = [0.4, 0.6]
        if method.startswith("della"):
            p["epsilon"] = 0.1
        params.append({"model": str(s), "parameters": p})
    data: dict = {"merge_method": method, "base_model": str(base), "models": params,
                  "dtype": "float32", "mask_seed": 7}
    if method == "linear":
        data["parameters"] = {"weight": 0.5}  # the base joins linear as a source
    return Recipe.from_dict(data)


def ideal_bytes(method: str, n_params: int, n: int, s: int = 4) -> int:
    if method == "linear":
        return (n + 1 + 1) * n_params * s  # n fine-tunes + the base, + the target
    total = (n + 2) * n_params * s
    if method == "ties" or method.startswith("breadcrumbs"):
        total += n * n_params * 4
    if method.startswith("dare"):
        total += n * n_params * 8
    if method.startswith("della"):
        total += n * n_params * 12
    return total


def time_copy(total: int, repeats: int) -> float:
    """Median seconds of torch copies moving `total` bytes (B/2 read + B/2 written)."""
    half = total // 2
    chunk = min(half, 1 << 30)
    src = torch.ones(chunk // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        left = half
        t0 = time.perf_counter()
        while left > 0:
            k = min(left, chunk) // 4
            dst[:k].copy_(src[:k])
            left -= k * 4
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mergekit_time(venv: str | None, recipe: Recipe, work: Path) -> float | None:
    exe = shutil.which("mergekit-yaml")
    if venv:
        exe = str(Path(venv) / "bin" / "mergekit-yaml")
    if not exe or not Path(exe).exists():
        return None
    data = json.loads(recipe.model_dump_json(exclude_none=True))
    data.pop("mask_seed", None)  # evomerge's own key
    config = work / "mk.yml"
    config.write_text(json.dumps(data))
    out = work / "mk-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([exe, str(config), str(out), "--allow-crimes"], capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(f"  mergekit failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sources, 3 repeats (<2 min)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--chunk", type=int, default=None, help="elements per CPU chunk")
    parser.add_argument("--mergekit-venv", default=None,
                        help="a virtual environment with mergekit-yaml (e.g. /work/mkvenv)")
    parser.add_argument("--workdir", default=None, help="where to write the sources (temp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or (3 if args.quick else 5)
    methods = [m for m in args.methods.split(",") if m]
    n = 3
    size = SIZES[mode]
    n_params = sum(math.prod(s) for s in llama_shapes(*size).values())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    print(f"mode {mode}: {n_params / 1e6:.0f}M float32 parameters per model, base + {n} "
          f"sources, {repeats} repeats, {args.threads} threads, device cpu")
    t0 = time.perf_counter()
    try:
        folders = write_sources(work / "models", size, n)
        print(f"wrote sources in {time.perf_counter() - t0:.1f}s")
        base, sources = folders[0], folders[1:]
        rows = []
        for method in methods:
            recipe = recipe_for(method, base, sources)
            t1 = time.perf_counter()
            merger = InPlaceMerger([str(s) for s in sources], str(base), method,
                                   dtype=torch.float32, chunk=args.chunk)
            setup = time.perf_counter() - t1
            t1 = time.perf_counter()
            merger.build(recipe)  # warm-up: dare/della uniforms, the fused kernels' compile
            first = time.perf_counter() - t1
            times = []
            for _ in range(repeats):
                t2 = time.perf_counter()
                merger.build(recipe)
                times.append(time.perf_counter() - t2)
            t_merge = statistics.median(times)
            del merger
            gc.collect()
            ideal = ideal_bytes(method, n_params, n)
            t_copy = time_copy(ideal, repeats)
            mk = mergekit_time(args.mergekit_venv, recipe, work)
            rows.append((method, t_merge, ideal, t_copy, mk))
            print(f"  {method}: setup {setup:.1f}s, first build {first:.1f}s, "
                  f"build {t_merge * 1e3:.0f} ms "
                  f"(runs {[round(t * 1e3) for t in times]}), copy {t_copy * 1e3:.0f} ms"
                  + (f", mergekit {mk:.1f}s" if mk else ""), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f}s\n")
    has_mk = any(r[4] for r in rows)
    head = ("| method | ms / candidate | ideal GB | GB/s | copy GB/s | ratio | target |"
            + (" mergekit-yaml s |" if has_mk else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for method, t_merge, ideal, t_copy, mk in rows:
        ratio = t_copy / t_merge
        target = TARGETS.get(method)
        verdict = "" if target is None else f">= {target} {'met' if ratio >= target else 'MISSED'}"
        line = (f"| {method} | {t_merge * 1e3:.0f} | {ideal / 1e9:.2f} | "
                f"{ideal / t_merge / 1e9:.1f} | {ideal / t_copy / 1e9:.1f} | {ratio:.2f} | "
                f"{verdict} |")
        if has_mk:
            line += f" {mk:.1f} |" if mk else " - |"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
