"""Every GPU check of evomerge in one command: run it when a CUDA machine is lent (minutes only).

    python scripts/gpu_check.py --out gpu_report.json          # on the GPU machine, < 8 minutes
    python scripts/gpu_check.py --dry-run                      # anywhere: tiny shapes on CPU

Parts (each one reports ok / failed / skipped with the reason; a failed part does not stop the
others):

1. deps: which of evomerge's dependencies import here; the wheels to carry for what is missing.
2. gpu_tests: ``pytest -m gpu`` on the test files that have gpu-marked tests (today
   tests/test_inplace.py and tests/test_merge_methods.py; needs pytest, pluggy, iniconfig,
   packaging, and evomerge's deps below).
3. inplace_7b: the in-place build per candidate on CUDA with a 7B-shaped synthetic model (Llama
   7B shapes, random bf16 weights, base + three sources, task arithmetic), resident and stream
   placement: median seconds per candidate (torch.cuda.synchronize around each build) against
   the target (< 0.5 s on an H100-class GPU), and the memory plan
   (``evomerge.merge.inplace.memory.plan``) against the measured ``torch.cuda.max_memory_allocated``.
   Sources 2 and 3 are hard links of source 1 unless ``--distinct`` (then 4 files, not 2).
4. methods_cpu_vs_cuda: every registered merge method on small random tensors, on CPU and on
   CUDA: bit-equal or the largest difference.
5. evaluator: the in-process evaluator on CUDA (lm-eval importable and a zoo given with ``--zoo``
   or found in the cache): the zoo base model scored on zoo_rev, on CPU and on CUDA.
6. ray: one Ray worker per GPU (Ray importable): each worker's visible device and a matmul on it.

Imports at top level only the standard library and torch (the GPU machine has torch,
transformers and safetensors and no network); everything else is imported inside the part that
needs it, and a part whose imports are missing is skipped, naming the wheels to carry. evomerge
itself is the source tree. Wheels to carry (``pip download --only-binary=:all: --python-version
3.X --platform manylinux2014_x86_64 NAME`` here, ``pip install --no-index --find-links wheels/
NAME`` there): pure Python: annotated-types, typing-inspection, typing-extensions, pydantic,
filelock, and for the tests pytest, pluggy, iniconfig, packaging; binary (small): pydantic-core,
pyyaml, numpy (when torch's environment lacks it). lm-eval and Ray are large: their parts are
skipped without them.

Without CUDA (or with ``--dry-run``) every part runs on CPU with tiny shapes, as a check of this
script's own plumbing, and the script exits 0 (tests/test_gpu_check.py runs it so).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from synthetic_llama import llama_shapes  # noqa: E402  (scripts/, standard library only)

GB = 1e9
# module -> the wheel(s) that provide it; (pure): pure Python, any platform
DEPS = {
    "pydantic": "pydantic (pure) + pydantic-core (binary) + annotated-types, typing-inspection (pure)",
    "yaml": "pyyaml (binary)", "numpy": "numpy (binary)", "filelock": "filelock (pure)",
    "pytest": "pytest, pluggy, iniconfig, packaging (pure)", "transformers": "transformers (preinstalled)",
    "safetensors": "safetensors (preinstalled)", "lm_eval": "lm-eval (large: its part is skipped)",
    "ray": "ray (large: its part is skipped)",
}
SHAPES = {"7b": (4096, 11008, 32, 32000), "dry": (64, 128, 2, 256)}  # hidden, intermediate, layers, vocab
TARGET_S = 0.5


class Skip(Exception):
    """A part that cannot run here (its reason is reported)."""


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def need(*modules: str) -> None:
    missing = [m for m in modules if not has(m)]
    if missing:
        raise Skip("missing " + ", ".join(f"{m} (carry {DEPS.get(m, m)})" for m in missing))


# ----------------------------------------------------------------------------- parts
def part_deps(ctx) -> dict:
    found = {m: has(m) for m in DEPS}
    return {"importable": found, "carry": [DEPS[m] for m, ok in found.items() if not ok],
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def part_gpu_tests(ctx) -> dict:
    need("pytest", "pydantic", "yaml", "numpy")
    if not ctx["cuda"]:
        raise Skip("no CUDA: the gpu-marked tests would all skip")
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text())  # only these: the others may import what is not here
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx["tests_timeout"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    if r.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError("pytest -m gpu failed:\n" + "\n".join(tail))
    return {"files": files, "summary": tail[-1] if tail else "", "returncode": r.returncode}


def write_model(folder: Path, shapes: dict, seed: int, device: str, config) -> None:
    """Random bf16 weights (drawn on the GPU when there is one: fast), one safetensors file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {k: (torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 0.02).cpu()
             for k, s in shapes.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def make_sources(root: Path, size: tuple, distinct: bool, device: str) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = size
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                         vocab_size=vocab, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    shapes = llama_shapes(*size)
    base = root / "base"
    write_model(base, shapes, 0, device, config)
    sources = []
    for i in (1, 2, 3):
        folder = root / f"ft{i}"
        if distinct or i == 1:
            write_model(folder, shapes, i, device, config)
        else:  # the first source's bytes under two more names: the build's cost does not depend on them
            folder.mkdir()
            config.save_pretrained(folder)
            os.link(root / "ft1" / "model.safetensors", folder / "model.safetensors")
        sources.append(folder)
    return base, sources


def recipe_for(base: Path, sources: list[Path], k: int):
    from evomerge.recipes.parameter_space import Recipe

    models = [{"model": str(s), "parameters": {"weight": [0.2 + 0.05 * ((i + k) % 5), 0.6]}}
              for i, s in enumerate(sources)]
    return Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
                             "dtype": "bfloat16"})


