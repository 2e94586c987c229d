"""Benchmark the in-place merger against a reference doing the same kind of work, per method.

For each registered merge method (taken from the registry, so every method evomerge has is run):
the median time to build one candidate in place (`InPlaceMerger.build`), and in the same run the
median time of the reference: the elementwise sum of the k inputs that the recipe reads (the
base and the fine-tunes, resident float32 buffers of N elements each) into one output buffer,
in cache-sized chunks (torch.add, then k - 2 in-place adds per chunk). It reads what any
implementation of the merge must read and writes what it must write, with arithmetic on every
element, so the ideal bytes are

  ideal = (k + 1) * N * s     k inputs read once, the target written once

(s = 4 bytes in float32; k = 4 here for the task-arithmetic family and linear: a base and three
fine-tunes; fewer for methods that take fewer models, e.g. slerp's two). The ratio is
reference time / merger time (1.0 = as fast as summing the inputs once).

The old reference (until 2026-12) was a memory copy of the "old ideal bytes": the inputs plus the
merger's own resident caches (int32 magnitude ranks for ties/breadcrumbs*, float64 uniforms for
dare*, uniforms and int32 ranks for della*), and a copy moves half its bytes as writes while a
merge mostly reads. The table reports that old ratio beside the new one so the change shows.

Full mode: sources of about 200M float32 parameters each (a base and three fine-tunes, 3.3 GB
on disk), 5 repeats; about 15 minutes and 12 GB of memory on 2 cores. --quick: about 20M
parameters (80 MB per model, 400 MB touched per candidate: far beyond the caches), 3 repeats.
With --mergekit-venv (or mergekit importable), mergekit-yaml's time for the same recipe is
added (its process: load, merge, write).

LoRA rows (unless --no-lora): task_arithmetic over three rank-16 adapters of the base (every
attention and MLP projection; the merger keeps them as factors, one addmm per tensor) against
task_arithmetic over the same deltas made dense (full models base + s*B@A: the dense path), on
the same sources, timed alternately; with the bytes each holds for its inputs.
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from synthetic_llama import llama_shapes  # noqa: E402  (scripts/)

from evomerge.merge.inplace import InPlaceMerger  # noqa: E402
from evomerge.merge.inplace.memory import CPU_CHUNK, check_supported  # noqa: E402
from evomerge.methods.base import ParamScope  # noqa: E402
from evomerge.methods.registry import fine_tune_count, get_method, method_names  # noqa: E402
from evomerge.recipes.parameter_space import Recipe  # noqa: E402

# values for parameters that a method requires (or that the bench sets on purpose), by name;
# a required parameter not named here gets 0.5 (a number) or false
# the methods the old reference was defined for (its ratio is printed for these only)
OLD_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear")
PARAM_VALUES = {"weight": None, "density": [0.4, 0.6], "epsilon": 0.1, "t": [0.3, 0.7],
                "select_topk": 0.5}
TARGETS = {"linear": 0.5, "task_arithmetic": 0.5, "ties": 0.25, "dare_ties": 0.25, "della": 0.25}
SIZES = {  # hidden, intermediate, layers, vocab
    "full": (1024, 2816, 14, 16000),  # 209M parameters
    "quick": (384, 1024, 8, 8000),  # 20M parameters
}


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


def uses_base(method) -> bool:
    """Whether the bench gives the method a base model (required, or optional and used)."""
    policy = str(getattr(method, "base_policy", ""))
    return method.requires_base or method.name == "linear" or policy.endswith("optional")


def value_for(spec, i: int):
    if spec.name == "weight":
        return [0.4 + 0.1 * i, 0.8]
    if spec.name in PARAM_VALUES:
        return PARAM_VALUES[spec.name]
    if spec.required:
        return False if spec.kind is bool else 0.5
    return None


def recipe_for(name: str, base: Path, sources: list[Path]) -> tuple[Recipe, int]:
    """The bench's recipe for method `name` over `sources`, and how many inputs it reads."""
    method = get_method(name)
    params, shared = [], {}
    for i, s in enumerate(sources):
        p = {}
        for spec in method.params:
            value = value_for(spec, i)
            if value is None:
                continue
            if spec.scope is ParamScope.SHARED:
                shared[spec.name] = value
            else:
                p[spec.name] = value
        params.append({"model": str(s), "parameters": p})
    data: dict = {"merge_method": name, "models": params, "dtype": "float32", "mask_seed": 7}
    if uses_base(method):
        data["base_model"] = str(base)
    if name == "linear":
        shared["weight"] = 0.5  # the base joins linear as a source
    if shared:
        data["parameters"] = shared
    return Recipe.from_dict(data), len(sources) + (1 if uses_base(method) else 0)


