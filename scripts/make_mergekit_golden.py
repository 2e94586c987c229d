"""Build the parity recipes with mergekit 0.1.5 and store its outputs as golden files.

    /work/mkvenv/bin/python scripts/make_mergekit_golden.py --mergekit-venv /work/mkvenv

Run by hand, in (or pointing at) a virtual environment with mergekit 0.1.5 (mergekit is never a
dependency of evomerge), e.g.
    python3 -m venv /work/mkvenv
    /work/mkvenv/bin/pip install -c constraints.txt mergekit==0.1.5
It merges every recipe of tests/golden/recipes.yaml on the fixture family tests/golden/family
(scripts/make_parity_family.py) on CPU, with the AVX2 kernels (tests/cpu_kernels.py), with random seed 0 (mergekit's run_merge in this process
when mergekit is importable, else the venv's `mergekit-yaml --no-cuda --random-seed 0`; the
two give the same bytes) and writes tests/golden/manifest.json (every output tensor's sha256, dtype and shape; mask stats
of the random recipes) and tests/golden/<recipe>.safetensors (a few sample tensors in full), which
tests/test_mergekit_parity.py compares evomerge with. `--only NAME,...` rebuilds some recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cpu_kernels import PINNED, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # before torch: the AVX2 kernels, as the tests use (tests/cpu_kernels.py)

import mergekit_golden as mg  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def run_mergekit(venv: Path, recipe: dict, work: Path) -> dict[str, torch.Tensor]:
    """mergekit's merge of `recipe` (CPU, random seed 0): in this process when mergekit is
    importable here (no per-recipe start-up), else with the venv's mergekit-yaml."""
    config, out = work / "recipe.yml", work / "out"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        pass
    else:  # what mergekit-yaml does with these options
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())),
                  str(out), MergeOptions(device="cpu", quiet=True, random_seed=0,
                                         allow_crimes=True, write_model_card=False))
        return mg.load_folder(out)
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--quiet",
           "--random-seed", "0", "--allow-crimes"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{proc.stderr[-3000:]}")
    return mg.load_folder(out)


def mergekit_version(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m, torch; "
                          "print(m.version('mergekit'), torch.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated recipe names to rebuild")
    args = ap.parse_args()
    recipes = mg.load_recipes()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(recipes))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {sorted(recipes)}")
    manifest_path = mg.GOLDEN / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    mk, torch_version = mergekit_version(args.mergekit_venv).split()
    manifest["generator"] = {"mergekit": mk, "torch": torch_version, "device": "cpu",
                             "random_seed": 0,
                             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "cpu_kernel_env": {k: os.environ.get(k) for k in PINNED}}
    entries = manifest.setdefault("recipes", {})
    family = {p.name: mg.load_folder(p) for p in sorted(mg.FAMILY.iterdir()) if p.is_dir()}
    for name, spec in recipes.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="mk-golden-") as tmp:
            merged = run_mergekit(args.mergekit_venv, mg.resolve(spec["recipe"]), Path(tmp))
        entry = {"method": spec["recipe"]["merge_method"], "kind": spec["kind"],
                 "tensors": mg.describe(merged)}
        if spec["kind"] == "distribution":
            base, source = (f.removeprefix(mg.PLACEHOLDER)
                            for f in mg.base_and_source(spec["recipe"]))
            entry["stats"] = mg.mask_stats(merged, family[base], family[source])
        samples = {k: merged[k].contiguous() for k in mg.SAMPLES if k in merged}
        entry["samples"] = sorted(samples)
        save_file(samples, str(mg.GOLDEN / f"{name}.safetensors"), metadata={"format": "pt"})
        entries[name] = entry
        print(f"{name}: {len(merged)} tensors", flush=True)
    for stale in set(entries) - set(recipes):
        del entries[stale]
    manifest["recipes"] = dict(sorted(entries.items()))
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