def part_inplace(ctx) -> dict:
    need("pydantic", "yaml")
    from evomerge.merge.inplace import InPlaceMerger
    from evomerge.merge.inplace.memory import plan

    device = "cuda" if ctx["cuda"] else "cpu"
    size = SHAPES["dry" if ctx["dry"] else "7b"]
    root = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=ctx["workdir"]))
    t0 = time.perf_counter()
    base, sources = make_sources(root, size, ctx["distinct"], device)
    out: dict = {"shapes": dict(zip(("hidden", "intermediate", "layers", "vocab"), size, strict=True)),
                 "device": device, "write_s": round(time.perf_counter() - t0, 1), "placements": {}}
    try:
        for placement in ("resident", "stream"):
            mp = plan([str(s) for s in sources], str(base), "task_arithmetic", dtype=torch.bfloat16,
                      placement=placement, device=device)
            out["parameters"] = mp.parameters
            if ctx["cuda"]:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t1 = time.perf_counter()
            merger = InPlaceMerger([str(s) for s in sources], str(base), "task_arithmetic", device=device,
                                   dtype=torch.bfloat16, placement=placement)
            load_s = time.perf_counter() - t1
            times = []
            for k in range(ctx["repeats"] + 1):  # the first build warms up (not counted)
                recipe = recipe_for(base, sources, k)
                if ctx["cuda"]:
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                merger.build(recipe)
                if ctx["cuda"]:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t1)
            row = {"load_s": round(load_s, 1), "build_s": round(statistics.median(times[1:]), 4),
                   "plan_device_gb": round(mp.device_bytes / GB, 2), "plan_host_gb": round(mp.host_bytes / GB, 2)}
            if ctx["cuda"]:
                peak = torch.cuda.max_memory_allocated() - before
                row.update(peak_device_gb=round(peak / GB, 2), peak_over_plan=round(peak / max(mp.device_bytes, 1), 3))
            out["placements"][placement] = row
            del merger
            gc.collect()
            if ctx["cuda"]:
                torch.cuda.empty_cache()
        res = out["placements"]["resident"]["build_s"]
        out["target"] = f"resident build {res:.3f} s per candidate (target < {TARGET_S} s on an H100-class GPU: " + (
            ("met" if res < TARGET_S else "missed") if ctx["cuda"] and not ctx["dry"] else "not measured: dry run") + ")"
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return out