def ideal_bytes(inputs: int, n_params: int, s: int = 4) -> int:
    """What any implementation must move: every input read once, the target written once."""
    return (inputs + 1) * n_params * s


def old_ideal_bytes(method: str, n_params: int, n: int, s: int = 4) -> int:
    """The old reference's bytes (inputs, target and the merger's own resident caches)."""
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


def sum_reference(inputs: int, n_params: int) -> Callable[[], None]:
    """One run of the reference: `inputs` resident float32 buffers of n_params summed into one,
    in cache-sized chunks (each input read once, the output written once)."""
    g = torch.Generator().manual_seed(1)
    bufs = [torch.randn(n_params, generator=g) for _ in range(inputs)]
    out = torch.empty(n_params)

    def once() -> None:
        for lo in range(0, n_params, CPU_CHUNK):
            hi = min(lo + CPU_CHUNK, n_params)
            o = out[lo:hi]
            if inputs == 1:
                o.copy_(bufs[0][lo:hi])
                continue
            torch.add(bufs[0][lo:hi], bufs[1][lo:hi], out=o)
            for b in bufs[2:]:
                o.add_(b[lo:hi])
    return once


def copy_reference(total: int) -> Callable[[], None]:
    """One run of the old reference: torch copies moving `total` bytes (B/2 read, B/2 written)."""
    half = total // 2
    chunk = min(half, 1 << 30)
    src = torch.ones(chunk // 4)
    dst = torch.empty_like(src)

    def once() -> None:
        left = half
        while left > 0:
            k = min(left, chunk) // 4
            dst[:k].copy_(src[:k])
            left -= k * 4
    return once


def write_lora_sources(root: Path, base: Path, rank: int, n: int) -> tuple[list[Path], list[Path]]:
    """n random rank-`rank` PEFT adapters of `base` and the same deltas as dense full models."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    g = torch.Generator().manual_seed(1)
    adapters, dense = [], []
    for i in range(n):
        a_dir, d_dir = root / f"lora{i}", root / f"lora{i}_dense"
        a_dir.mkdir(parents=True)
        shutil.copytree(base, d_dir)
        (a_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(targets), "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base)}))
        factors, full = {}, dict(state)
        for name, w in state.items():
            module = name[: -len(".weight")]
            if module.rsplit(".", 1)[-1] not in targets:
                continue
            a = torch.randn(rank, w.shape[1], generator=g) * 0.02
            b = torch.randn(w.shape[0], rank, generator=g) * 0.02
            factors[f"base_model.model.{module}.lora_A.weight"] = a
            factors[f"base_model.model.{module}.lora_B.weight"] = b
            full[name] = w + (b @ a) * 2.0
        save_file(factors, str(a_dir / "adapter_model.safetensors"))
        save_file(full, str(d_dir / "model.safetensors"), metadata={"format": "pt"})
        adapters.append(a_dir)
        dense.append(d_dir)
    return adapters, dense


def lora_rows(work: Path, base: Path, repeats: int, rank: int = 16) -> list[str]:
    """The LoRA table: task_arithmetic over adapters (low-rank) vs the same deltas dense."""
    adapters, dense = write_lora_sources(work / "lora", base, rank, 3)
    mergers, recipes, held = {}, {}, {}
    for label, sources in (("adapters (low-rank)", adapters), ("same deltas, dense", dense)):
        recipe, _ = recipe_for("task_arithmetic", base, sources)
        merger = InPlaceMerger([str(s) for s in sources], str(base), "task_arithmetic",
                               dtype=torch.float32)
        merger.build(recipe)  # warm-up
        mergers[label], recipes[label] = merger, recipe
        if merger._lowrank:
            held[label] = sum(t.numel() * t.element_size() for e in merger._lowrank_entries.values()
                              for t in (*e.scaled_b.values(), e.a_cat, e.b_cat) if t is not None)
        else:
            held[label] = sum(e.inputs.numel() * e.inputs.element_size()
                              for e in merger._entries.values())
    times: dict[str, list[float]] = {k: [] for k in mergers}
    for _ in range(repeats):
        for k, m in mergers.items():
            times[k].append(timed(m.build, recipes[k]))
    dense_out = mergers["same deltas, dense"].build(recipes["same deltas, dense"]).state_dict()
    low_out = mergers["adapters (low-rank)"].build(recipes["adapters (low-rank)"]).state_dict()
    diff = max(float((low_out[k] - dense_out[k]).abs().max()) for k in dense_out)
    t_dense = statistics.median(times["same deltas, dense"])
    lines = [f"task_arithmetic over 3 rank-{rank} LoRA adapters vs the same deltas dense "
             f"(max |difference| {diff:.1e}; load average {os.getloadavg()[0]:.2f})", "",
             "| sources | ms / candidate | inputs held GB | speed vs dense | memory vs dense |",
             "|---|---|---|---|---|"]
    for k in mergers:
        t = statistics.median(times[k])
        lines.append(f"| {k} | {t * 1e3:.0f} | {held[k] / 1e9:.3f} | {t_dense / t:.2f}x | "
                     f"{held[k] / held['same deltas, dense']:.3f} |")
    return lines


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


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


def table(rows: list[tuple]) -> list[str]:
    """The markdown table of the rows (method, inputs, t_merge, ideal, t_sum, old, t_copy, mk)."""
    has_mk = any(r[7] for r in rows)
    head = ("| method | inputs | ms / candidate | ideal GB | GB/s | sum GB/s | ratio | "
            "old ideal GB | old ratio (copy) | target (old ratio) |" + (" mergekit-yaml s |" if has_mk else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, inputs, t_merge, ideal, t_sum, old, t_copy, mk in rows:
        ratio = t_sum / t_merge
        target = TARGETS.get(method)
        old_ratio = t_copy / t_merge  # the targets were set against the old reference
        verdict = ("" if target is None
                   else f">= {target} {'met' if old_ratio >= target else 'MISSED'}")
        line = (f"| {method} | {inputs} | {t_merge * 1e3:.0f} | {ideal / 1e9:.2f} | "
                f"{ideal / t_merge / 1e9:.1f} | {ideal / t_sum / 1e9:.1f} | {ratio:.2f} | "
                + (f"{old / 1e9:.2f} | {old_ratio:.2f} |" if method in OLD_METHODS else "- | - |")
                + f" {verdict} |")
        if has_mk:
            line += f" {mk:.1f} |" if mk else " - |"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sources, 3 repeats (<2 min)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--methods", default=",".join(method_names()),
                        help="comma-separated (default: every registered method)")
    parser.add_argument("--chunk", type=int, default=None, help="elements per CPU chunk")
    parser.add_argument("--mergekit-venv", default=None,
                        help="a virtual environment with mergekit-yaml (e.g. /work/mkvenv)")
    parser.add_argument("--workdir", default=None, help="where to write the sources (temp)")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA adapter rows")
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
            try:
                check_supported(get_method(method))
            except ValueError as err:
                print(f"  {method}: skipped ({err})", flush=True)
                continue
            m = get_method(method)
            k = fine_tune_count(m, n, has_base=uses_base(m) and m.name != "linear")
            recipe, inputs = recipe_for(method, base, sources[:k])
            t1 = time.perf_counter()
            merger = InPlaceMerger([str(s) for s in sources[:k]], recipe.base_model, method,
                                   dtype=torch.float32, chunk=args.chunk)
            setup = time.perf_counter() - t1
            t1 = time.perf_counter()
            merger.build(recipe)  # warm-up: dare/della uniforms, the fused kernels' compile
            first = time.perf_counter() - t1
            # the merger and both references alternate, so that they share the machine's load
            refs = (sum_reference(inputs, n_params),
                    copy_reference(old_ideal_bytes(method, n_params, k)))
            for ref in refs:
                ref()  # warm-up: touch the buffers once
            times, sums, copies = [], [], []
            for _ in range(repeats):
                times.append(timed(merger.build, recipe))
                sums.append(timed(refs[0]))
                copies.append(timed(refs[1]))
            t_merge, t_sum, t_copy = (statistics.median(x) for x in (times, sums, copies))
            del merger, refs
            gc.collect()
            old = old_ideal_bytes(method, n_params, k)
            mk = mergekit_time(args.mergekit_venv, recipe, work)
            rows.append((method, inputs, t_merge, ideal_bytes(inputs, n_params), t_sum, old,
                         t_copy, mk))
            print(f"  {method}: setup {setup:.1f}s, first build {first:.1f}s, "
                  f"build {t_merge * 1e3:.0f} ms "
                  f"(runs {[round(t * 1e3) for t in times]}), sum of {inputs} inputs "
                  f"{t_sum * 1e3:.0f} ms, old copy {t_copy * 1e3:.0f} ms"
                  + (f", mergekit {mk:.1f}s" if mk else ""), flush=True)
        lora = [] if args.no_lora else lora_rows(work, base, repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f}s\n")
    print("\n".join(table(rows)))
    if lora:
        print("\n" + "\n".join(lora))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
