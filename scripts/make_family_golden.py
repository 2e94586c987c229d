"""mergekit 0.1.5's merges of the architecture matrix's families (tests/families.py), as goldens.

    /work/mkvenv/bin/python scripts/make_family_golden.py [--only FAMILY,...]

Run in a virtual environment with mergekit 0.1.5 (never a dependency of evomerge; docs/parity.md
says how to make one). It builds the families (tests/families.py: seeded, the same bytes as the
tests build), merges each family with every recipe of RECIPES (mergekit's run_merge on CPU, the
AVX2 kernels of tests/cpu_kernels.py, random seed 0) and writes tests/golden/families.json: per
family the sha256 of every input tensor (so a test can tell a changed fixture from a changed
merge) and per recipe every output tensor's sha256 / dtype / shape.
tests/test_families_matrix.py compares `evomerge merge` with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from cpu_kernels import PINNED, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()

import families as fm  # noqa: E402
import mergekit_golden as mg  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

OUT = REPO / "tests" / "golden" / "families.json"


def recipes(f: dict[str, Path], dtype: str) -> dict[str, dict]:
    """The matrix's recipe kinds over one family (paths filled in)."""
    fts = [str(f[m]) for m in ("ft1", "ft2", "ft3")]
    base = str(f["base"])
    return {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
                            "models": [{"model": m, "parameters": {"weight": w}}
                                       for m, w in zip(fts, (0.7, 0.4, -0.2), strict=True)]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": dtype,
                 "parameters": {"normalize": True},
                 "models": [{"model": m, "parameters": {"weight": w, "density": 0.5}}
                            for m, w in zip(fts, (0.7, 0.4, 0.3), strict=True)]},
        "slerp": {"merge_method": "slerp", "base_model": fts[0], "dtype": dtype,
                  "parameters": {"t": 0.3},
                  "models": [{"model": fts[0]}, {"model": fts[1]}]},
        "linear": {"merge_method": "linear", "dtype": dtype,
                   "models": [{"model": m, "parameters": {"weight": w}}
                              for m, w in zip(fts, (0.5, 0.3, 0.2), strict=True)]},
        "passthrough": {"merge_method": "passthrough", "dtype": dtype, "slices": [
            {"sources": [{"model": fts[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": fts[1], "layer_range": [2, 4]}]}]},
    }


def family_dtype(name: str) -> str:
    return str(fm.FAMILIES[name].dtype).removeprefix("torch.")


def run_mergekit(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe))), str(out),
              MergeOptions(device="cpu", quiet=True, random_seed=0, allow_crimes=True,
                           write_model_card=False))
    return mg.load_folder(out)


def as_checkpoint(out: Path, dtype: str) -> dict[str, torch.Tensor]:
    """mergekit's output under the checkpoint names its sources have: with transformers 5,
    mergekit 0.1.5 writes MoE experts fused, as transformers holds them in memory
    (`mlp.experts.gate_up_proj`); transformers' own save (its conversion reverted) gives the
    per-expert tensors back, bit for bit (slices of the fused tensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype))
    model._weight_conversions = None  # loaded fused, nothing converted: revert the class's own rules
    model.save_pretrained(out.with_name(out.name + "-ckpt"))
    return mg.load_folder(out.with_name(out.name + "-ckpt"))


def short(described: dict) -> dict:
    return {k: [v["sha256_eq"][:20], v["dtype"], v["shape"]] for k, v in described.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = [n for n in args.only.split(",") if n]
    golden = json.loads(OUT.read_text()) if OUT.exists() else {}
    import importlib.metadata as md

    golden["generator"] = {"mergekit": md.version("mergekit"), "torch": torch.__version__,
                           "transformers": md.version("transformers"),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "cpu_kernel_env": {k: os.environ.get(k) for k in PINNED}}
    entries = golden.setdefault("families", {})
    with tempfile.TemporaryDirectory(prefix="mk-fam-") as tmp:
        for name in only or fm.FAMILIES:
            f = fm.build_all(Path(tmp) / "families", [name])[name]
            inputs = {m: short(mg.describe(mg.load_folder(f[m]))) for m in fm.MEMBERS}
            entry = {"inputs": inputs, "recipes": {}}
            for kind, recipe in recipes(f, family_dtype(name)).items():
                try:
                    out = Path(tmp) / f"{name}-{kind}"
                    merged = run_mergekit(recipe, out)
                    if set(merged) != set(inputs["ft1"]):
                        entry.setdefault("mergekit_wrote", {})[kind] = sorted(
                            set(merged) - set(inputs["ft1"]))[:4]
                        merged = as_checkpoint(out, family_dtype(name))
                    entry["recipes"][kind] = short(mg.describe(merged))
                except Exception as err:  # noqa: BLE001 - recorded: the matrix says so
                    entry["recipes"][kind] = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(name, kind, "error" in entry["recipes"][kind], flush=True)
            entries[name] = entry
    golden["families"] = dict(sorted(entries.items()))
    OUT.write_text(json.dumps(golden, indent=0, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