def method_inputs(method, n: int = 3, numel: int = 4096, seed: int = 0):
    from evomerge.methods.base import ParamScope, TensorGroup
    from evomerge.methods.registry import fine_tune_count

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    needs_base = method.requires_base
    count = fine_tune_count(method, n, needs_base)  # within the method's input contract
    tensors = {}
    if needs_base:
        tensors[0] = base
    for _ in range(count):
        tensors[len(tensors)] = base + 0.1 * torch.randn(numel, generator=g)
    base_key = 0 if needs_base else None
    values = {"weight": 0.4, "density": 0.6, "epsilon": 0.05, "gamma": 0.01, "scale": 1.0, "t": 0.3}
    per_source, shared = {}, {}
    for spec in method.params:
        if spec.scope == ParamScope.SHARED:
            shared[spec.name] = values[spec.name] if spec.required else spec.default
            continue
        for key in tensors:
            if spec.scope == ParamScope.NON_BASE and key == base_key:
                continue
            v = values.get(spec.name, None if spec.required else spec.default)
            per_source.setdefault(key, {})[spec.name] = v if spec.kind is not bool else bool(v)
    return TensorGroup("t", tensors, base_key), shared, per_source


def part_methods(ctx) -> dict:
    need("pydantic", "yaml")
    from evomerge.methods.base import TensorGroup
    from evomerge.methods.registry import merge_group, registered_methods

    other = "cuda" if ctx["cuda"] else "cpu"  # without CUDA: CPU against CPU (the plumbing only)
    rows, bad = {}, []
    for method in registered_methods():
        group, shared, per_source = method_inputs(method)
        a = merge_group(method, group, shared, per_source, mask_seed=7)
        moved = TensorGroup(group.name, {k: v.to(other) for k, v in group.tensors.items()}, group.base)
        b = merge_group(method, moved, shared, per_source, mask_seed=7).cpu()
        equal = bool(torch.equal(a, b))
        rows[method.name] = {"equal": equal, "max_abs_diff": float((a - b).abs().max())}
        if not equal:
            bad.append(method.name)
    return {"device": other, "methods": rows, "not_bit_equal": bad}


def find_zoo(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "zoo"
    for cand in [REPO / "artifacts" / "zoo", *sorted(cache.glob("*/"))]:
        if (cand / "zoo.json").is_file():
            return cand
    return None


def part_evaluator(ctx) -> dict:
    need("lm_eval", "pydantic", "yaml", "numpy")
    zoo = find_zoo(ctx["zoo"])
    if zoo is None:
        raise Skip("no zoo: give --zoo PATH (the tests' cached zoo, ~11 MB, can be carried)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from evomerge.core.env import quiet_libraries
    from evomerge.evaluation.fitness import FitnessFunction
    from evomerge.models.folders import load_tokenizer
    from evomerge.search.config import SearchConfig
    from evomerge.search.validation import check_tasks

    quiet_libraries()
    out = {}
    for device in ("cpu", *(("cuda",) if ctx["cuda"] else ())):
        cfg = SearchConfig.from_dict({"models": [str(zoo / "spec_rev")], "base_model": str(zoo / "base"),
                                      "search_space": "ps_task_arithmetic", "device": device,
                                      "tasks": [{"name": "zoo_rev", "metric": "acc", "limit": 32}],
                                      "budget": {"generations": 1}, "dtype": "float32", "batch_size": 32})
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(zoo / "base"), dtype=torch.float32).to(device)
        tok = load_tokenizer(str(zoo / "base"))
        fitness = FitnessFunction(cfg.tasks, check_tasks(cfg), cfg.seed)
        t0 = time.perf_counter()
        score = fitness.score(model, tok, fitness.samples(0))
        out[device] = {"fitness": score.fitness, "eval_s": round(time.perf_counter() - t0, 2)}
    if "cuda" in out:
        out["same_fitness"] = out["cpu"]["fitness"] == out["cuda"]["fitness"]
    return out


def part_ray(ctx) -> dict:
    need("ray")
    if not ctx["cuda"]:
        raise Skip("no CUDA: nothing to place one worker per GPU on")
    import ray

    gpus = torch.cuda.device_count()
    ray.init(num_gpus=gpus, num_cpus=max(2, gpus), include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_gpus=1)
        def probe():
            import torch as t

            x = t.randn(4096, 4096, device="cuda")
            return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "name": t.cuda.get_device_name(),
                    "count": t.cuda.device_count(), "sum": float((x @ x).sum().cpu())}
        workers = ray.get([probe.remote() for _ in range(gpus)])
    finally:
        ray.shutdown()
    distinct = len({w["visible"] for w in workers})
    if distinct != gpus or any(w["count"] != 1 for w in workers):
        raise RuntimeError(f"workers did not get one GPU each: {workers}")
    return {"gpus": gpus, "workers": workers}


PARTS = {"deps": part_deps, "gpu_tests": part_gpu_tests, "inplace_7b": part_inplace,
         "methods_cpu_vs_cuda": part_methods, "evaluator": part_evaluator, "ray": part_ray}


def summary(name: str, res: dict) -> str:
    d = res.get("details") or {}
    if res["status"] != "ok":
        return res.get("reason", "")[:110]
    if name == "deps":
        return f"torch {d['torch']}, CUDA {d['cuda']}; carry: {'; '.join(d['carry']) or 'nothing'}"[:110]
    if name == "inplace_7b":
        p = d["placements"]
        return " | ".join(f"{k}: {v['build_s']:.3f} s/cand, plan {v['plan_device_gb']} GB"
                          + (f", peak {v['peak_device_gb']} GB" if "peak_device_gb" in v else "") for k, v in p.items())
    if name == "methods_cpu_vs_cuda":
        return f"{len(d['methods'])} methods on {d['device']}; not bit-equal: {', '.join(d['not_bit_equal']) or 'none'}"
    if name == "gpu_tests":
        return d["summary"]
    if name == "evaluator":
        return ", ".join(f"{k}: {v}" for k, v in d.items())[:110]
    if name == "ray":
        return f"{d['gpus']} workers, one GPU each"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_report.json"), help="the JSON report")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, whatever the machine has")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--repeats", type=int, default=5, help="timed builds per placement")
    ap.add_argument("--distinct", action="store_true", help="three distinct random sources (4x the disk)")
    ap.add_argument("--zoo", default=None, help="the zoo folder for the evaluator part")
    ap.add_argument("--budget-s", type=float, default=420, help="no part starts after this many seconds")
    ap.add_argument("--workdir", default=None, help="where the synthetic sources go (default: the temp folder)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    ctx = {"cuda": cuda, "dry": not cuda, "repeats": args.repeats if cuda else 2, "distinct": args.distinct,
           "zoo": args.zoo, "workdir": args.workdir, "tests_timeout": 240}
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    report = {"machine": {"cuda": cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                          if torch.cuda.is_available() else [], "dry_run": not cuda, "cpus": os.cpu_count()},
              "parts": {}}
    t_all = time.perf_counter()
    for name in [p for p in args.parts.split(",") if p]:
        t0 = time.perf_counter()
        try:
            if t0 - t_all > args.budget_s:
                raise Skip(f"out of time: {t0 - t_all:.0f} s spent of the {args.budget_s:.0f} s budget")
            res = {"status": "ok", "details": PARTS[name](ctx)}
        except Skip as e:
            res = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001  (reported; the other parts still run)
            res = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = res
        print(f"{name}: {res['status']} ({res['seconds']} s)", file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"\ngpu_check ({'CUDA: ' + ', '.join(report['machine']['gpus']) if cuda else 'dry run on CPU'}), "
          f"{report['seconds']} s; report: {args.out}\n")
    print("| part | status | s | result |")
    print("|---|---|---|---|")
    for name, res in report["parts"].items():
        print(f"| {name} | {res['status']} | {res['seconds']} | {summary(name, res)} |")
    failed = [n for n, r in report["parts"].items() if r["status"] == "failed"]
    return 1 if failed and cuda else 0


if __name__ == "__main__":
    sys.exit(main())
